"""The diffusion recipe's iteration pieces at test size: IterComp's feedback with the recipe's UNet and its reward
models raises their rewards of the same samples, a regenerated gallery ranks the UNet's images in, and the steps'
arguments are checked in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import recipes.diffusion  # noqa: F401  (registers the recipe)
from recipes.diffusion import generator, steps
from recipes.diffusion.gallery import rank
from recipes.diffusion.models import save_towers
from recipes.diffusion.scorers import RewardModels, load_job
from recipes.diffusion.shapes import CATEGORIES
from runtime.sample import build_scheduler

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "diffusion" / "itercomp-tiny.yaml"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The towers, a random UNet, and reward models at their initial weights over those towers."""
    import yaml

    folder = tmp_path_factory.mktemp("iteration")
    vision, text = save_towers(folder)
    data = yaml.safe_load(TINY.read_text())
    data["components"]["vision"]["pretrained"], data["components"]["text"]["pretrained"] = str(vision), str(text)
    for name in ("attribute_rm", "spatial_rm", "nonspatial_rm"):
        data["components"][name]["num_layers"] = 1
    spec = folder / "rm.yaml"
    spec.write_text(yaml.safe_dump(data))
    torch.manual_seed(0)
    return generator.load_unet(generator.save_unet(folder / "unet")), generator.load_text(text), \
        RewardModels(load_job(spec), normalise=False), folder, spec


def test_feedback_steps_raise_the_reward_models_scores_of_the_same_samples(parts):
    """Repeating one feedback step (same prompts, noise and stop step) raises the batch's mean own-category reward
    (what the summed hinge loss pushes; one sample's reward may dip while the others rise, since all share the UNet):
    the gradient reaches the UNet through the frozen scorers, the decoder and x0."""
    unet, text, rewards, _, _ = parts
    prompts = generator.training_prompts(0, 0, 3, CATEGORIES)  # one prompt per category
    config = generator.sample_config(4, (2, 3), 0)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in unet.parameters()]
    trace = [steps.feedback_update(unet, text, rewards, prompts, scheduler, config, 0, optimizer, pre_loss=0.0)
             for _ in range(3)]
    assert trace[0].shape == (3,)
    assert trace[1].mean() > trace[0].mean() and trace[2].mean() > trace[1].mean(), trace
    assert all(r.requires_grad is False for r in trace)
    assert not all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert all(not p.requires_grad for p in rewards.trainer.modules["head:attribute", 0].parameters())


def test_an_ensemble_of_reward_models_adds_each_members_hinge(parts):
    """With two reward models per category (an ensemble) the step's loss sums both members' hinges, and the rewards
    it returns are the members' mean of each sample's own category (checked against each member alone)."""
    unet, text, first, _, spec = parts
    second = RewardModels(load_job(spec), normalise=False)  # the job's seed gives the same weights: perturb them
    gen = torch.Generator().manual_seed(1)
    second.trainer.load_parameters({k: v + 0.5 * torch.randn(v.shape, generator=gen)
                                    for k, v in second.parameters().items()})
    prompts = generator.training_prompts(0, 1, 3, CATEGORIES)
    config = generator.sample_config(4, (2, 3), 0)
    scheduler = build_scheduler(config)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)  # no change: each call sees the same UNet

    def run(rewards):
        out = steps.feedback_update(unet, text, rewards, prompts, scheduler, config, 0, optimizer, 0.0)
        return out, torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

    (r1, g1), (r2, g2), (both, g) = run(first), run(second), run([first, second])
    assert torch.equal(unet.state_dict()["conv_in.weight"], state["conv_in.weight"])
    assert not torch.allclose(r1, r2) and g1.norm() < 1.0 and g.norm() < 1.0
    torch.testing.assert_close(both, (r1 + r2) / 2)
    torch.testing.assert_close(g, g1 + g2)


def test_the_reward_weight_scales_the_hinges_alone(parts):
    """``reward_weight`` multiplies the reward hinges and not the denoising loss: the gradient of the hinges plus the
    denoising loss is the hinges' alone plus the denoising loss's alone (weight 0, the bench's control)."""
    unet, text, rewards, _, _ = parts
    prompts = generator.training_prompts(0, 2, 3, CATEGORIES)
    config = generator.sample_config(4, (2, 3), 0)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)

    def grad(pre_loss, weight):
        unet.zero_grad(set_to_none=True)
        steps.feedback_update(unet, text, rewards, prompts, scheduler, config, 0, optimizer, pre_loss, weight)
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    both, hinges, denoising = grad(0.5, 1.0), grad(0.0, 1.0), grad(0.5, 0.0)
    assert hinges.norm() > 0 and denoising.norm() > 0 and both.norm() < 1.0  # under the step's gradient clip
    torch.testing.assert_close(both, hinges + denoising, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad(0.0, 2.0), 2 * hinges, rtol=1e-4, atol=1e-7)


def test_samples_of_the_unet_join_a_ranking(parts):
    unet, text, _, _, _ = parts
    prompts = generator.training_prompts(1, 0, 2, ("spatial",))
    images = generator.sample_images(unet, text, prompts, steps=2, seed=0, samples=2)
    assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = generator.sample_images(unet, text, prompts, steps=2, seed=0, samples=2)
    assert np.array_equal(images, again)  # seeded per (seed, prompt, sample)
    exact = generator.exact_images(prompts[:1], np.random.default_rng(0)).numpy() / 2 + 0.5
    ranking = rank(prompts[0], [exact[0], images[0], images[1]])
    assert ranking.places[0] == [0]  # the exact drawing outranks the untrained UNet's noise


def planned_feedback_job(folder: Path, spec: Path, model: Path, batch: int = 6, pre_loss: bool = False):
    """The feedback step as a trained phase's job (itercomp-pipeline-tiny.yaml's `feedback`): the frozen text tower,
    the recipe's UNet sampled cross-attending to it, x0 (pixels: no VAE) scored by the three reward models; with
    ``pre_loss`` the denoising task beside it."""
    from planner.spec import parse_job

    scorers = [{"kind": "reward_model", "spec": str(spec), "model": str(model), "args": {"category": c}}
               for c in CATEGORIES]
    denoise = [{"name": "denoise", "batch_size": batch, "loss": "mse", "components": [
        {"component": "text", "name": "prompt", "mode": "forward"}, {"component": "unet", "after": ["prompt"]}]}]
    return parse_job({
        "name": "feedback", "recipe": "diffusion", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"text": {"pretrained": str(folder / "text"), "frozen": True, "seq_len": generator.TEXT_LEN},
                       "unet": {"pretrained": str(folder / "unet")}},
        "tasks": [{"name": "feedback", "batch_size": batch, "loss": "feedback",
                   "feedback": {"vae": None, "scorers": scorers},
                   "components": [{"component": "text", "name": "prompt", "mode": "forward"},
                                  {"component": "unet", "mode": "sample", "scheduler": "ddim", "denoise_steps": 4,
                                   "stop_steps": [2, 3], "grad_last_step": True, "after": ["prompt"]}]}]
        + (denoise if pre_loss else []),
        "training": {"steps": 1, "lr": 1e-4, "precision": "fp32"},
    })


def test_the_feedback_phase_rows_are_the_driver_steps_prompts(parts):
    """A feedback task's rows are the prompts the driver's feedback step draws (seed + 1, the categories in turn), as
    tokens of its prompt use with each row's category; the denoising task's rows are exact latents of the same prompts,
    noised; any shard equals the same rows of the whole batch."""
    from recipes.diffusion.data import job_batch
    from recipes.diffusion.shapes import tokenize
    from runtime.unet import noise_key, timesteps_key

    _, _, _, folder, spec = parts
    job = planned_feedback_job(folder, spec, folder / "rm.pt", pre_loss=True)
    batch = job_batch(job, 0, 3, 2, 5)
    want = generator.training_prompts(job.training.seed + 1, 3, 5, CATEGORIES)[2:]
    assert torch.equal(batch.inputs["prompt"], torch.from_numpy(np.stack([tokenize(p.text, 10) for p in want])))
    assert batch.targets["category"].tolist() == [2, 0, 1] and batch.first_row == 2
    whole, shard = job_batch(job, 1, 3, 0, 6), job_batch(job, 1, 3, 4, 6)
    assert whole.inputs["unet"].shape == (6, 3, generator.LATENT, generator.LATENT)
    for key in ("prompt", "unet"):
        assert torch.equal(whole.inputs[key][4:], shard.inputs[key])
    assert torch.equal(whole.targets[noise_key("unet")][4:], shard.targets[noise_key("unet")])
    t = whole.targets[timesteps_key("unet")]
    assert t.dtype == torch.long and len(set(t.tolist())) > 1 and not torch.equal(whole.inputs["unet"][0],
                                                                                   whole.inputs["unet"][1])


def test_the_planned_feedback_step_with_reward_model_scorers_equals_one_process(parts, tmp_path):
    """The recipe's feedback step planned and placed: the text tower on worker 0, the UNet sampling data parallel on
    both (3 prompts each, the categories in turn), each worker's x0 scored by the three reward models, only a row's own
    category's pushing (recipes.diffusion.feedback): losses, parameters and gradients equal one process's."""
    from runtime.reference import save_model

    from _equivalence import check_equivalence, placed_plan  # tests/integration/_equivalence.py

    _, _, rewards, folder, spec = parts
    save_model(folder / "rm.pt", [rewards.parameters()])
    job = planned_feedback_job(folder, spec, folder / "rm.pt")
    plan = placed_plan(job, [[("prompt", [0])], [("unet", [0, 1])]])
    world = check_equivalence(job, plan, tmp_path, steps=1)
    assert world.losses[0]["feedback"] > 0
    assert any(n.startswith("unet") for n in world.gradients[1])


@pytest.mark.parametrize("scorer, message", [
    ({"args": {"category": "colour"}}, "tasks[0].feedback.scorers[0] (reward_model): args ({'category': 'colour'}): "
     "give only category, one of attribute"),
    ({"spec": "no/such.yaml"}, "no/such.yaml): no such file; name the reward models' job spec"),
    ({"model": "no/such/model.pt"}, "no model.pt there or up to two folders above"),
])
def test_bad_reward_model_scorers_are_one_line(parts, scorer, message):
    from runtime.checks import check_trainable

    _, _, _, folder, spec = parts
    job = planned_feedback_job(folder, spec, folder / "rm.pt")
    data = job.model_dump()
    data["tasks"][0]["feedback"]["scorers"][0].update(scorer)
    from planner.spec import parse_job

    with pytest.raises(ValueError) as err:
        check_trainable(parse_job(data))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("step, args, message", [
    ("feedback", {"unet": "u", "text": "t", "spec": "s"}, "rm: required argument of step 'feedback'"),
    ("feedback", {"unet": "@b/model", "text": "@b/model", "spec": "@x/y", "rm": "@r/checkpoint", "steps": 0},
     "steps (0): step 'feedback' expects a positive int"),
    ("feedback", {"unet": "@b/model", "text": "@b/model", "spec": "@x/y", "rm": "@r/checkpoint", "pre_loss": -0.1},
     "pre_loss (-0.1): step 'feedback' expects a non-negative float"),
    ("denoise", {"unet": "no/such/folder", "text": "@a/model"}, "unet ('no/such/folder'): no such file or folder"),
    ("denoise", {"unet": "@a/model", "text": "@a/model", "schedule": "linear"},
     "schedule ('linear'): step 'denoise' expects one of constant, cosine"),
    ("regenerate", {"unet": "@f/model", "text": "@f/model", "sample": 2}, "sample: unknown argument of step"),
    ("compare", {"before": "@b/model", "after": "no/such", "text": "@b/model", "spec": "@s/x", "rm": "@r/checkpoint"},
     "after ('no/such'): no such file or folder"),
])
def test_bad_step_arguments_are_one_line(step, args, message, tmp_path):
    """Each argument error is one line naming the argument (and a feedback without the denoising loss, pre_loss 0,
    and a cosine base are accepted: the settings docs/recipes/diffusion.md measures)."""
    check = {"feedback": steps.check_feedback, "denoise": steps.check_denoise, "regenerate": steps.check_regenerate,
             "compare": steps.check_compare}
    with pytest.raises(ValueError) as err:
        check[step](args, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    steps.check_feedback({"unet": "@b/model", "text": "@b/model", "spec": "@x/y", "rm": "@r/checkpoint",
                          "pre_loss": 0.0}, tmp_path)
    steps.check_denoise({"unet": "@a/model", "text": "@a/model", "schedule": "cosine"}, tmp_path)
