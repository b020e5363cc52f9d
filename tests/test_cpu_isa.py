"""The CPU instruction-set levels (csrc/cpu_isa.h): every level this CPU runs, forced in turn, against
torch and the references (recurrent layers, optimizers, int8 ops); FASTNN_CPU_ISA and its errors;
build_info; and that the library's portable code really is portable (no AVX outside the per-ISA
copies and the int8 kernels that carry target attributes)."""

import os
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import fastnn
from fastnn import _extension, testing

LEVELS = ["default", "avx2", "avx512", "avx512_vnni", "neon", "neon_dotprod"]


def _needs_library():
    if _extension.load() is None or not hasattr(torch.ops.fastnn, "cpu_isa"):
        pytest.skip(f"the compiled library is not available ({_extension.error()})")


def _runs():
    return list(torch.ops.fastnn.cpu_isas())


@pytest.fixture(params=LEVELS)
def level(request):
    """Forces one level (fp32 and int8 kernels) for the test, restoring the previous one after."""
    _needs_library()
    name = request.param
    if name not in _runs():
        pytest.skip(f"this CPU cannot run the {name} kernels (it runs {_runs()}); the CI machine may")
    before = torch.ops.fastnn.cpu_set_isa(name)
    assert torch.ops.fastnn.cpu_isa() == name
    yield name
    torch.ops.fastnn.cpu_set_isa(before)


# --- recurrent layers: the packed path (float32, B = 1 with dot products, B > 1 with repacked
# weights, T*B <= 2 with the matrix-vector input projection), the step-by-step path (the
# backward, projections) and bfloat16 (float math). H = 37: two 16-float blocks and a tail, four
# 8-float blocks and a tail, nine 4-float blocks and a tail.

PAIRS = [(nn.LSTM, fastnn.LSTM), (nn.GRU, fastnn.GRU), (nn.RNN, fastnn.RNN)]


def _close(got, want, dtype, msg=""):
    """float32: fastnn's tolerance. bfloat16 against torch's float32: the inputs, weights and
    gradients are rounded to bf16 (8 bits), so the error is measured against the largest value."""
    if dtype == torch.float32:
        testing.assert_close(got, want, dtype=dtype, msg=msg)
        return
    err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
    assert err < 0.03, f"{msg}: relative error {err:.4f}"


def _pair(torch_cls, fastnn_cls, **kw):
    torch.manual_seed(0)
    a = torch_cls(11, 37, **kw)
    torch.manual_seed(0)
    b = fastnn_cls(11, 37, **kw)
    return a, b


@pytest.mark.parametrize("torch_cls,fastnn_cls", PAIRS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,B,with_lengths", [(6, 1, False), (6, 5, False), (6, 5, True), (1, 1, False),
                                              (1, 2, False)])
def test_recurrent_layers_match_torch(level, torch_cls, fastnn_cls, dtype, T, B, with_lengths):
    a, b = _pair(torch_cls, fastnn_cls, num_layers=2, bidirectional=True)
    b = b.to(dtype)
    x = torch.randn(T, B, 11)
    xa, xb = x.clone().requires_grad_(), x.to(dtype).requires_grad_()
    if with_lengths:
        lengths = torch.tensor([T, 3, T - 1, 1, 2][:B])
        pa = nn.utils.rnn.pack_padded_sequence(xa, lengths, enforce_sorted=False)
        pb = nn.utils.rnn.pack_padded_sequence(xb, lengths, enforce_sorted=False)
        out_a, out_b = nn.utils.rnn.pad_packed_sequence(a(pa)[0])[0], nn.utils.rnn.pad_packed_sequence(b(pb)[0])[0]
    else:
        out_a, out_b = a(xa)[0], b(xb)[0]
    _close(out_b.float(), out_a, dtype, "output")
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    (out_b.float() * w).sum().backward()
    _close(xb.grad.float(), xa.grad, dtype, "input gradient")
    for (n, pa_), (_, pb_) in zip(a.named_parameters(), b.named_parameters()):
        _close(pb_.grad.float(), pa_.grad, dtype, n)


def test_lstm_projection_and_cells(level):
    # projection: the step-by-step path; cells: one step at batch 1 (matrix-vector products)
    a, b = _pair(nn.LSTM, fastnn.LSTM, proj_size=5)
    x = torch.randn(4, 3, 11)
    testing.assert_close(b(x)[0], a(x)[0], dtype=torch.float32)
    for torch_cls, fastnn_cls in [(nn.LSTMCell, fastnn.LSTMCell), (nn.GRUCell, fastnn.GRUCell)]:
        ca, cb = _pair(torch_cls, fastnn_cls)
        x1 = torch.randn(1, 11)
        testing.assert_close(cb(x1)[0] if torch_cls is nn.LSTMCell else cb(x1),
                             ca(x1)[0] if torch_cls is nn.LSTMCell else ca(x1), dtype=torch.float32)


# --- optimizers: 1000 + 37 elements (whole vectors of any width, then a tail), float32 and bf16.

@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimizer_step_matches_torch(level, name, dtype):
    torch.manual_seed(0)
    p0 = [torch.randn(1037, dtype=dtype), torch.randn(5, 7, dtype=dtype)]
    grads = [torch.randn_like(p) for p in p0]
    kw = dict(lr=1e-2, weight_decay=0.1) if name == "AdamW" else dict(lr=1e-2, momentum=0.9, nesterov=True)
    # torch's reference runs in float32; fastnn's bf16 step computes in float32 and rounds each step
    pa = [p.float().clone().requires_grad_() for p in p0]
    pb = [p.clone().requires_grad_() for p in p0]
    oa = getattr(torch.optim, name)(pa, foreach=False, **kw)
    ob = getattr(fastnn.optim, name)(pb, **kw)
    for _ in range(3):
        for p, g in zip(pa, grads):
            p.grad = g.float()
        for p, g in zip(pb, grads):
            p.grad = g.clone()
        oa.step()
        ob.step()
    for x, y in zip(pa, pb):
        if dtype == torch.float32:
            testing.assert_close(y.detach(), x.detach(), dtype=dtype)
        else:  # parameters and state rounded to bf16 (8 bits) each step: a few bf16 steps
            torch.testing.assert_close(y.detach().float(), x.detach(), rtol=3 * 2**-7, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_grad_norm_matches_torch(level, dtype, norm_type):
    torch.manual_seed(0)
    grads = [torch.randn(1037, dtype=dtype), torch.randn(3, 5, dtype=dtype)]
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]), norm_type)
    norm, coef = fastnn.ops.optim.grad_norm_clip_coef.call("cpu", grads, 1.0, norm_type)
    torch.testing.assert_close(norm.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(coef.double(), (1.0 / (want + 1e-6)).clamp(max=1.0), rtol=1e-5, atol=0)


# --- int8 ops (the int8 variant of the level, and the MoE's vector helpers of its fp32 variant)

def test_int8_linear_matches_reference(level):
    from fastnn.ops import quantized as qops
    from fastnn.reference import quantized as ref
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 131, generator=gen)
    w, s = ref.quantize_weight(torch.randn(37, 131, generator=gen))
    for weight_only in (False, True):
        got = qops.int8_linear.call("cpu", x, w, s, None, weight_only)
        torch.testing.assert_close(got, ref.int8_linear(x, w, s, None, weight_only), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_int8_moe_matches_reference(level, act):
    from tests.quantized.test_moe import check_matches_reference, needs_cpu_kernels, op_args
    needs_cpu_kernels()
    for weight_only in (False, True):
        check_matches_reference(op_args(T=13, H=37, I=41, E=3, k=2, act=act), weight_only)


# --- choosing a level

def test_set_isa_switches_both_kernel_sets():
    _needs_library()
    from fastnn.ops import quantized as qops
    before = qops.set_isa("default")
    try:
        assert torch.ops.fastnn.cpu_isa() == "default" and qops.isa() == "default"
        assert fastnn.build_info()["cpu_isa"] == "default" and fastnn.build_info()["int8_cpu_isa"] == "default"
        best = _runs()[-1]
        torch.ops.fastnn.cpu_set_isa("auto")
        assert torch.ops.fastnn.cpu_isa() == best
        # the int8 variant a level implies (avx512 without VNNI keeps the AVX2 int8 kernels)
        assert qops.isa() == {"avx512": "avx2"}.get(best, best)
    finally:
        qops.set_isa(before)


def test_bench_header_names_the_level():
    _needs_library()
    from fastnn.bench import cli
    desc = cli.device_description(torch.device("cpu"))
    assert f"fastnn kernels: {torch.ops.fastnn.cpu_isa()}" in cli.header(desc, _extension.info(), None)


def test_levels_are_a_ladder():
    _needs_library()
    runs = _runs()
    assert runs[0] == "default"
    order = {n: i for i, n in enumerate(LEVELS)}
    assert [order[n] for n in runs] == sorted(order[n] for n in runs)
    if "avx512_vnni" in runs:
        assert "avx512" in runs and "avx2" in runs
    if "avx512" in runs:
        assert "avx2" in runs


@pytest.mark.parametrize("name", ["sse9", "AVX9", "avx512_vnni_x"])
def test_unknown_level_is_refused(name):
    _needs_library()
    with pytest.raises(ValueError, match=rf"one of the instruction sets this CPU runs \(default.*got '{name}'"):
        torch.ops.fastnn.cpu_set_isa(name)


def test_level_the_cpu_cannot_run_is_refused():
    _needs_library()
    missing = [n for n in LEVELS if n not in _runs()]
    with pytest.raises(ValueError, match=re.escape(", ".join(_runs()))):
        torch.ops.fastnn.cpu_set_isa(missing[0])


CODE = ("import fastnn, torch\n"
        "i = fastnn.build_info()\n"
        "print(i['cpu_isa'], i['int8_cpu_isa'])\n"
        "m = fastnn.LSTM(4, 9)\n"
        "print(float(m(torch.randn(5, 2, 4))[0].sum()))\n")


@pytest.mark.parametrize("name", ["default", "avx2"])
def test_environment_variable_selects_the_level(name):
    _needs_library()
    if name not in _runs():
        pytest.skip(f"this CPU cannot run {name} (it runs {_runs()})")
    r = testing.run_isolated(CODE, env={"FASTNN_CPU_ISA": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == [name, name]


def test_environment_variable_unknown_level():
    _needs_library()
    r = testing.run_isolated(CODE, env={"FASTNN_CPU_ISA": "sse9"})
    # build_info reports the problem; the first kernel call raises it
    assert r.returncode == 1 and "'sse9'" in r.stderr and "FASTNN_CPU_ISA" in r.stderr, r.stderr
    assert r.stdout.startswith("none: ")


def test_set_isa_recovers_from_a_bad_environment_variable():
    """set_isa (both spellings) replaces a FASTNN_CPU_ISA that names no level this CPU runs, instead
    of raising that variable's error again; the level names are case-insensitive."""
    _needs_library()
    code = ("import fastnn, torch\n"
            "fastnn.build_info()\n"
            "print(fastnn.ops.quantized.set_isa('default'), torch.ops.fastnn.cpu_set_isa('DEFAULT'))\n"
            "m = fastnn.LSTM(4, 9)\n"
            "print(fastnn.build_info()['cpu_isa'], float(m(torch.randn(5, 2, 4))[0].sum()) == float('nan'))\n")
    r = testing.run_isolated(code, env={"FASTNN_CPU_ISA": "sse9"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["auto", "default", "default", "False"]


# --- the library's portable code is portable

_HEADER = re.compile(r"^([0-9a-f]+) <(.*)>:$")
# AVX (VEX/EVEX-encoded) instructions: the mnemonic starts with v (SSE has no such mnemonic but
# verr/verw), or an operand names a ymm/zmm register or an AVX-512 mask register.
_AVX_INSN = re.compile(r"^\s*[0-9a-f]+:\s+(v(?!er[rw]\b)\w+\b|.*%[yz]mm\d|.*%k[1-7]\b)")
# Where AVX code may be: fastnn's per-ISA copies (namespaces isa_avx2 / isa_avx512, and ATen's
# vector types of those variants, instantiated there), demangled or, where objdump leaves a name
# mangled (OpenMP's outlined "._omp_fn.0" bodies), mangled.
_ALLOWED = re.compile(r"isa_avx(2|512)|at::vec::AVX(2|512)::|3vec(4AVX2|6AVX512)")
# The int8 kernels carry target attributes in these files; their functions are allowed by address.
_TARGET_FILES = re.compile(r"^qgemm_(avx2|avx512)\.cpp$")


def _functions_in_target_files(lib):
    """Addresses of the functions that the int8 kernel files with target attributes define, from the
    symbol table (each file's local symbols follow its FILE symbol)."""
    syms = subprocess.run(["objdump", "-t", lib], capture_output=True, text=True, check=True).stdout
    addrs, current, seen = set(), None, set()
    for line in syms.splitlines():
        parts = line.split()
        if len(parts) >= 5 and " df " in line and "*ABS*" in line:
            current = parts[-1]
            seen.add(current)
        elif current and _TARGET_FILES.match(current) and " F " in line and " l " in line[:20]:
            addrs.add(int(parts[0], 16))
    return addrs, seen


def avx_outside_isa_code(lib):
    """The functions of `lib` that use AVX instructions but lie outside the per-ISA copies and the
    int8 kernel files (which may hold them); with objdump's demangled names."""
    target, files = _functions_in_target_files(lib)
    if not any(_TARGET_FILES.match(f) for f in files):
        pytest.skip("the library's symbol table names no source files (stripped?): cannot tell the int8 "
                    "kernels with target attributes from the rest")
    proc = subprocess.Popen(["objdump", "-d", "-C", "--no-show-raw-insn", lib], stdout=subprocess.PIPE, text=True)
    bad, name, addr, flagged = [], None, None, False
    for line in proc.stdout:
        m = _HEADER.match(line.rstrip("\n"))
        if m:
            addr, name, flagged = int(m.group(1), 16), m.group(2), False
            continue
        if name is None or flagged or not _AVX_INSN.match(line):
            continue
        flagged = True
        if addr not in target and not _ALLOWED.search(name):
            bad.append(f"{name}: {line.strip()}")
    assert proc.wait() == 0
    return bad


def test_portable_code_has_no_avx():
    _needs_library()
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("AVX exists only on x86-64")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    bad = avx_outside_isa_code(_extension.library_path())
    assert not bad, f"{len(bad)} functions outside the per-ISA code use AVX, e.g.:\n" + "\n".join(bad[:20])
