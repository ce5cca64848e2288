"""The alignment pipeline's own ``grpo`` phase (recipes/alignment/pipeline/pipeline-tiny.yaml, its real config: 32 rows
in groups of 4, prompts of 20 tokens left-padded and masked, 48 new tokens at temperature 1, on-policy, the rule's
reward, the k3 KL to the frozen reference at the default beta, the LM head frozen, a cosine learning rate) built as
``loom run`` builds it and planned as ``loom run`` plans it, trains on a gloo world exactly as in one process for three
steps: the same sampled tokens on every rank at every step (so each generating copy decoded with the trained weights
of the step before), losses, parameters and gradients; the policy's LM head stays the merged model's on every rank.
The phase reads the merged model; the recipe's tiny Llama stands in."""

from __future__ import annotations

import pytest
import torch

from orchestrator.pipeline import read_pipeline
from orchestrator.recipes import load_recipe
from planner.api import plan_job
from planner.pipeline import phase_job
from recipes.alignment import make
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer
from runtime.rollout import unpack

from _equivalence import RTOL, _compare_modules  # tests/integration/_equivalence.py

STEPS = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = make.write_model(tmp_path_factory.mktemp("grpophase") / "merged")  # the recipe's base model's config
    pipeline = read_pipeline(make.HERE / "pipeline" / "pipeline-tiny.yaml")
    phase = pipeline.phase("grpo")
    job = phase_job(pipeline.doc, phase.spec, pipeline.base, locate=lambda ref, sub: folder)
    return job.model_copy(update={"training": job.training.model_copy(update={"steps": STEPS})})


def test_the_pipelines_grpo_phase_on_workers_equals_one_process(job, tmp_path):
    task, = job.tasks
    rollout = next(u for u in task.components if u.mode == "generate")
    assert (task.loss, task.batch_size, rollout.samples, rollout.new_tokens, job.training.rollout_lag) == (
        "grpo_rule", 32, 4, 48, 0) and job.components["reference"].frozen
    assert task.loss_args == {"lm_head": "frozen"} and job.training.lr_schedule == "cosine"
    load_recipe(job)
    plan = plan_job(job, with_baselines=False).plan  # as `loom run` plans it
    op = next(op.id for op in plan.metaops if op.use == "rollout")
    generators = next(s.devices for w in plan.waves for s in w.slices if s.metaop == op)
    assert len(generators) == 2  # each rank decodes its own rows with its own copy of the policy

    world = run_world(job, plan, STEPS, tmp_path, keep_gradients=True, setup=load_recipe)
    reference = ReferenceTrainer(job)
    for step in range(STEPS):
        want = reference.train_step(step, keep_gradients=step == STEPS - 1)["grpo"]
        got = world.losses[step]["grpo"]
        assert abs(got - want) <= RTOL * max(abs(want), 1e-3), (step, got, want)
    want_rows = reference.last_rollouts[op]
    for rank in generators:
        first, rows = world.rollouts[rank][op]  # the last step's: decoded with the weights two updates on
        assert torch.equal(rows, want_rows[first:first + rows.shape[0]]), rank
    # the rule rewards a group's samples differently, so the advantages (and the policy gradient) are not all zero
    head = reference.head(0)
    scores = head.rule_scores(*unpack(want_rows, head.prompt_len, rollout.new_tokens))
    assert (scores.reshape(-1, rollout.samples).std(dim=1) > 0).any(), scores
    ref_params = reference.named_parameters()
    initial = ReferenceTrainer(job).named_parameters()
    for rank, params in world.parameters.items():
        _compare_modules(params, ref_params, f"rank {rank}")
        head_params = [n for n in params if n.startswith("head:grpo/0/policy.")]
        assert head_params and all(torch.equal(params[n], initial[n]) for n in head_params)  # frozen
        layers = [n for n in params if n.startswith("policy/")]
        assert layers and any(not torch.equal(params[n], initial[n]) for n in layers)  # trained
    for rank, grads in world.gradients.items():
        _compare_modules(grads, reference.last_gradients, f"rank {rank} gradient of")
