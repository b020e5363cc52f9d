"""The wheel: ``pip wheel --no-build-isolation --no-deps .`` gives a wheel that installs into a fresh
environment, not in editable mode, where fastnn imports, finds its compiled library and its Triton
kernels (``fastnn.kernels``), and runs.

Building a wheel takes minutes here, so these tests take one already built, named by FASTNN_WHEEL,
and built against the torch running them (its compiled library requires that torch minor).
``.ci/run`` builds one in its CPU-only job and runs these tests there.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.environ.get("FASTNN_WHEEL")

pytestmark = pytest.mark.skipif(
    not WHEEL, reason="FASTNN_WHEEL names a wheel built against this torch (.ci/run's CPU-only job builds "
                      "one: FASTNN_INSTALL=wheel bash scripts/env.sh)")

# The Triton kernels ship as fastnn.kernels (kernels/triton in the tree).
KERNELS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "triton", "*.py"))) or \
    ["__init__.py", "moe.py", "moe_gemm.py", "optim.py", "rnn.py"]


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def test_wheel_holds_the_package_and_nothing_else():
    with zipfile.ZipFile(WHEEL) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "fastnn/__init__.py" in names and "fastnn/py.typed" in names
    missing = [k for k in KERNELS if f"fastnn/kernels/{k}" not in names]
    assert not missing, f"the wheel lacks the Triton kernels {missing}"
    libraries = [n for n in names if re.fullmatch(r"fastnn/_C[^/]*\.so", n)]
    assert len(libraries) == 1, f"expected one compiled library fastnn/_C*.so, got {libraries}"
    top = {n.split("/")[0] for n in names}
    assert top <= {"fastnn"} | {n.split("/")[0] for n in names if ".dist-info/" in n}, \
        f"the wheel holds more than the package: {sorted(top)}"
    junk = [n for n in names if n.endswith((".cpp", ".cu", ".cuh", ".h", ".o", ".pyc")) or "/tests/" in n]
    assert not junk, f"sources or build outputs in the wheel: {junk[:10]}"
    # The compiled library works only with the torch minor it was built against: the wheel says so.
    major, minor = _torch_minor()
    pins = re.findall(r"^Requires-Dist: torch\b(.*)$", metadata, flags=re.M)
    assert len(pins) == 1, pins
    assert f">={major}.{minor}" in pins[0] and f"<{major}.{minor + 1}" in pins[0], pins[0]


SMOKE = """
import importlib.metadata, importlib.util, json, os, sys
import torch, fastnn
from fastnn import backends

venv = os.path.realpath(sys.argv[1])
inside = lambda path: os.path.realpath(path).startswith(venv + os.sep) and "site-packages" in path
assert inside(fastnn.__file__), fastnn.__file__
assert inside(fastnn.library_path() or ""), fastnn.build_info()
direct = json.loads(importlib.metadata.distribution("fastnn-kernels").read_text("direct_url.json") or "{}")
assert not direct.get("dir_info", {}).get("editable"), direct
for name in %(kernels)r:
    spec = importlib.util.find_spec("fastnn.kernels" + ("" if name == "__init__" else "." + name))
    assert spec is not None and inside(spec.origin), (name, spec)

torch.manual_seed(0)
def train(opt_cls, model):
    opt = opt_cls(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
    return model.weight.detach()
def adamw_matches_torch():
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    state = torch.get_rng_state()
    got = train(fastnn.optim.AdamW, a)
    torch.set_rng_state(state)
    torch.testing.assert_close(got, train(torch.optim.AdamW, b), rtol=1e-5, atol=1e-6)

with backends.force("cpu"):                  # the compiled kernels, or an error saying why not
    adamw_matches_torch()
    lstm = fastnn.LSTM(8, 16, batch_first=True)
    out, _ = lstm(torch.randn(2, 5, 8))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fastnn.quantize_dynamic(model)(x), model(x), rtol=0.05, atol=0.05)
if backends.triton_available():
    with backends.force("triton", ops=["adam_step"]):
        adamw_matches_torch()
    print("ok, with triton")
else:
    print("ok, without triton")
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    """The wheel, installed (not editable) into a new venv that borrows only torch (and Triton where
    FASTNN_TRITON_PACKAGE names it or this environment has it), imports, finds its compiled library
    and Triton kernels inside that venv, and trains and infers on them."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                          "--no-index", WHEEL], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch (and what it imports) from this environment; Triton alone from where it is, if anywhere.
    borrowed = [os.path.dirname(os.path.dirname(torch.__file__))]
    triton = os.environ.get("FASTNN_TRITON_PACKAGE") or getattr(importlib.util.find_spec("triton"), "origin", None)
    if triton:
        triton_dir = tmp_path / "triton-only"
        triton_dir.mkdir()
        package = triton if os.path.isdir(triton) else os.path.dirname(triton)
        os.symlink(package, triton_dir / "triton")
        borrowed.append(str(triton_dir))
    with open(os.path.join(site, "borrowed.pth"), "w") as f:
        f.write("\n".join(borrowed) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTNN_BACKEND", "FASTNN_DISABLE_EXT")}
    code = textwrap.dedent(SMOKE % {"kernels": [k[:-3] for k in KERNELS]})
    out = subprocess.run([python, "-c", code, str(venv)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**env, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ("ok, with triton" if triton else "ok, without triton"), out.stdout + out.stderr
