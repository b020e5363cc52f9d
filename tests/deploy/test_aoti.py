"""fastnn.aoti: a plain torch model (LSTM, GRU, MLP head) and its int8 version, packaged with
AOTInductor, run from fastnn and from a process without fastnn's Python, at two sequence lengths.

AOTInductor compiles take a minute or more on a 2-core machine: the module builds ONE package (a
model holding a float and an int8 branch) in a module-scoped fixture; the bad-input tests edit
copies of that file or fail before any compile.
"""

import copy
import json
import shutil
import sys
import time
import zipfile
from unittest import mock

import pytest
import torch
import torch._inductor  # noqa: F401 - the fixture wraps its aoti_compile_and_package
from torch import nn

import fastnn
from fastnn.testing import assert_close, run_isolated

pytestmark = pytest.mark.skipif(not fastnn.build_info()["extension"], reason="needs fastnn's compiled library")

IN, T_EXAMPLE, T_OTHER = 6, 5, 11


class Net(nn.Module):
    """torch's layers only: an LSTM, a GRU and an MLP head over every step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(IN, 16, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True)
        self.head = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


class FloatAndInt8(nn.Module):
    """One package for both precisions: the float branch is plain torch (converted by package), the
    int8 one quantized by fastnn.quantize_dynamic."""

    def __init__(self):
        super().__init__()
        self.fp32 = Net()
        self.int8 = fastnn.quantize_dynamic(Net())

    def forward(self, x):
        return self.fp32(x), self.int8(x)


def _eager(model, x):
    """fastnn's eager outputs: the layers converted as package() converts them."""
    with torch.no_grad():
        return fastnn.convert(copy.deepcopy(model)).eval()(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = FloatAndInt8().eval()
    path = tmp_path_factory.mktemp("aoti") / "model.pt2"
    seen = {}
    real = torch._inductor.aoti_compile_and_package

    def capture(ep, *args, **kwargs):  # keep the exported program for the graph checks
        seen["ep"] = ep
        return real(ep, *args, **kwargs)

    x = torch.randn(2, T_EXAMPLE, IN)
    t0 = time.perf_counter()
    with mock.patch("torch._inductor.aoti_compile_and_package", capture):
        out = fastnn.aoti.package(model, (x,), path, dynamic_shapes=({1: torch.export.Dim("T", min=1, max=4096)},))
    print(f"\nfastnn.aoti.package: {time.perf_counter() - t0:.1f} s")
    return {"model": model, "path": str(out), "ep": seen["ep"]}


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, t, IN, generator=g) for t in (T_EXAMPLE, T_OTHER)]


def test_graph_calls_fastnn_ops_and_bakes_in_no_weight_copies(built):
    ep = built["ep"]
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for op in ("lstm_seq", "gru_seq", "int8_lstm_seq", "int8_gru_seq", "int8_linear"):
        assert f"fastnn.{op}.default" in targets, f"fastnn::{op} was decomposed or missing: {sorted(targets)}"
    assert not any(t.startswith("aten.lstm") or t.startswith("aten.gru") for t in targets)
    # the weights are the model's parameters and buffers, not constants captured beside them
    assert dict(ep.constants) == {}, f"weights baked in as constants: {list(ep.constants)}"
    # in the compiled package, the fastnn ops are calls through torch's op registry
    with zipfile.ZipFile(built["path"]) as z:
        externs = [json.loads(z.read(n)) for n in z.namelist() if n.endswith(".wrapper.json")]
    called = {node["node"]["target"] for e in externs for node in e["nodes"]}
    assert {"fastnn::lstm_seq", "fastnn::gru_seq", "fastnn::int8_lstm_seq", "fastnn::int8_gru_seq"} <= called


def test_user_model_is_not_modified(built):
    model = built["model"]
    assert type(model.fp32.lstm) is nn.LSTM and type(model.fp32.gru) is nn.GRU
    assert not model.fp32.lstm._forward_hooks and not model.fp32.lstm._forward_pre_hooks


def test_metadata_records_versions_and_isa(built):
    meta = fastnn.aoti.metadata(built["path"])
    assert meta["fastnn.version"] == fastnn.__version__
    assert meta["fastnn.torch"] == torch.__version__.split("+")[0]
    assert meta["fastnn.int8_cpu_isa"] == fastnn.build_info()["int8_cpu_isa"]


def test_load_matches_eager_at_two_sequence_lengths(built):
    runner = fastnn.aoti.load(built["path"])
    for x in _inputs():
        got, want = runner(x), _eager(built["model"], x)
        assert got[0].shape == (2, x.shape[1], 3)
        for g, w in zip(got, want):
            assert_close(g, w)


FRESH = r"""
import sys, torch
lib, path, data = sys.argv[1:4]
torch.ops.load_library(lib)
runner = torch._inductor.aoti_load_package(path)
for x, want in torch.load(data):
    got = runner(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
assert "fastnn" not in sys.modules, sorted(m for m in sys.modules if m.startswith("fastnn"))
print("ok", len(got))
"""


def test_fresh_process_without_fastnn_runs_the_package(built, tmp_path):
    data = tmp_path / "io.pt"
    torch.save([(x, _eager(built["model"], x)) for x in _inputs()], data)
    # run_isolated runs `python -c`; the arguments follow it
    code = f"import sys; sys.argv = ['-', {fastnn.library_path()!r}, {built['path']!r}, {str(data)!r}]\n" + FRESH
    proc = run_isolated(code, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 2"


# ---------------------------------------------------------------------------------------------
# Bad input


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a Python branch on a value: no export path


def test_module_without_export_path_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(IN, IN), nn.Sequential(nn.ReLU(), DataDependent()))
    named = r"failed in module '1\.1' \(.*DataDependent\)(.|\n)*no export path"
    with pytest.raises(fastnn.aoti.ExportError, match=named):
        fastnn.aoti.package(model, (torch.randn(2, IN),), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def _rewrite(src, dst, edit):
    """Copy the package ``src`` to ``dst`` with its metadata replaced by ``edit(metadata)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_metadata.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(info, data)


@pytest.mark.parametrize("key,value,what", [
    ("fastnn.version", "0.0.1", "fastnn version 0.0.1"),
    ("fastnn.torch", "1.13.0", "torch version 1.13.0"),
    ("fastnn.int8_cpu_isa", "neon", "int8 instruction set neon"),
    ("AOTI_MACHINE", "aarch64", "compiled for aarch64"),
    ("AOTI_CPU_ISA", "AVX512_NOPE", "compiled for the AVX512_NOPE instruction set"),
])
def test_package_from_another_build_is_refused_naming_the_difference(built, tmp_path, key, value, what):
    other = tmp_path / "other.pt2"
    _rewrite(built["path"], other, lambda meta: {**meta, key: value})
    with pytest.raises(fastnn.aoti.PackageError, match=what):
        fastnn.aoti.load(other)


def test_package_without_fastnn_metadata_is_refused(built, tmp_path):
    other = tmp_path / "other.pt2"
    _rewrite(built["path"], other, lambda meta: {k: v for k, v in meta.items() if not k.startswith("fastnn.")})
    with pytest.raises(fastnn.aoti.PackageError, match="not built by fastnn.aoti.package"):
        fastnn.aoti.load(other)


def test_truncated_package_gives_a_clear_error(built, tmp_path):
    bad = tmp_path / "truncated.pt2"
    data = open(built["path"], "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(fastnn.aoti.PackageError, match="truncated or corrupted"):
        fastnn.aoti.load(bad)


def test_corrupted_package_gives_a_clear_error(built, tmp_path):
    bad = tmp_path / "corrupted.pt2"
    shutil.copy(built["path"], bad)
    with zipfile.ZipFile(bad) as z:
        so = next(i for i in z.infolist() if i.filename.endswith(".so"))
    raw = bytearray(bad.read_bytes())
    # the member's data follows its local header: 30 bytes, the name, the extra field
    extra = int.from_bytes(raw[so.header_offset + 28: so.header_offset + 30], "little")
    start = so.header_offset + 30 + len(so.filename.encode()) + extra
    raw[start + so.compress_size // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(fastnn.aoti.PackageError, match="corrupted.*checksum"):
        fastnn.aoti.load(bad)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no package file"):
        fastnn.aoti.load(tmp_path / "nope.pt2")


@pytest.mark.parametrize("name", ["load", "metadata"])
def test_file_errors_name_the_function_called(tmp_path, name):
    """metadata and load share the file checks; each error names the function the user called."""
    call = getattr(fastnn.aoti, name)
    with pytest.raises(FileNotFoundError, match=rf"^fastnn\.aoti\.{name}: no package file"):
        call(tmp_path / "nope.pt2")
    not_zip = tmp_path / "not_zip.pt2"
    not_zip.write_bytes(b"PK\x03\x04 not a whole zip file")
    with pytest.raises(fastnn.aoti.PackageError, match=rf"^fastnn\.aoti\.{name}: .*truncated or corrupted"):
        call(not_zip)
    crc = tmp_path / "crc.pt2"
    with zipfile.ZipFile(crc, "w", zipfile.ZIP_STORED) as z:
        z.writestr("m/data/aotinductor/model/x.wrapper_metadata.json", json.dumps({"k": "v" * 64}))
    raw = bytearray(crc.read_bytes())
    raw[raw.index(b"vvvv")] ^= 0xFF
    crc.write_bytes(bytes(raw))
    with pytest.raises(fastnn.aoti.PackageError, match=rf"^fastnn\.aoti\.{name}: .*checksum"):
        call(crc)


def test_import_fastnn_does_not_import_inductor():
    proc = run_isolated("import sys, torch, fastnn\n"
                        "print('torch._inductor' in sys.modules, 'fastnn.aoti' in sys.modules)\n"
                        "fastnn.aoti\n"
                        "print('fastnn.aoti' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "True"]


CHECKED = r"""
import sys, torch, fastnn
runner = fastnn.aoti.load(sys.argv[1])
IN = int(sys.argv[2])
print("T=1", tuple(runner(torch.randn(2, 1, IN))[0].shape))  # a dynamic size of 1 is accepted
for bad in (torch.randn(3, 5, IN), torch.randn(2, 5, IN + 1), torch.randn(5, IN),
            torch.randn(2, IN, 5).transpose(1, 2), torch.randn(2, 5, IN, dtype=torch.float64)):
    try:
        runner(bad)
    except Exception as e:  # the package's own check
        print("refused", type(e).__name__)
    else:
        print("accepted", tuple(bad.shape), bad.stride())
"""


def test_loaded_package_checks_its_inputs(built):
    code = f"import sys; sys.argv = ['-', {built['path']!r}, '{IN}']\n" + CHECKED
    proc = run_isolated(code, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "T=1 (2, 1, 3)", proc.stdout
    assert lines[1:] == ["refused RuntimeError"] * 5, proc.stdout
