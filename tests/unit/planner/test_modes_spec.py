"""Use modes (train, forward, generate, sample) and weight hand-offs in the job spec: their fields, and one-line
errors for a mode its component cannot run, a samples count that does not divide the batch and a hand-off between
components of different shapes."""

from __future__ import annotations

import pytest

from planner.components import check_components
from planner.errors import SpecError
from planner.spec import parse_job


def grpo_job(**policy_gen) -> dict:
    """A GRPO-shaped job: the policy generates (a group of 4 per prompt), the reward model and the reference score
    the rollouts, the policy trains on them."""
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "seq_len": 16}
    gen = {"component": "policy", "name": "rollout", "mode": "generate", "new_tokens": 8, "samples": 4, **policy_gen}
    return {
        "name": "grpo",
        "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {"policy": llama, "reference": {**llama, "frozen": True}, "reward": {**llama}},
        "tasks": [{"name": "grpo", "batch_size": 8, "loss": "grpo", "components": [
            gen,
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "reference", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]},
        ]}],
    }


def check(data: dict):
    job = parse_job(data)
    check_components(job)
    return job


def error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        check(data)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_modes_parse_and_generate_outputs_are_detached():
    job = check(grpo_job())
    rollout, reward, reference, policy = job.tasks[0].components
    assert (rollout.mode, rollout.new_tokens, rollout.samples, rollout.temperature) == ("generate", 8, 4, 1.0)
    assert [u.mode for u in (reward, reference, policy)] == ["forward", "forward", "train"]
    assert rollout.detached and not reward.detached and not policy.detached


def test_sample_is_detached_unless_its_last_step_has_gradient():
    from planner.spec import TaskComponentSpec

    assert TaskComponentSpec(component="unet", mode="sample", denoise_steps=4).detached
    assert not TaskComponentSpec(component="unet", mode="sample", denoise_steps=4, grad_last_step=True).detached


def test_sample_stop_range_defaults_to_the_late_quarter_and_is_checked():
    from planner.spec import TaskComponentSpec

    use = TaskComponentSpec(component="unet", mode="sample", denoise_steps=40, grad_last_step=True)
    assert use.stop_range == (30, 39) and use.denoise_passes == 40 and use.scheduler == "ddpm"
    use = TaskComponentSpec(component="unet", mode="sample", denoise_steps=8, grad_last_step=True, stop_steps=(2, 4))
    assert use.stop_range == (2, 4) and use.denoise_passes == 5
    for fields, needle in [({"stop_steps": (2, 8), "grad_last_step": True}, "within 0..7"),
                           ({"stop_steps": (5, 4), "grad_last_step": True}, "within 0..7"),
                           ({"stop_steps": (2, 4)}, "only with grad_last_step"),
                           ({"mode": "train", "denoise_steps": None, "scheduler": "ddim"},
                            "`scheduler` of use 'unet' applies only to mode sample")]:
        with pytest.raises(ValueError, match=needle):
            TaskComponentSpec(**{"component": "unet", "mode": "sample", "denoise_steps": 8, **fields})


@pytest.mark.parametrize("use, needle", [
    ({"new_tokens": None}, "needs `new_tokens`"),
    ({"mode": "forward", "new_tokens": None}, "`samples` of use 'rollout' applies only to mode generate or sample"),
    ({"denoise_steps": 3}, "`denoise_steps` of use 'rollout' applies only to mode sample"),
])
def test_mode_fields_belong_to_their_mode(use, needle):
    data = grpo_job(**use)
    gen = data["tasks"][0]["components"][0]
    for key in [k for k, v in use.items() if v is None]:
        del gen[key]
    assert needle in error(data)


def test_generate_needs_a_vocabulary():
    data = grpo_job()
    del data["components"]["policy"]["vocab_size"]
    assert "tasks[0].components[0].mode ('generate'): component 'policy'" in error(data)
    assert "no vocabulary" in error(data)


def test_sample_needs_a_denoiser():
    data = grpo_job()
    data["tasks"][0]["components"][0] = {"component": "policy", "mode": "sample", "denoise_steps": 4}
    data["tasks"][0]["components"][1:] = []
    assert "is not a denoiser" in error(data)


def test_samples_must_divide_the_batch():
    data = grpo_job(samples=3)
    assert "samples (3) does not divide tasks[0].batch_size (8)" in error(data)


def test_micro_batches_keep_sample_groups_whole():
    """With micro-batches a generate use's groups must lie whole in one (GRPO normalises advantages within a group);
    micro-batches that hold whole groups are fine, one step off-policy too; a sample use takes one micro-batch."""
    data = grpo_job()
    data["training"] = {"grad_accum_steps": 2}
    assert check(data).training.grad_accum_steps == 2  # 4 rows a micro-batch: one group of 4
    data["training"] = {"grad_accum_steps": 4}
    assert error(data) == ("task 'grpo' use 'rollout': a micro-batch holds batch_size / grad_accum_steps = 2 rows, "
                           "which splits its groups of 4 samples (GRPO normalises advantages within a group). Make "
                           "batch_size / grad_accum_steps a multiple of samples.")
    data["training"] = {"grad_accum_steps": 2, "rollout_lag": 1}
    assert check(data).training.rollout_lag == 1
    data["training"] = {"grad_accum_steps": 2}
    data["tasks"][0]["components"][0] = {"component": "policy", "name": "rollout", "mode": "sample", "denoise_steps": 4}
    assert error(data) == ("training.grad_accum_steps (2) > 1 with a sample use (task 'grpo', use 'rollout'): its "
                           "denoising loop runs once over the whole batch. Set grad_accum_steps: 1.")


def test_weight_hand_off_needs_equal_shapes():
    data = grpo_job()
    data["components"]["generator"] = {**data["components"]["policy"], "weights_from": "policy"}
    check(data)  # same shape: fine
    data["components"]["generator"]["hidden_size"] = 64
    msg = error(data)
    assert "components.generator.weights_from ('policy')" in msg and "hidden_size is 64 here and 32" in msg
    data["components"]["generator"]["weights_from"] = "polcy"
    assert "did you mean 'policy'" in error(data).lower()
