"""Checking a distributed run against single-process training (shared by the equivalence tests)."""

from __future__ import annotations

import torch

from orchestrator.recipes import load_recipe
from planner.api import plan_placed, plan_schedule
from planner.costmodel import Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Schedule, Slice, Wave
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer

STEPS = 3
RTOL = 1e-5
# the last of several steps' gradients: AdamW's first update moves every element by about lr * sign(g), so an element
# whose gradient is a cancelling sum near zero takes the sign of its float32 rounding, and later gradients carry that
# noise (measured on the UNet test below: the first step's gradients within 6e-7, the third's within 1.4-2.9e-5)
LATER_GRAD_RTOL = 1e-4


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Relative error of a parameter vector, ||got - want|| / ||want|| (2-norms). Element-wise ratios are
    not a meaningful target under AdamW: an element whose gradient is a cancelling sum near zero gets an
    update lr * g / (sqrt(v) + eps), which turns float-level differences in g into visible ones."""
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def plan_from_waves(job, waves: list[list[tuple[str, int, int]]]):
    """A Plan for a hand-made schedule: waves of (MetaOp name, layers, devices)."""
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    schedule = Schedule(tuple(Wave(tuple(Slice(ids[name], layers, n) for name, layers, n in wave)) for wave in waves))
    return plan_schedule(job, schedule, method="hand-made")


def placed_plan(job, waves: list[list[tuple]]):
    """A Plan placing ``waves`` of (use, devices) or (use, devices, tensor_parallel) exactly as given: each use's whole
    MetaOp (a use names one MetaOp, or name it as ``task.use``), data parallel over its devices (in TP groups of
    ``tensor_parallel`` consecutive ones)."""
    ops = {key: op for op in build_metagraph(job).metaops for key in (op.use, op.name)}
    return plan_placed(job, PlacedSchedule(tuple(PlacedWave(tuple(
        PlacedSlice(ops[use].id, 0, ops[use].num_layers, tuple(devs), Layout(len(devs) // tp, tp))
        for use, devs, tp in ((*entry, 1)[:3] for entry in wave))) for wave in waves)), method="hand-made")


def check_equivalence(job, plan, tmp_path, steps: int = STEPS, grad_rtol: float = RTOL, setup=load_recipe):
    """Train ``steps`` steps of ``plan`` on a gloo world and in one process: per-step losses and every rank's final
    parameters must agree within RTOL, the gradients of the first step within ``grad_rtol`` and those of the last
    within LATER_GRAD_RTOL, and every parameter must be held by some rank. (AdamW's update hardly changes when a
    gradient is scaled, so a parameter whose gradient is summed twice still trains to the same values; the gradients
    show it.) ``setup(job)`` runs first in this process and in every gloo process (default: load the job's recipe).
    Returns the world's result."""
    setup(job)  # the reference's losses and data; each gloo process runs it too
    world = run_world(job, plan, steps, tmp_path, keep_gradients=True, setup=setup)
    reference = ReferenceTrainer(job)
    first = None
    for step in range(steps):
        want = reference.train_step(step, keep_gradients=step in (0, steps - 1))
        first = reference.last_gradients if step == 0 else first
        for task, value in want.items():
            got = world.losses[step][task]
            assert abs(got - value) <= RTOL * abs(value), f"step {step} task {task}: {got} vs {value}"
    ref_params = reference.named_parameters()
    held = set()
    for rank, params in world.parameters.items():
        held.update(_compare_modules(params, ref_params, f"rank {rank}"))
    assert held == set(ref_params), f"parameters nobody holds: {sorted(set(ref_params) - held)[:5]}"
    checks = [(world.first_gradients, first, grad_rtol, "first step")]
    if steps > 1:
        checks.append((world.gradients, reference.last_gradients, max(grad_rtol, LATER_GRAD_RTOL), "last step"))
    for got_by_rank, want, rtol, when in checks:
        for rank, grads in got_by_rank.items():
            trained = {n for n in world.parameters[rank] if n in want}
            assert set(grads) == trained, f"rank {rank}: no {when} gradient for {sorted(trained - set(grads))[:5]}"
            _compare_modules(grads, want, f"rank {rank} {when} gradient of", rtol)
    return world


def _compare_modules(got_by_name: dict, want_by_name: dict, what: str, rtol: float = RTOL) -> set[str]:
    """assert_close per module (a layer, an embedding, a head) of ``got_by_name``; returns the names compared."""
    for module in sorted({name.rsplit("/", 1)[0] for name in got_by_name}):
        names = sorted(n for n in got_by_name if n.rsplit("/", 1)[0] == module)
        got = torch.cat([got_by_name[n].reshape(-1) for n in names])
        want = torch.cat([want_by_name[n].reshape(-1) for n in names])
        assert_close(got, want, f"{what} {module}", rtol)
    return set(got_by_name)


def check_transformers_losses(job, folder, world, clip: float | None = None) -> None:
    """The world's per-step losses of task 0 (next-token on a pretrained causal LM whose use is named ``lm``) equal
    the transformers model at ``folder`` trained by hand on the same batches with the job's AdamW (and, with ``clip``,
    its gradients clipped to that global norm, which must be active), within RTOL."""
    from transformers import AutoModelForCausalLM

    from runtime.data import synthetic_batch

    model = AutoModelForCausalLM.from_pretrained(folder)
    train = job.training
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, eps=train.adam_eps)
    for step in range(len(world.losses)):
        ids = synthetic_batch(job, 0, step, 0, job.tasks[0].batch_size).inputs["lm"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > 2 * clip, norm  # clipping is active; the compared gradients are the clipped ones
        opt.step()
        opt.zero_grad()
        got, want = world.losses[step][job.tasks[0].name], float(loss.detach())
        assert abs(got - want) <= RTOL * want, (step, got, want)
