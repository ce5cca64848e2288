"""recipes.alignment.merge: each method on hand-made tensors, identity on identical models, folders that load."""

from __future__ import annotations

import math

import pytest
import torch

from planner.spec import parse_job
from recipes.alignment import make
from recipes.alignment.merge import MergeError, main, merge_folders, merge_tensors, stock_ratio
from runtime.pretrained import read_tensors
from planner.pretrained import tensor_files

BASE = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([0.0, 0.0])}
A = {"w": torch.tensor([[3.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([1.0, 0.0])}  # deltas: w +2 at [0,0], b +1 at 0
B = {"w": torch.tensor([[1.0, 0.0], [0.0, 5.0]]), "b": torch.tensor([2.0, 0.0])}  # w +4 at [1,1], b +2 at 0


def test_linear_is_the_weighted_mean():
    out = merge_tensors("linear", [A, B], BASE, weights=[3, 1])
    torch.testing.assert_close(out["w"], torch.tensor([[2.5, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([1.25, 0.0]))


def test_task_arithmetic_adds_the_scaled_deltas():
    out = merge_tensors("task_arithmetic", [A, B], BASE, scale=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # base + 0.5 * (+2, +4)
    torch.testing.assert_close(out["b"], torch.tensor([1.5, 0.0]))


def test_model_stock_interpolates_by_the_angle_between_deltas():
    # w: orthogonal deltas, cos 0 -> t 0: the base; b: parallel deltas, cos 1 -> t 1: the average
    assert stock_ratio([A["w"], B["w"]], BASE["w"]) == pytest.approx(0.0)
    assert stock_ratio([A["b"], B["b"]], BASE["b"]) == pytest.approx(1.0)
    out = merge_tensors("model_stock", [A, B], BASE)
    torch.testing.assert_close(out["w"], BASE["w"])
    torch.testing.assert_close(out["b"], torch.tensor([1.5, 0.0]))
    # 60 degrees apart: cos 1/2, k = 2 -> t = 2 * 0.5 / (1 + 0.5) = 2/3 of the way from the base to the average
    base = torch.zeros(2)
    models = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])]
    assert stock_ratio(models, base) == pytest.approx(2 / 3)
    out = merge_tensors("model_stock", [{"x": m} for m in models], {"x": base})["x"]
    torch.testing.assert_close(out, 2 / 3 * (models[0] + models[1]) / 2)
    # three models, pairwise cosines 1, 0, 0: mean cos 1/3 -> t = 3 (1/3) / (1 + 2/3) = 3/5
    three = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])]
    assert stock_ratio(three, base) == pytest.approx(0.6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "model_stock"])
def test_merging_identical_models_is_the_identity(method):
    for base in (BASE, A):  # fine-tuned away from the base, and not at all (zero deltas)
        out = merge_tensors(method, [A, A, A], base, weights=[1 / 3] * 3 if method == "task_arithmetic" else None)
        for name in A:
            torch.testing.assert_close(out[name], A[name])


def test_bad_weights_are_refused():
    with pytest.raises(MergeError, match="one weight per model"):
        merge_tensors("linear", [A, B], BASE, weights=[1.0])
    with pytest.raises(MergeError, match="not a merge method"):
        merge_tensors("ties", [A, B], BASE)


def test_merged_folder_loads_as_a_pretrained_component(tmp_path):
    from transformers import AutoModelForCausalLM

    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    base = make.write_model(tmp_path / "base", seed=0, **small)
    parents = [make.write_model(tmp_path / f"sft{i}", seed=i + 1, **small) for i in range(2)]
    out = merge_folders("model_stock", tmp_path / "merged", base, parents)
    names = sorted(tensor_files(base))
    merged, b = read_tensors(out, names), read_tensors(base, names)
    p = [read_tensors(x, names) for x in parents]
    for name in names:
        t = stock_ratio([p[0][name], p[1][name]], b[name])
        torch.testing.assert_close(merged[name], t * (p[0][name] + p[1][name]) / 2 + (1 - t) * b[name])
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], merged["model.norm.weight"])
    job = parse_job({"name": "next", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
                     "components": {"llm": {"pretrained": str(out), "seq_len": 16}},
                     "tasks": [{"name": "sft", "batch_size": 2, "loss": "lm", "components": [{"component": "llm"}]}]})
    assert job.components["llm"].hidden_size == 32 and job.components["llm"].num_layers == 1
    same = merge_folders("linear", tmp_path / "same", base, [base, base])  # identical models: the same weights
    for name, tensor in read_tensors(same, names).items():
        torch.testing.assert_close(tensor, b[name])


def test_mismatched_models_and_missing_folders_are_one_line_errors(tmp_path, capsys):
    base = make.write_model(tmp_path / "base", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    wider = make.write_model(tmp_path / "wider", num_hidden_layers=1, hidden_size=64, intermediate_size=64)
    deeper = make.write_model(tmp_path / "deeper", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    with pytest.raises(MergeError, match=r"models\[0\] .*has shape"):
        merge_folders("linear", tmp_path / "out", base, [wider])
    with pytest.raises(MergeError, match=r"models\[0\] .*tensors differ from the base"):
        merge_folders("linear", tmp_path / "out", base, [deeper])
    capsys.readouterr()  # what saving the models printed
    assert main(["linear", str(tmp_path / "out"), str(base), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models[0]") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_merge_step_writes_the_phase_model_and_checks_its_args(tmp_path):
    from orchestrator.recipes import import_recipe
    from orchestrator.steps import STEPS, StepContext, check_step_args
    from planner.errors import SpecError
    from recipes.alignment import merge as _registered

    import_recipe("alignment")  # registers the recipe's PHASE_STEPS, as loom does for a job naming the recipe

    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    base = make.write_model(tmp_path / "base", seed=0, **small)
    parents = [make.write_model(tmp_path / f"sft{i}", seed=i + 1, **small) for i in range(2)]
    args = {"method": "task_arithmetic", "component": "policy", "base": "base", "models": ["sft0", "@sft1/model"],
            "scale": 0.5}
    check_step_args("merge", args, "phases[2].args", tmp_path)  # a reference is the pipeline's to check
    ctx = StepContext("merge", args | {"models": [str(p) for p in parents]}, tmp_path / "out" / "merge", tmp_path)
    assert STEPS["merge"].run is _registered.merge_step
    STEPS["merge"].run(ctx)
    names = sorted(tensor_files(base))
    merged = read_tensors(tmp_path / "out" / "merge" / "export" / "policy", names)
    expected = merge_tensors("task_arithmetic", [read_tensors(p, names) for p in parents], read_tensors(base, names),
                             scale=0.5)
    for name in names:
        torch.testing.assert_close(merged[name], expected[name])
    for bad, match in [({"method": "ties"}, r"phases\[2\]\.args\.method \('ties'\): expected one of linear"),
                       ({"base": "nowhere"}, r"args\.base \('nowhere'\): no such folder"),
                       ({"scale": "big"}, r"args\.scale \('big'\): expected a finite number"),
                       ({"scale": math.inf}, r"args\.scale \(inf\): expected a finite number"),
                       ({"weights": [math.inf, 1]}, r"args\.weights \(\[inf, 1\]\): expected 2 finite numbers"),
                       ({"models": ["sft0"]}, r"args\.models .*2 or more"),
                       ({"extra": 1}, r"args\.extra: unknown argument of step 'merge'")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("merge", args | bad, "phases[2].args", tmp_path)
    check_step_args("merge", args, "phases[2].args", tmp_path, {"policy": {}, "reference": {}})
    with pytest.raises(SpecError, match=r"^phases\[2\]\.args\.component \('polcy'\): not a component of the job "
                                        r"\(step 'merge' writes .*; did you mean 'policy'\?$"):
        check_step_args("merge", args | {"component": "polcy"}, "phases[2].args", tmp_path, {"policy": {}})
