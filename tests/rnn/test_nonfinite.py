"""NaN and inf in the input propagate through fastnn's recurrent layers as through torch's: the
affected batch row becomes NaN from that step on, and no other row changes."""

import pytest
import torch

import fastnn


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("hidden", [16, 19])  # vector lanes only, and lanes plus a scalar tail
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_propagates_as_in_torch(kind, hidden, bad):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, hidden, num_layers=2)
    layer = getattr(fastnn, kind)(5, hidden, num_layers=2)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    x[2, 1, 3] = bad
    with torch.no_grad():
        want, got = ref(x)[0], layer(x)[0]
    assert torch.equal(got.isnan(), want.isnan()), f"NaN pattern differs: {got.isnan().any(-1)} vs {want.isnan().any(-1)}"
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)
