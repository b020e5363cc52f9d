"""The int8 ops against their references, every int8 kernel variant this CPU runs, bad input."""

import numpy as np
import pytest
import torch

import fastnn.testing as testing
from fastnn.ops import quantized as qops
from fastnn.reference import quantized as ref

from .helpers import GATES, lstm_args, needs_cpu_kernels, run_seq, seq_args, weights

VARIANTS = ("default", "avx2", "avx512_vnni", "neon", "neon_dotprod")


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu":
        needs_cpu_kernels()
    return request.param


@pytest.fixture
def variant(request):
    """Forces one int8 kernel variant for the test, restoring the previous one after."""
    needs_cpu_kernels()
    name = request.param
    if name not in qops.isas():
        pytest.skip(f"this CPU cannot run the {name} int8 kernels (it runs {qops.isas()}); "
                    "they are compiled in and chosen only on a CPU that has the instructions")
    before = qops.set_isa(name)
    yield name
    qops.set_isa(before)


def exact_case(M, K, N, gen):
    """Activations whose rows quantize to themselves (integers with max |x| = 127, so scale 1) and
    weights that use the whole int8 range, -128 included, with w_scale 1: the op's output is then
    the exact integer product, which a 16-bit-saturating kernel would get wrong."""
    x = torch.randint(-127, 128, (M, K), generator=gen).float()
    x[:, 0] = 127.0
    x[::2, 1:8] = -127.0
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    w[:, 1:8] = -128
    exact = (x.double() @ w.double().t()).float()
    return x, w, torch.ones(N), exact


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("M,K,N", [(1, 64, 4), (3, 100, 7), (5, 1, 3), (2, 257, 9), (4, 31, 1)])
def test_int8_product_is_exact_with_extreme_values(variant, M, K, N):
    gen = torch.Generator().manual_seed(M * 1000 + K)
    x, w, s, exact = exact_case(M, K, N, gen)
    got = qops.int8_linear.call("cpu", x, w, s, None, False)
    assert torch.equal(got, exact)
    assert torch.equal(qops.int8_linear.call("reference", x, w, s, None, False), exact)


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("shape,N", [((6, 48), 33), ((2, 3, 70), 8), ((1, 256), 1024), ((0, 5), 4), ((3, 0), 2)])
def test_linear_matches_reference(variant, weight_only, shape, N):
    x = torch.randn(*shape)
    w, s = weights(N, shape[-1])
    b = torch.randn(N)
    got = qops.int8_linear.call("cpu", x, w, s, b, weight_only)
    want = ref.int8_linear(x, w, s, b, weight_only)
    assert got.shape == want.shape == (*shape[:-1], N)
    # int32 sums are exact; only fp32 rounding (the scale/bias epilogue, fp32 sums in weight-only) differs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_variants_agree_bit_for_bit(variant):
    # Every variant computes the same int32 sums and runs the same epilogue: identical outputs.
    x = torch.randn(9, 131)
    w, s = weights(37, 131)
    got = qops.int8_linear.call("cpu", x, w, s, None, False)
    before = qops.set_isa("default")
    try:
        want = qops.int8_linear.call("cpu", x, w, s, None, False)
    finally:
        qops.set_isa(before)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_sequences_match_reference(variant, kind, weight_only, reverse):
    x, h0, c0, w = seq_args(kind, 7, 3, 37, 20)
    lengths = torch.tensor([7, 3, 5])
    for lens in (None, lengths):
        got = run_seq(kind, "cpu", x, h0, c0, w, lens, reverse, weight_only)
        want = run_seq(kind, "reference", x, h0, c0, w, lens, reverse, weight_only)
        # The kernels' exp/tanh differ from torch's by an ulp or two; a state value on a rounding
        # tie of the per-step int8 quantization can then move one step (|h| <= 1, so at most
        # 1/127 of one input of the recurrent product), hence the 2e-3 bound.
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=0, atol=2e-3)
        if lens is not None:
            assert torch.all(got[0][3:, 1] == 0) and torch.all(got[0][5:, 2] == 0)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("B", [5, 40])
def test_sequences_split_over_tasks_match_one_task_and_reference(kind, weight_only, B, monkeypatch):
    """Large enough for the recurrence to split its hidden units (and an LSTM's projection outputs)
    over two tasks (B * gates * H * H >= 32768 multiply-adds per step): the same numbers as one task,
    and the reference's; with a NaN row (the exact path, per task) and rows that end early. B = 5:
    each task quantizes the whole state itself (one barrier per product); B = 40 (B * H > 2048): the
    tasks quantize a share of the rows each and meet at a second barrier."""
    needs_cpu_kernels()
    H = 68 if GATES[kind] > 1 else 100  # not a whole number of vectors: each task's last units are scalar
    x, h0, c0, w = seq_args(kind, 6, B, 24, H)
    x[2, 3, 5] = float("nan")
    lengths = torch.tensor([6, 2, 5, 6, 1] * (B // 5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_seq(kind, "cpu", x, h0, c0, w, lengths, False, weight_only)
        torch.set_num_threads(2)
        two = run_seq(kind, "cpu", x, h0, c0, w, lengths, False, weight_only)
        # the tasks finishing the sequence on one of them (what a busy machine triggers) from a
        # mid-step phase on: FASTNN_LOCKSTEP_SOLO_FROM counts the phases between barriers
        monkeypatch.setenv("FASTNN_LOCKSTEP_SOLO_FROM", "5")
        solo = run_seq(kind, "cpu", x, h0, c0, w, lengths, False, weight_only)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(solo, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    want = run_seq(kind, "reference", x, h0, c0, w, lengths, False, weight_only)
    for a, b, r in zip(one, two, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isnan(), r.isnan())
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(b, r, rtol=0, atol=2e-3, equal_nan=True)
    assert torch.all(two[0][2:, 1] == 0) and not two[0][:, [0, 2, 4]].isnan().any()


def test_compiled_seq_ops_check_the_range_of_lengths():
    needs_cpu_kernels()
    x, h0, c0, w = lstm_args(5, 3, 4, 6)
    for bad in ([5, -1, 3], [5, 6, 3]):
        with pytest.raises(ValueError, match=r"lengths.*values in \[0, 5\]"):
            torch.ops.fastnn.int8_lstm_seq(x, h0, c0, *w, torch.tensor(bad), False, False)


def test_sequence_lengths_keep_state_past_the_end():
    needs_cpu_kernels()
    x, h0, c0, w = lstm_args(6, 2, 5, 4)
    out, h, c = run_seq("lstm", "cpu", x, h0, c0, w, torch.tensor([6, 2]))
    out2, h2, c2 = run_seq("lstm", "cpu", x[:2, 1:], h0[1:], c0[1:], w)
    torch.testing.assert_close(h[1:], h2)
    torch.testing.assert_close(c[1:], c2)
    torch.testing.assert_close(out[:2, 1:], out2)


def dequantized_float(x, w, s, b=None):
    """The float layer with the dequantized weights, in fp64 (no overflow on the way), rounded to fp32."""
    y = ((x.double() @ w.double().t()) * s.double()).float()
    return y if b is None else y + b


def same_specials(got, want):
    """NaN, +inf and -inf in exactly the same places."""
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(f(got), f(want)), (f.__name__, got, want)


@pytest.mark.parametrize("weight_only", [False, True])
def test_nan_and_inf_rows_propagate_as_in_the_float_layer_and_poison_no_other_row(backend, weight_only):
    x = torch.randn(5, 40)
    w, s = weights(6, 40)
    w[0, 3] = 0  # inf * 0 is NaN in the float layer too
    b = torch.randn(6)
    clean = qops.int8_linear.call(backend, x, w, s, b, weight_only)
    x[1, 3] = float("nan")
    x[2, 3] = float("inf")
    x[3, 0], x[3, 5] = -float("inf"), float("inf")
    got = qops.int8_linear.call(backend, x, w, s, b, weight_only)
    want = dequantized_float(x, w, s, b)
    assert torch.isnan(got[1]).all()
    # one inf input: +-inf by the weight's sign, NaN where the (dequantized) weight is 0
    assert torch.isinf(got[2, 1:]).all() and torch.isnan(got[2, 0])
    same_specials(got, want)
    assert torch.equal(got[[0, 4]], clean[[0, 4]])


@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("magnitude", [1e30, 1e36, 3e38])
def test_huge_finite_rows_stay_finite(backend, weight_only, magnitude):
    # Where the float layer is finite the int8 layer is too: the old epilogue
    # float(acc) * x_scale * w_scale overflowed to inf for rows near 1e36 and above.
    x = torch.randn(3, 64)
    x[1] *= magnitude / x[1].abs().max()
    x[2, 7] = magnitude
    w, s = weights(5, 64)
    w_small = s / 1e3  # scales that keep the float outputs (~1e-3 x magnitude x 64) below FLT_MAX
    got = qops.int8_linear.call(backend, x, w, w_small, None, weight_only)
    want = dequantized_float(x, w, w_small)
    assert torch.isfinite(want).all() and torch.isfinite(got).all(), got
    torch.testing.assert_close(got, want, rtol=0.05, atol=1e-5 * float(want.abs().max()))


def test_tiny_rows_give_no_nan(backend):
    # max|x| / 127 underflows to 0 for subnormal rows: such a row must not divide by zero.
    x = torch.full((2, 9), 1e-44)
    x[1] = 0.0
    x[1, 2] = 1e-45
    w, s = weights(3, 9)
    got = qops.int8_linear.call(backend, x, w, s, None, False)
    assert torch.isfinite(got).all() and got.abs().max() < 1e-30


def test_nan_inf_and_huge_inputs_in_sequences(backend):
    # One input feature (I = 1): every gate's input weight is its row's maximum, never 0, so an inf
    # input saturates the gates exactly as in the float layer and the state stays finite. H = 19:
    # vectorised gate math (8 or 16 lanes) and its scalar tail; NaN must survive both.
    for kind in ("lstm", "gru", "rnn_tanh"):
        x, h0, c0, w = lstm_args(5, 4, 1, 19, GATES[kind])
        clean = run_seq(kind, backend, x, h0, c0, w)
        x[2, 1, 0] = float("inf")
        x[1, 2, 0] = -3e38
        x[3, 3, 0] = float("nan")
        got = run_seq(kind, backend, x, h0, c0, w)
        assert torch.isfinite(got[0][:, :3]).all() and torch.isfinite(got[1][:3]).all(), (kind, got)
        assert torch.isnan(got[0][3:, 3]).all() and torch.isnan(got[1][3]).all()
        for g, c in zip(got, clean):  # rows 0 (untouched) and the others up to their first special step
            assert torch.equal(g[..., 0, :], c[..., 0, :])
        assert torch.equal(got[0][:2, 1], clean[0][:2, 1]) and torch.equal(got[0][:1, 2], clean[0][:1, 2])
    # relu: a huge but finite input gives a huge but finite state, as in the float layer
    x, h0, c0, w = lstm_args(3, 2, 1, 4, 1)
    x[1, 0, 0] = 1e38
    out, h = run_seq("rnn_relu", backend, x, h0, c0, (w[0], w[1] / 1e3, *w[2:]))
    assert torch.isfinite(out).all() and torch.isfinite(h).all()


def test_empty_sequences_and_batches():
    needs_cpu_kernels()
    for T, B in ((0, 3), (4, 0)):
        x, h0, c0, w = lstm_args(T, B, 5, 4)
        for backend in ("reference", "cpu"):
            out, h, c = run_seq("lstm", backend, x, h0, c0, w)
            assert out.shape == (T, B, 4)
            assert torch.equal(h, h0) and torch.equal(c, c0)


def test_isa_forced_by_environment():
    needs_cpu_kernels()
    code = "import torch, fastnn.ops.quantized as q; x = torch.randn(2, 8); w, s = q.quantize_weight(torch.randn(3, 8)); " \
           "q.int8_linear(x, w, s); print(q.isa())"
    r = testing.run_isolated(code, env={"FASTNN_CPU_ISA": "default"})
    assert r.returncode == 0 and r.stdout.strip() == "default", r.stderr
    r = testing.run_isolated(code, env={"FASTNN_CPU_ISA": "sse9"})
    assert r.returncode == 1 and "FASTNN_CPU_ISA" in r.stderr and "'sse9'" in r.stderr, r.stderr


def test_set_isa_refuses_unknown_variant():
    needs_cpu_kernels()
    with pytest.raises(ValueError, match="'nope'"):
        qops.set_isa("nope")


# ---------------------------------------------------------------------------------------------
# Bad input: the same clear error from every backend; the compiled op checks what memory safety needs.

def test_bad_input(backend):
    x = torch.randn(3, 8)
    w, s = weights(5, 8)
    call = qops.int8_linear.call
    with pytest.raises(ValueError, match="'int8_linear: w_q'.*int8"):
        call(backend, x, w.float(), s, None, False)
    with pytest.raises(ValueError, match="'int8_linear: w_q'.*shape \\[5, 9\\]"):
        call(backend, torch.randn(3, 9), w, s, None, False)
    with pytest.raises(ValueError, match="'int8_linear: input'.*float32"):
        call(backend, x.double(), w, s, None, False)
    with pytest.raises(ValueError, match="'int8_linear: bias'"):
        call(backend, x, w, s, torch.randn(4), False)
    with pytest.raises(NotImplementedError, match="no GPU path"):
        call(backend, x.to("meta"), w, s, None, False)
    with pytest.raises(RuntimeError, match="inference-only"):
        call(backend, x.requires_grad_(), w, s, None, False)
    with torch.no_grad():
        call(backend, x, w, s, None, False)
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3)
    with pytest.raises(ValueError, match="'int8_lstm_seq: lengths'"):
        run_seq("lstm", backend, xs, h0, c0, wl, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="'int8_lstm_seq: c0'"):
        run_seq("lstm", backend, xs, h0, c0[:1], wl)
    with pytest.raises(ValueError, match="'int8_gru_seq: w_hh_q'"):
        run_seq("gru", backend, xs, h0, c0, wl)  # LSTM weights (4H rows) given to the GRU
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3, gates=1)
    with pytest.raises(ValueError, match="'int8_rnn_seq: nonlinearity'"):
        run_seq("rnn_sigmoid", backend, xs, h0, c0, wl)
    xs, h0, c0, wl = lstm_args(4, 2, 5, 6, proj=4)  # an LSTM's projection: h [B, 4], c [B, 6]
    with pytest.raises(ValueError, match="'int8_lstm_seq: w_hr_scale'.*come together"):
        run_seq("lstm", backend, xs, h0, c0, wl[:7])
    with pytest.raises(ValueError, match=r"'int8_lstm_seq: w_hr_q'.*\[proj_size, hidden_size\] = \[4, 6\]"):
        run_seq("lstm", backend, xs, h0, c0, (*wl[:6], wl[6][:, :5], wl[7]))
    with pytest.raises(ValueError, match=r"'int8_lstm_seq: h0'.*shape \[2, 4\]"):
        run_seq("lstm", backend, xs, c0, c0, wl)
    with pytest.raises(ValueError, match=r"'int8_lstm_seq: w_hr_q'.*= \[6, 6\] \(proj_size = w_hh_q"):
        run_seq("lstm", backend, xs, h0, c0, lstm_args(4, 2, 5, 6)[3] + wl[6:])  # W_hh [4H, H]: P = H


def test_compiled_ops_check_what_memory_safety_needs():
    needs_cpu_kernels()
    x = torch.randn(3, 8)
    w, s = weights(5, 8)
    with pytest.raises(ValueError, match="w_q"):
        torch.ops.fastnn.int8_linear(torch.randn(3, 9), w, s, None, False)
    with pytest.raises(ValueError, match="w_scale"):
        torch.ops.fastnn.int8_linear(x, w, s[:2], None, False)
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3)
    with pytest.raises(ValueError, match="lengths"):
        torch.ops.fastnn.int8_lstm_seq(xs, h0, c0, *wl, torch.tensor([1, 2, 3]), False, False)
    with pytest.raises(ValueError, match="h0"):
        torch.ops.fastnn.int8_lstm_seq(xs, h0[:, :2], c0, *wl, None, False, False)
    xs, h0, c0, wl = lstm_args(4, 2, 5, 6, proj=4)
    with pytest.raises(ValueError, match="w_hr_scale"):
        torch.ops.fastnn.int8_lstm_seq(xs, h0, c0, *wl[:6], None, False, False, wl[6], None)
    with pytest.raises(ValueError, match="w_hr_q"):
        torch.ops.fastnn.int8_lstm_seq(xs, h0, c0, *wl[:6], None, False, False, wl[6][:, :5], wl[7])
    with pytest.raises(ValueError, match="c0"):
        torch.ops.fastnn.int8_lstm_seq(xs, h0, h0, *wl[:6], None, False, False, *wl[6:])
    # one tensor on the meta device: the meta kernel raises (it must not return empty CPU tensors)
    for i in (2, 6, 7):
        moved = list(wl)
        moved[i] = moved[i].to("meta")
        with pytest.raises(ValueError, match="one device, got cpu and meta"):
            torch.ops.fastnn.int8_lstm_seq(xs, h0, c0, *moved[:6], None, False, False, *moved[6:])
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastnn.int8_linear(x, w.to("meta"), s, None, False)


def test_opcheck():
    needs_cpu_kernels()
    x = torch.randn(3, 8)
    w, s = weights(5, 8)
    testing.opcheck(torch.ops.fastnn.int8_linear.default, (x, w, s, torch.randn(5), False))
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3)
    testing.opcheck(torch.ops.fastnn.int8_lstm_seq.default, (xs, h0, c0, *wl, torch.tensor([4, 2]), True, False))
    xs, h0, c0, wl = lstm_args(4, 2, 5, 6, proj=4)
    testing.opcheck(torch.ops.fastnn.int8_lstm_seq.default,
                    (xs, h0, c0, *wl[:6], torch.tensor([4, 2]), True, False, *wl[6:]))
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3, gates=3)
    testing.opcheck(torch.ops.fastnn.int8_gru_seq.default, (xs, h0, *wl, None, False, True))
    xs, h0, c0, wl = lstm_args(4, 2, 5, 3, gates=1)
    testing.opcheck(torch.ops.fastnn.int8_rnn_seq.default, (xs, h0, *wl, None, False, False, "relu"))


def test_quantize_weight():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -3.0]])
    q, s = ref.quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 64, -127]
    np.testing.assert_allclose(s.numpy(), [1 / 127, 1.0, 3 / 127], rtol=1e-7)
    with pytest.raises(ValueError, match="finite"):
        ref.quantize_weight(torch.tensor([[float("nan")]]))
