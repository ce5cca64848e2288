"""IterComp's feedback step as a planned DAG (recipes.diffusion.feedback_loss): the text tower, the UNet's sampling
loop, the vision tower reading its x0 and the three scoring transformers (starting from a reward-model run's
weights, init_from) are MetaOps, and the loss itercomp_feedback applies the run's score heads and the hinge. In one
process it computes what the reward_model scorers compute (same loss, rewards and UNet gradients); planned on 2 gloo
workers it equals one process; a task that does not fit is refused in one line."""

from __future__ import annotations

import re

import pytest
import torch

import recipes.diffusion  # noqa: F401  (registers the recipe)
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from recipes.diffusion import generator
from recipes.diffusion.shapes import CATEGORIES
from runtime.reference import ReferenceTrainer, save_model

from test_diffusion_iteration import parts, planned_feedback_job  # noqa: F401  (the towers, UNet and rm.yaml)


def dag_job(folder, model, batch: int = 6, **change):
    """The planned-DAG form of planned_feedback_job's task: same towers, UNet, sampling and prompts."""
    scorer = {"kind": "transformer", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "init_from": str(model)}
    data = {
        "name": "feedback-dag", "recipe": "diffusion",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"text": {"pretrained": str(folder / "text"), "frozen": True, "seq_len": generator.TEXT_LEN},
                       "vision": {"pretrained": str(folder / "vision"), "frozen": True},
                       "unet": {"pretrained": str(folder / "unet")},
                       **{f"{c}_rm": dict(scorer) for c in CATEGORIES}},
        "tasks": [{"name": "feedback", "batch_size": batch, "loss": "itercomp_feedback", "components": [
            {"component": "text", "name": "prompt", "mode": "forward"},
            {"component": "unet", "mode": "sample", "scheduler": "ddim", "denoise_steps": 4, "stop_steps": [2, 3],
             "grad_last_step": True, "after": ["prompt"]},
            {"component": "vision", "name": "image", "mode": "forward", "after": ["unet"]},
            *({"component": f"{c}_rm", "name": c, "mode": "forward", "after": ["image", "prompt"], "seq_len": 75}
              for c in CATEGORIES)]}],
        "training": {"steps": 1, "lr": 1e-4, "precision": "fp32"},
    }
    for path, value in change.items():  # e.g. tasks__0__loss_args={"margin": 1}
        *keys, last = path.split("__")
        target = data
        for key in keys:
            target = target[int(key) if key.isdigit() else key]
        target[last] = value
    return parse_job(data)


@pytest.fixture(scope="module")
def model(parts):  # noqa: F811
    _, _, rewards, folder, _ = parts
    gen = torch.Generator().manual_seed(3)  # not the seeded initialisation: init_from must be what loads them
    params = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if "_rm" in k or k.startswith("head:") else v
              for k, v in rewards.parameters().items()}
    save_model(folder / "rm-dag.pt", [params])
    return folder / "rm-dag.pt"


def test_the_planner_places_and_prices_every_reward_model_part(parts, model):  # noqa: F811
    _, _, _, folder, _ = parts
    graph = build_metagraph(dag_job(folder, model))
    ops = {op.use: op for op in graph.metaops}
    assert set(ops) == {"prompt", "unet", "image", *CATEGORIES}
    assert ops["image"].deps == (ops["unet"].id,) and ops["image"].input_modules == ("embed:vision",)
    for c in CATEGORIES:  # frozen, forward: no weight gradient, the input gradient flows back (priced as a forward)
        assert ops[c].frozen and ops[c].backward_factor == 1.0
        assert set(ops[c].deps) == {ops["image"].id, ops["prompt"].id}
    assert ops["prompt"].backward_factor == 0.0  # nothing trains upstream of the text tower


def test_the_dag_loss_equals_the_reward_model_scorers(parts, model):  # noqa: F811
    """Same prompts, noise and stop step: the DAG's loss, its rewards and the UNet's gradients are the scorer
    version's (the scorers rebuild the whole reward models from the same file; the DAG runs them as MetaOps)."""
    _, _, _, folder, spec = parts
    dag, scored = ReferenceTrainer(dag_job(folder, model)), ReferenceTrainer(planned_feedback_job(folder, spec, model))
    for trainer in (dag, scored):
        trainer.task_loss(0, 0).backward()
    want = scored.head(0).last_rewards
    got = dag.head(0).last_rewards
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got < 2.0).any()  # some row's own model scores below the margin: the hinge pushes
    grads = lambda t: {n: p.grad for (g, _), m in t.modules.items() if g.startswith(("unet", "embed:unet"))  # noqa
                       for n, p in m.named_parameters(prefix=g) if p.grad is not None}
    g_dag, g_scored = grads(dag), grads(scored)
    assert set(g_dag) == set(g_scored) and g_dag
    for name in g_dag:
        torch.testing.assert_close(g_dag[name], g_scored[name], rtol=1e-4, atol=1e-9)
    head = dag.modules[("head:feedback", 0)]
    assert not any(p.requires_grad for p in head.score.parameters())
    assert not any(p.grad is not None for (g, _), m in dag.modules.items() if g.endswith("_rm")
                   for p in m.parameters())


def test_the_planned_dag_on_two_workers_equals_one_process(parts, model, tmp_path):  # noqa: F811
    """The text tower on worker 0, the UNet sampling on both, the vision tower on worker 1 (x0 crosses, its
    gradient comes back), the scoring transformers split between the two."""
    from _equivalence import check_equivalence, placed_plan  # tests/integration/_equivalence.py

    _, _, _, folder, _ = parts
    job = dag_job(folder, model)
    plan = placed_plan(job, [[("prompt", [0])], [("unet", [0, 1])], [("image", [1])],
                             [("attribute", [0]), ("spatial", [1])], [("nonspatial", [0, 1])]])
    world = check_equivalence(job, plan, tmp_path, steps=1)
    assert world.losses[0]["feedback"] > 0
    assert any(n.startswith("unet") for n in world.gradients[1])


@pytest.mark.parametrize("change, message", [
    ({"tasks__0__components__3__name": "colour"}, "loss itercomp_feedback reads one scoring use per category, named "
     "attribute, spatial, nonspatial, as its leaves; its leaves are ['colour', 'spatial', 'nonspatial']"),
    ({"tasks__0__components__4__after": ["prompt", "image"]}, "scoring use 'spatial' reads ['prompt', 'image']; it "
     "reads the image use (after: [<the sample use>]) then the prompt"),
    ({"components__spatial_rm__init_from": None}, "scoring use 'spatial' runs the trained reward model: mode forward, "
     "and its component 'spatial_rm' with init_from"),
    ({"tasks__0__loss_args": {"margin": "two"}}, "loss itercomp_feedback takes margin and scale, numbers >= 0"),
    ({"components__spatial_rm__init_from": "no/such/ckpt"}, "components.spatial_rm.init_from: "),
])
def test_a_dag_task_that_does_not_fit_is_one_line(parts, model, change, message):  # noqa: F811
    from orchestrator.recipes import load_recipe
    from runtime.checks import check_trainable
    from runtime.heads import registered_losses

    _, _, _, folder, _ = parts
    job = dag_job(folder, model, **change)
    load_recipe(job)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        check_trainable(job, registered_losses())
    assert "\n" not in str(err.value)


def test_a_component_init_from_another_jobs_model_is_one_line(parts, tmp_path):  # noqa: F811
    _, _, _, folder, _ = parts
    save_model(tmp_path / "other.pt", [{"spatial_rm/0/attention.weight": torch.zeros(3)}])
    job = dag_job(folder, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=re.escape("components.attribute_rm.init_from")) as err:
        ReferenceTrainer(job)
    assert "is missing in" in str(err.value) and "\n" not in str(err.value)
