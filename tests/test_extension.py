"""The compiled library is optional: fastnn works without it (FASTNN_DISABLE_EXT=1 / a pure-Python
install), on the reference and Triton paths, with the same results."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastnn
from fastnn import _extension, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600, cwd=ROOT)


def test_disabled_extension_trains_like_torch():
    """With FASTNN_DISABLE_EXT=1 the optimizers run on the reference path and still match torch."""
    out = _run("""
        import torch, fastnn
        from fastnn import _extension
        assert not _extension.available() and "FASTNN_DISABLE_EXT" in _extension.error()
        torch.manual_seed(0)
        a = torch.nn.Linear(8, 4); b = torch.nn.Linear(8, 4); b.load_state_dict(a.state_dict())
        oa = fastnn.optim.AdamW(a.parameters(), lr=1e-2); ob = torch.optim.AdamW(b.parameters(), lr=1e-2)
        for i in range(20):
            x = torch.randn(16, 8)
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
        w = a.weight
        z = lambda: torch.zeros_like(w)
        assert fastnn.ops.adam_step_.choose([w], [w.grad], [z()], [z()], [], [torch.zeros(())], lr=1e-2, beta1=0.9,
                                            beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                                            maximize=False, decoupled=True) == "reference"
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        print("ok")
    """, FASTNN_DISABLE_EXT="1", TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pure_python_build_has_no_extension():
    """setup.py with FASTNN_BUILD_EXT=0 builds no extension module (a pure-Python install)."""
    out = _run("""
        import runpy, sys
        sys.argv = ["setup.py", "--name"]
        import setuptools
        setuptools.setup = lambda **kw: print("ext_modules", len(kw["ext_modules"]))
        runpy.run_path("setup.py", run_name="__main__")
    """, FASTNN_BUILD_EXT="0")
    assert out.returncode == 0, out.stderr
    assert "ext_modules 0" in out.stdout


@pytest.mark.parametrize("hide_triton", [False, True], ids=["triton-as-installed", "without-triton"])
def test_broken_library_warns_and_falls_back(hide_triton):
    """A compiled library that fails to load (built against another torch, say) gives one warning
    naming the cause, not an ImportError, and fastnn still works on the reference path. The warning
    names Triton as the fallback only where Triton is installed."""
    out = _run("""
        import importlib.abc, importlib.util, sys, warnings
        if %r:
            sys.modules["triton"] = None
        try:
            has_triton = importlib.util.find_spec("triton") is not None
        except ValueError:
            has_triton = False

        class BrokenLibrary(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastnn._C":
                    raise ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

        sys.meta_path.insert(0, BrokenLibrary())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, fastnn
            assert not fastnn.build_info()["extension"]
        messages = [str(w.message) for w in caught if "fastnn" in str(w.message)]
        assert len(messages) == 1 and "undefined symbol" in messages[0], messages
        assert ("Triton" in messages[0]) == has_triton, messages
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        fastnn.optim.SGD([p], lr=0.5).step()
        assert torch.equal(p.detach(), torch.full((3,), 0.5))
        print("ok")
    """ % hide_triton)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_info_reports_the_build():
    info = fastnn.build_info()
    assert set(info) >= {"extension", "extension_error", "cuda_kernels", "torch"}
    assert info["extension"] == _extension.available()


def test_forced_backend_error_names_the_reason():
    with backends.force("cuda"):
        with pytest.raises(backends.BackendError, match="FASTNN|force"):
            fastnn.ops.adam_step_([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [],
                                  [torch.tensor(0.0)], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                  amsgrad=False, maximize=False, decoupled=False)


def test_env_backend_parsing():
    out = _run("""
        from fastnn import backends
        print(backends.forced("adam_step"), backends.forced("lstm_cell"))
    """, FASTNN_BACKEND="adam_step:reference")
    assert out.stdout.split() == ["reference", "None"], out.stderr
    out = _run("import fastnn", FASTNN_BACKEND="nonsense")
    assert out.returncode != 0 and "unknown backend" in out.stderr


def test_import_does_not_load_the_library():
    out = _run("""
        import sys, torch, fastnn
        assert "fastnn._C" not in sys.modules, "import fastnn loaded the compiled library"
        p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)
        fastnn.optim.SGD([p], lr=0.1).step()
        print("loaded" if "fastnn._C" in sys.modules else "not loaded")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("loaded" if _extension.available() else "not loaded")


def test_first_use_inside_a_fullgraph_compile():
    """The library loads on first use even when that use is inside torch.compile(fullgraph=True)."""
    out = _run("""
        import sys, torch, fastnn
        assert "fastnn._C" not in sys.modules
        moe = fastnn.MoE(16, 32, num_experts=4, top_k=2)
        compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
        x = torch.randn(10, 16)
        torch.testing.assert_close(compiled(x), moe(x))
        print("ok")
    """, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_library_path_loads_the_ops_in_a_process_without_fastnn():
    path = fastnn.library_path()
    if path is None:
        pytest.skip(f"the compiled library is not available here: {fastnn.build_info()['extension_error']}")
    code = (f"import sys, torch\ntorch.ops.load_library({path!r})\n"
            "assert 'fastnn' not in sys.modules\n"
            "print(torch.ops.fastnn.quantized_isa())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == fastnn.build_info()["int8_cpu_isa"]


# A CPU-only, Triton-free install (torch's CPU wheel, FASTNN_BUILD_CUDA=0, no triton) is quiet: the
# user of such an install asked for no CUDA and no Triton, so neither may be mentioned. Triton is
# hidden here as on torch's CPU wheels (CI also runs this in an environment without it).
QUIET = """
import sys, warnings
sys.modules["triton"] = None
warnings.simplefilter("error")           # any warning fails the run, and names itself on stderr
import torch, fastnn
torch.manual_seed(0)

lstm = fastnn.LSTM(8, 16, num_layers=2, batch_first=True)
out, _ = lstm(torch.randn(3, 5, 8))
out.sum().backward()
gru = fastnn.GRU(8, 16)
gru(torch.randn(5, 3, 8))[0].sum().backward()

opt = fastnn.optim.AdamW(lstm.parameters(), lr=1e-3)
opt.step()
opt.zero_grad()

moe = fastnn.MoE(16, 32, num_experts=4, top_k=2)
moe(torch.randn(10, 16, requires_grad=True)).sum().backward()

model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
qmodel = fastnn.quantize_dynamic(model)
with torch.no_grad():
    qmodel(torch.randn(4, 8))
qlstm = fastnn.quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(8, 16, batch_first=True)).eval())
with torch.no_grad():
    qlstm(torch.randn(2, 5, 8))
info = fastnn.build_info()
print("extension" if info["extension"] else "no extension:", info["extension_error"] or "")
"""


def test_cpu_only_triton_free_install_is_quiet():
    """Layers, an optimizer step, a MoE layer and quantized layers run without Triton, with warnings
    as errors, and nothing printed mentions CUDA or Triton."""
    out = _run(QUIET)
    assert out.returncode == 0, out.stderr
    said = (out.stdout + out.stderr).lower()
    assert "cuda" not in said and "triton" not in said, out.stdout + out.stderr
    assert out.stdout.startswith("extension") == _extension.available(), out.stdout


@pytest.mark.skipif(not os.environ.get("FASTNN_EXPECT_BUILD"),
                    reason="FASTNN_EXPECT_BUILD names the build a job installed (CI's CPU-only job sets cpu-wheel)")
def test_the_expected_build_runs():
    """CI's CPU-only job tests an installed wheel: this fails when its tests would run on another
    fastnn (the checkout's, without the compiled library) or with Triton or CUDA present."""
    expected = os.environ["FASTNN_EXPECT_BUILD"]
    assert expected == "cpu-wheel", f"unknown FASTNN_EXPECT_BUILD={expected!r}"
    assert "site-packages" in fastnn.__file__, fastnn.__file__
    assert fastnn.build_info()["extension"], fastnn.build_info()
    assert "site-packages" in fastnn.library_path(), fastnn.library_path()
    assert not _extension.built_with_cuda()
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
    assert not backends.triton_available(), "triton imports here"
