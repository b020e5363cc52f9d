"""fastnn.onnx.export: models with fastnn's layers run in onnxruntime in a process without fastnn.

One export covers every layer kind (stacked and bidirectional LSTM, GRU, RNN, an LSTM cell, a
Linear MLP, MoE), float and int8 side by side in one model, with dynamic batch and sequence axes
(the export takes a few seconds per layer here, so the test exports once).
"""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import fastnn
from fastnn.testing import run_isolated

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

F, H = 5, 8
FLOAT_TOL = dict(rtol=1e-4, atol=1e-5)
INT8_TOL = dict(rtol=1e-4, atol=1e-4)  # the ONNX graph does fastnn's int8 arithmetic; a rounding tie may differ


class Layers(nn.Module):
    """Every exported layer kind, as a user writes it (plain torch layers plus fastnn.MoE)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(F, 16), nn.ReLU(), nn.Linear(16, H))
        self.lstm = nn.LSTM(F, H, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * H, H, bidirectional=True, batch_first=True)
        self.rnn = nn.RNN(2 * H, H, nonlinearity="relu", batch_first=True)
        self.cell = nn.LSTMCell(H, H)
        self.moe = fastnn.MoE(H, 12, 4, 2)
        self.moe_sigmoid = fastnn.MoE(H, 12, 4, 2, score_func="sigmoid", selection_bias=True, activation="gelu_tanh",
                                      routed_scaling_factor=2.5, shared_expert_size=6, shared_expert_gate=True)
        self.moe_sigmoid.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
        self.moe_top1 = fastnn.MoE(H, 12, 4, 1, score_func="topk_softmax", activation="gelu")

    def forward(self, x, lengths):
        y = self.head(x)
        s, (h, c) = self.lstm(x)
        g, hg = self.gru(s)
        r, hr = self.rnn(g, hg[:1].contiguous())  # an initial state
        hc, cc = self.cell(r[:, -1])
        return (y, r, self.moe(r), self.moe_sigmoid(r), self.moe_top1(r), hc + cc, h, hg,
                *self._with_lengths(x, lengths))

    def _with_lengths(self, x, lengths):
        """Sequences of different lengths through the ops (``lengths`` is what a PackedSequence holds)."""
        xt = x.transpose(0, 1).contiguous()
        zeros = xt.new_zeros(xt.shape[1], H)
        if isinstance(self.lstm, fastnn.quantized.LSTM):
            w = [getattr(self.lstm, n) for n in ("weight_ih_l0_reverse_q", "weight_ih_l0_reverse_scale",
                                                 "weight_hh_l0_reverse_q", "weight_hh_l0_reverse_scale",
                                                 "bias_ih_l0_reverse", "bias_hh_l0_reverse")]
            out, h, c = fastnn.ops.quantized.int8_lstm_seq(xt, zeros, zeros, *w, lengths, True, False)
        else:
            w = [getattr(self.lstm, n) for n in ("weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse",
                                                 "bias_hh_l0_reverse")]
            out, h, c, _ = fastnn.ops.lstm_seq(xt, zeros, zeros, *w, None, lengths, None, True)
        return out, h, c


NO_INT8_MOE = {t for t, q in fastnn.quantized.default_mapping().items() if q is not fastnn.quantized.MoE}


class FloatAndInt8(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.fp32 = model
        # the int8 MoE has no ONNX translation (test_int8_moe_is_refused_by_name): its MoE layers
        # stay float here
        self.int8 = fastnn.quantize_dynamic(fastnn.convert(copy.deepcopy(model)), NO_INT8_MOE)
        # weight-only int8 (fp32 activations) for the second Linear and the RNN
        self.int8.head[2] = fastnn.quantized.Linear.from_float(model.head[2], weight_only=True)
        self.int8.rnn = fastnn.quantized.RNN.from_float(model.rnn, weight_only=True)

    def forward(self, x, lengths):
        return (*self.fp32(x, lengths), *self.int8(x, lengths))


N_OUT = 11

RUNNER = """
import json, sys
import numpy as np
import onnx
import onnxruntime as ort
path, data = sys.argv[1], np.load(sys.argv[2])
onnx.checker.check_model(onnx.load(path), full_check=True)  # a conformant file, not only one onnxruntime takes
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
out = {}
for key in sorted(k for k in data.files if k.startswith("x")):
    for i, o in enumerate(sess.run(None, dict(zip(names, (data[key], data["l" + key[1:]]))))):
        out[f"{key}_{i}"] = o
np.savez(sys.argv[3], **out)
assert "fastnn" not in sys.modules
nodes = onnx.load(path).graph.node
print(json.dumps({"ops": sorted({n.op_type for n in nodes}), "domains": sorted({n.domain for n in nodes}),
                  "fastnn": [m for m in sys.modules if m.startswith("fastnn")]}))
"""


def _run_without_fastnn(path, inputs: dict, tmp) -> tuple[dict, dict]:
    arrays = {k: v.numpy() for k, (x, lengths) in inputs.items() for k, v in ((k, x), ("l" + k[1:], lengths))}
    np.savez(tmp / "in.npz", **arrays)
    code = RUNNER.replace("sys.argv[1]", repr(str(path))).replace("sys.argv[2]", repr(str(tmp / "in.npz")))
    code = code.replace("sys.argv[3]", repr(str(tmp / "out.npz")))
    proc = run_isolated(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(np.load(tmp / "out.npz")), info


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = FloatAndInt8(Layers()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tmp = tmp_path_factory.mktemp("onnx")
    x, lengths = torch.randn(3, 6, F), torch.tensor([6, 2, 4])
    dims = ({0: "batch", 1: "seq"}, {0: "batch"})
    # optimize=False: onnxscript's graph optimizer takes most of the export time of this large graph;
    # test_the_default_export_optimizes_the_graph covers it on a small one.
    fastnn.onnx.export(model, (x, lengths), tmp / "model.onnx", dynamic_shapes=dims, external_data=False,
                       optimize=False)
    inputs = {"x0": (x, lengths), "x1": (torch.randn(2, 9, F), torch.tensor([3, 9])),
              "x2": (torch.randn(5, 1, F), torch.ones(5, dtype=torch.int64))}
    got, info = _run_without_fastnn(tmp / "model.onnx", inputs, tmp)
    return model, before, inputs, got, info


def test_runs_without_fastnn_and_writes_only_standard_ops(exported):
    model, _, _, _, info = exported
    assert info["fastnn"] == []
    assert info["domains"] == [""], info["domains"]  # the default ONNX domain only
    for kind in ("LSTM", "GRU", "RNN", "MatMulInteger", "TopK"):
        assert kind in info["ops"], f"{kind} not in {info['ops']}"


def test_float_layers_match_fastnn(exported):
    model, _, inputs, got, _ = exported
    ref_model = fastnn.convert(copy.deepcopy(model.fp32))
    for key, x in inputs.items():
        with torch.no_grad():
            want = ref_model(*x)
        for i, w in enumerate(want):
            torch.testing.assert_close(torch.from_numpy(got[f"{key}_{i}"]), w, **FLOAT_TOL,
                                       msg=lambda m: f"input {key} output {i}: {m}")


def test_int8_layers_match_fastnn(exported):
    model, _, inputs, got, _ = exported
    for key, x in inputs.items():
        with torch.no_grad():
            want = model.int8(*x)
        for i, w in enumerate(want):
            torch.testing.assert_close(torch.from_numpy(got[f"{key}_{N_OUT + i}"]), w, **INT8_TOL,
                                       msg=lambda m: f"input {key} output {i}: {m}")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(F, H)
        self.gru = fastnn.quantized.GRU.from_float(nn.GRU(H, H))

    def forward(self, x, lengths):  # lengths: unused (the runner's two-input convention)
        return self.gru(self.lstm(x)[0])[0]


def _export_small(model, tmp_path):
    """Exports ``model`` (dynamic sequence and batch), runs it without fastnn on two input shapes and
    compares every output with the model's."""
    x, x2, lengths = torch.randn(6, 3, F), torch.randn(4, 2, F), torch.ones(3, dtype=torch.int64)
    fastnn.onnx.export(model, (x, lengths), tmp_path / "small.onnx", dynamic_shapes=({0: "seq", 1: "batch"}, None),
                       external_data=False)
    got, _ = _run_without_fastnn(tmp_path / "small.onnx", {"x0": (x, lengths), "x1": (x2, lengths)}, tmp_path)
    for key, xx in (("x0", x), ("x1", x2)):
        with torch.no_grad():
            want = model(xx, None)
        for i, w in enumerate(want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(torch.from_numpy(got[f"{key}_{i}"]), w, **INT8_TOL)


def test_the_default_export_optimizes_the_graph(tmp_path):
    torch.manual_seed(1)
    _export_small(Small().eval(), tmp_path)


class Int8Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastnn.quantized.LSTM.from_float(nn.LSTM(F, H, proj_size=3, bidirectional=True))

    def forward(self, x, lengths):  # lengths: unused (the runner's two-input convention)
        out, (h, c) = self.lstm(x)
        return out, h, c


def test_int8_lstm_projection_exports(tmp_path):
    torch.manual_seed(2)
    model = Int8Projection().eval()
    out, h, c = model(torch.randn(2, 1, F), None)
    assert out.shape[-1] == 6 and h.shape[-1] == 3 and c.shape[-1] == H
    _export_small(model, tmp_path)


def test_the_users_model_is_not_modified(exported):
    model, before, _, _, _ = exported
    assert type(model.fp32.lstm) is nn.LSTM and type(model.fp32.cell) is nn.LSTMCell
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------
# What has no translation: an error naming the op and the module, before anything is written.

def _export_error(model, x, tmp_path, match):
    path = tmp_path / "bad.onnx"
    with pytest.raises(fastnn.onnx.UnsupportedError, match=match):
        fastnn.onnx.export(model, (x,), path)
    assert not path.exists()


def test_int8_moe_is_refused_by_name(tmp_path):
    moe = fastnn.quantize_dynamic(fastnn.MoE(8, 16, 4, 2).eval())
    _export_error(moe, torch.randn(5, 8), tmp_path, r"calls fastnn::int8_moe_mlp, which has no ONNX translation")


def test_an_op_without_translation_names_the_op_and_the_module(tmp_path, monkeypatch):
    monkeypatch.delitem(fastnn.onnx.TRANSLATIONS, "gru_seq")
    model = nn.Sequential(nn.Linear(F, F), nn.GRU(F, H)).eval()
    _export_error(model, torch.randn(4, 2, F), tmp_path, r"module '1' \(fastnn\.\S*GRU\) calls fastnn::gru_seq, "
                                                        r"which has no ONNX translation")


@pytest.mark.parametrize("case", ["projection", "training", "capacity", "grouped"])
def test_an_option_without_translation_names_it(tmp_path, case):
    x = torch.randn(4, 2, F)
    if case == "projection":
        model, match = nn.LSTM(F, H, proj_size=3).eval(), r"module '<root>'.*lstm_seq with an LSTM projection"
    elif case == "training":
        model = fastnn.LSTM(F, H, recurrent_dropout=0.5).train()
        match = r"lstm_seq with a dropout mask.*\.eval\(\)"
    else:
        opts = dict(capacity_factor=1.0) if case == "capacity" else dict(num_groups=2, topk_groups=1)
        model = nn.Sequential(fastnn.MoE(F, 6, 4, 2, **opts)).eval()
        match = r"module '0' \(fastnn\.\S*MoE\) calls fastnn::topk_gating with " + \
            ("capacity-limited" if case == "capacity" else "grouped") + " routing"
    _export_error(model, x, tmp_path, match)


def test_a_model_torch_export_cannot_capture_says_why(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # control flow on a value

    _export_error(DataDependent(), torch.randn(3), tmp_path, "torch.export could not capture the model")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="argument 'onnx.export: model'"):
        fastnn.onnx.export(object(), (), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="'dynamo'"):
        fastnn.onnx.export(nn.Linear(2, 2), (torch.randn(1, 2),), tmp_path / "m.onnx", dynamo=False)


def test_import_fastnn_does_not_import_onnx():
    proc = run_isolated("import sys, fastnn; print([m for m in ('onnx', 'onnxscript', 'onnxruntime', 'fastnn.onnx') "
                        "if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
