"""`import fastnn` is cheap and quiet: it adds at most 0.3 s to `import torch`, pulls in none of the
heavy optional modules (they load on first use), and prints nothing."""

import json

import pytest

from fastnn.testing import run_isolated

# Imported on first use only (unless `import torch` itself already did): torch.compile's machinery
# (over a second), Triton (its compiler and driver), torch.distributed, the compiled library and
# Hugging Face transformers, and the ONNX and AOTInductor export machinery.
LAZY = ("torch._dynamo", "triton", "torch.distributed", "fastnn._C", "transformers", "fastnn.distributed",
        "onnx", "onnxscript", "onnxruntime", "fastnn.onnx", "torch._inductor", "fastnn.aoti")

PROBE = """
import json, sys, time
if %r:
    sys.modules["triton"] = None  # as on torch's CPU wheels, where Triton is not installed
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
by_torch = set(sys.modules)
import fastnn
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "fastnn": t2 - t1,
                  "loaded": [m for m in %r if m in sys.modules and m not in by_torch]}))
"""


def _probe(without_triton: bool = False) -> dict:
    proc = run_isolated(PROBE % (without_triton, LAZY), env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"import fastnn printed to stderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("without_triton", [False, True], ids=["with-triton", "without-triton"])
def test_import_loads_nothing_heavy_and_prints_nothing(without_triton):
    result = _probe(without_triton)
    assert result["loaded"] == [], f"import fastnn imported {result['loaded']} eagerly"


def test_import_adds_at_most_0_3_s_to_import_torch():
    # The best of three fresh processes: the machine may be busy, and a busy machine only slows it.
    added = min(_probe()["fastnn"] for _ in range(3))
    assert added <= 0.3, f"import fastnn took {added:.2f} s after import torch (goal: <= 0.3 s)"
