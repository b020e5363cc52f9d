"""fastnn.convert / fastnn.revert on plain torch models: shared modules stay shared, hooks survive,
a failed swap leaves the model as it was, the report names what was swapped and what was left
alone, and the registry is a leaf module (no import cycle)."""

import ast
import pathlib
import warnings

import pytest
import torch
from torch import nn

import fastnn
from fastnn import testing

ROOT = pathlib.Path(fastnn.__file__).parent


def _lstm():
    return nn.LSTM(4, 8, batch_first=True)


def test_shared_module_converted_once_and_kept_shared():
    lstm = _lstm()
    model = nn.ModuleDict({"a": lstm, "b": lstm, "seq": nn.Sequential(lstm)})
    n_params = len(list(model.parameters()))
    fastnn.convert(model)
    assert isinstance(model["a"], fastnn.LSTM)
    assert model["a"] is model["b"] is model["seq"][0]
    assert len(list(model.parameters())) == n_params
    # A change through one name is seen through the other, as in torch.
    model["a"].hidden_size_note = 1
    assert model["b"].hidden_size_note == 1
    fastnn.revert(model)
    assert type(model["a"]) is nn.LSTM
    assert model["a"] is model["b"] is model["seq"][0]


def test_shared_module_report_lists_it_once():
    lstm = _lstm()
    model = nn.ModuleDict({"a": lstm, "b": lstm})
    out = fastnn.convert.report(model)
    assert [e.path for e in out.swapped] == ["a"]
    assert type(model["a"]) is nn.LSTM  # report() converts nothing


def test_root_module_converted():
    lstm = _lstm()
    fast = fastnn.convert(lstm)
    assert isinstance(fast, fastnn.LSTM)
    assert fastnn.convert(fast) is fast  # converting twice changes nothing
    assert type(fastnn.revert(fast)) is nn.LSTM


def test_hooks_survive_convert_and_revert():
    calls = []
    model = nn.Sequential(_lstm())
    handle = model[0].register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    x = torch.randn(2, 3, 4)
    fastnn.convert(model)
    model(x)
    assert calls == ["LSTM"] and isinstance(model[0], fastnn.LSTM)
    model[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    fastnn.revert(model)
    model(x)
    assert calls == ["LSTM", "pre", "LSTM"] and type(model[0]) is nn.LSTM
    handle.remove()
    fastnn.convert(model)
    model(x)
    assert calls == ["LSTM", "pre", "LSTM", "pre"]


def test_failed_revert_leaves_model_unchanged():
    # The second layer cannot be reverted (torch has no layer-normalised LSTM): the first must not be
    # reverted either, or the model would be left half swapped.
    model = nn.Sequential(fastnn.LSTM(4, 8), fastnn.LSTM(8, 8, layer_norm=True))
    with pytest.raises(ValueError, match="layer_norm"):
        fastnn.revert(model)
    assert isinstance(model[0], fastnn.LSTM) and isinstance(model[1], fastnn.LSTM)


def test_names_attribute_on_the_function():
    names = fastnn.convert.names()
    assert {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "hf_mixtral"} <= set(names)
    assert "names()" in fastnn.convert.__doc__
    model = nn.Sequential(_lstm(), nn.GRU(8, 8))
    fastnn.convert(model, only=["GRU"])
    assert type(model[0]) is nn.LSTM and isinstance(model[1], fastnn.GRU)
    with pytest.raises(ValueError, match="unknown"):
        fastnn.convert(model, only=["lstm"])
    with pytest.raises(TypeError, match="only"):
        fastnn.convert(model, only="LSTM")


def test_report_names_swapped_and_left_alone(capsys):
    class MyLSTM(nn.LSTM):  # a subclass may have its own forward: fastnn leaves it alone
        pass

    model = nn.Sequential(_lstm(), MyLSTM(8, 8), nn.Linear(8, 2), fastnn.GRU(2, 2))
    out = fastnn.convert.report(model)
    by_path = {e.path: e for e in out}
    assert by_path["0"].action == "converted" and by_path["0"].after == "fastnn.nn.rnn.LSTM"
    assert by_path["1"].action == "left alone" and "subclass" in by_path["1"].reason
    assert by_path["3"].action == "fastnn"
    assert "2" not in by_path  # nothing fastnn knows about: not listed
    with pytest.warns(UserWarning, match=r"1 module\(s\) left unconverted: 1 \(.*MyLSTM\): .*subclass"):
        fastnn.convert(model, report=True)
    printed = capsys.readouterr().out
    assert "1 module(s) swapped, 1 left alone" in printed and "MyLSTM" in printed
    fastnn.revert(model, report=True)
    assert "reverted" in capsys.readouterr().out


def test_report_of_a_converted_model_counts_nothing_as_swapped(capsys):
    """Converting twice: the second report says the layers were fastnn's already, swaps none."""
    model = fastnn.convert(nn.Sequential(_lstm(), nn.Linear(8, 2), nn.GRU(2, 2)))
    before = list(model)
    assert fastnn.convert(model, report=True) is model and list(model) == before
    printed = capsys.readouterr().out
    assert printed.startswith("fastnn: 0 module(s) swapped, 0 left alone, 2 already fastnn's"), printed
    assert "converted" not in printed and printed.count("already fastnn ") == 2, printed
    out = fastnn.convert.report(model)
    assert out.swapped == [] and [e.path for e in out.already_fastnn] == ["0", "2"]


def test_nothing_to_report_is_quiet():
    model = nn.Sequential(nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastnn.convert(model)
        fastnn.convert(model, only=["GRU"], report=False)
    assert "nothing to convert" in str(fastnn.convert.report(model))


def test_not_selected_is_reported_without_warning():
    model = nn.Sequential(_lstm())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastnn.convert.report(model, only=["GRU"])
        fastnn.convert(model, only=["GRU"])
    assert out.left_alone[0].reason.startswith("not selected")


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model"):
        fastnn.convert(torch.randn(2))


def _module_level_imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:  # module level only: an import inside a function is not a cycle at import
        if isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def test_registry_is_a_leaf_and_families_do_not_import_the_converter():
    leaf = _module_level_imports(ROOT / "convert_registry.py")
    assert not [m for m in leaf if m.startswith(".") or m.startswith("fastnn")], leaf
    for path in [*(ROOT / "nn" / "rnn").glob("*.py"), ROOT / "nn" / "moe.py", *(ROOT / "integrations").glob("*.py")]:
        imports = _module_level_imports(path)
        assert not [m for m in imports if m in ("..convert", "...convert", "fastnn.convert")], (path, imports)


def test_converter_import_errors_are_not_hidden():
    # A broken fastnn integration must raise, not silently drop its conversions.
    code = ("import sys\n"
            "sys.modules['fastnn.integrations.hf_moe'] = None  # importing it raises ImportError\n"
            "import fastnn, torch\n"
            "try:\n"
            "    fastnn.convert(torch.nn.Linear(1, 1))\n"
            "except ImportError:\n"
            "    print('raised')\n")
    proc = testing.run_isolated(code)
    assert proc.returncode == 0, proc.stderr
    assert "raised" in proc.stdout


def test_distributed_reachable_after_import_fastnn_without_eager_import():
    code = ("import sys, fastnn\n"
            "assert 'fastnn.distributed' not in sys.modules, 'imported eagerly'\n"
            "print(fastnn.distributed.ExpertParallelMoE.__name__)\n")
    proc = testing.run_isolated(code)
    assert proc.returncode == 0, proc.stderr
    assert "ExpertParallelMoE" in proc.stdout


# -- property: any tree of modules, shared or not, keeps its shape and Parameters ---------------

_LEAVES = {"LSTM": lambda: nn.LSTM(2, 3), "GRU": lambda: nn.GRU(2, 3), "RNN": lambda: nn.RNN(2, 3),
           "LSTMCell": lambda: nn.LSTMCell(2, 3), "GRUCell": lambda: nn.GRUCell(2, 3),
           "Linear": lambda: nn.Linear(2, 3)}


def _shape(model):
    """(path, class) of every name, the sharing (index of the first name of the same object), and
    the Parameter objects in order, duplicates included."""
    named = list(model.named_modules(remove_duplicate=False))
    first = {}
    sharing = [first.setdefault(id(m), i) for i, (_, m) in enumerate(named)]
    params = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    return [(path, type(m)) for path, m in named], sharing, params


@pytest.mark.fuzz
def test_fuzz_convert_revert_keep_sharing_and_parameters():
    st = pytest.importorskip("hypothesis.strategies")
    from hypothesis import given

    @st.composite
    def trees(draw):
        pool = [_LEAVES[k]() for k in draw(st.lists(st.sampled_from(sorted(_LEAVES)), min_size=1, max_size=4))]

        def build(depth):
            kind = draw(st.sampled_from(["leaf", "seq", "dict", "list"] if depth < 3 else ["leaf"]))
            if kind == "leaf":
                return draw(st.sampled_from(pool))
            kids = [build(depth + 1) for _ in range(draw(st.integers(0, 3)))]
            node = {"seq": lambda: nn.Sequential(*kids), "list": lambda: nn.ModuleList(kids),
                    "dict": lambda: nn.ModuleDict({f"k{i}": k for i, k in enumerate(kids)})}[kind]()
            if draw(st.booleans()):
                pool.append(node)  # a container shared by later parents
            return node

        return build(0)

    @given(trees())
    def check(model):
        names, sharing, params = _shape(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing here is left alone
            fast = fastnn.convert(model)
        f_names, f_sharing, f_params = _shape(fast)
        assert f_sharing == sharing and f_params == params
        for (path, before), (_, after) in zip(names, f_names):
            assert after is before if before.__module__.startswith("torch.nn.modules.container") or \
                before is nn.Linear else after is getattr(fastnn, before.__name__), path
        back = fastnn.revert(fast)
        assert _shape(back) == (names, sharing, params)

    check()
