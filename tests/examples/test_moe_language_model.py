"""examples/moe_language_model.py --quick: it learns (finite losses that fall), prints progress while
it trains, and fastnn.MoE follows the Hugging Face-style loop step for step."""

import ast
import math
import re

from ._examples import EXAMPLES, load_example, one_thread  # noqa: F401 (a fixture)


def test_quick_run_learns_and_matches_the_loop(capsys, one_thread):
    module = load_example("moe_language_model")
    args = module.parse_args(["--quick", "--log-every", "4", "--quantize"])
    assert (args.steps, args.batch, args.ctx) == tuple(module.QUICK[k] for k in ("steps", "batch", "ctx"))
    fast, loop = module.run(args)
    out = capsys.readouterr().out
    assert len(re.findall(r"^  fastnn +step +\d+/\d+ +loss \d", out, re.M)) == args.steps // 4, out
    assert len(re.findall(r"^  hf_loop +step", out, re.M)) == args.steps // 4
    for r in (fast, loop):
        assert len(r["losses"]) == args.steps
        assert all(math.isfinite(v) for v in r["losses"] + [r["val_loss"]])
        # From the uniform guess over 256 bytes (ln 256 = 5.5) down by a clear margin.
        assert r["final_loss"] < r["first_loss"] - 1.0, r["losses"]
        assert r["val_loss"] < r["first_loss"] - 1.0
        assert abs(sum(r["expert_share"]) - 1) < 1e-5
    # Same initialisation, same batches, same routing: the curves agree to float rounding.
    assert max(abs(a - b) for a, b in zip(fast["losses"], loop["losses"])) < 1e-3
    assert "largest loss difference between fastnn and the HF loop" in out
    # --quantize: the layers quantize_dynamic supports (the MoE experts and the output Linear) in
    # int8, val loss within 1%
    q = fast["quantized"]
    types = next(line for line in out.splitlines() if line.startswith("quantized layer types: "))
    assert "Linear" in types and "MoE" in types and "fp32 against int8 dynamic" in out
    assert abs(q["int8"]["metric"] - q["fp32"]["metric"]) <= 0.01 * q["fp32"]["metric"], q
    assert q["int8"]["bytes"] < q["fp32"]["bytes"]


def test_every_flag_of_every_example_has_a_description():
    for path in sorted(EXAMPLES.glob("*.py")):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"]
        assert calls, f"{path.name} has no command-line flags"
        for call in calls:
            flag = ast.literal_eval(call.args[0])
            assert any(k.arg == "help" for k in call.keywords), f"{path.name}: {flag} has no help text"
