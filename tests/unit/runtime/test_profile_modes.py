"""`loom profile` of generate and sample MetaOps: the whole use is timed (the runtime's KV-cache decode, the denoising
steps), the cost file holds the points under the MetaOp's profile key, and `loom plan --costs` prices the MetaOp from
them instead of the analytic formula."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from planner.api import make_cost_model
from planner.costmodel import AnalyticCostModel, Layout, ProfiledCostModel, fit_piecewise, profile_key
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.embeddings import build_embed
from runtime.profile_modes import generate_timer, sample_timer, use_layers
from runtime.profiler import local_batches, profile_job, profiled_counts

@pytest.fixture(autouse=True)
def one_thread():
    """Time with one thread, as a worker and `loom profile` do (two threads on a busy 2-core host run 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LLAMA = {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 40}


def grpo_job(nodes: int = 1, new_tokens: int = 5):
    """A GRPO-shaped job (tests/integration/test_grpo_equivalence.py's, smaller) on ``nodes`` CPU devices, one per
    node (`loom profile` then times in this process: one worker per node)."""
    return parse_job({
        "name": "grpo", "cluster": {"num_nodes": nodes, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {**LLAMA, "seq_len": 6 + new_tokens},
                       "reward": {**LLAMA, "num_layers": 1, "seq_len": 6 + new_tokens, "frozen": True}},
        "tasks": [{"name": "grpo", "batch_size": 8, "loss": "grpo", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 6, "new_tokens": new_tokens,
             "samples": 4, "temperature": 1.0},
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]},
        ]}],
        "training": {"precision": "fp32"},
    })


VAE = Path(__file__).resolve().parents[3] / "examples" / "models" / "vae"  # scripts/setup.sh writes it


def sample_job(steps: int, grad: bool = True, stop: list[int] | None = None):
    unet = {"kind": "unet2d", "num_layers": 1, "hidden_size": 32, "channel_mults": [1, 2], "in_channels": 4,
            "image_size": 8}
    return parse_job({
        "name": "fb", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"}, "components": {"unet": unet},
        "tasks": [{"name": "fb", "batch_size": 2, "loss": "feedback", "components": [
            {"component": "unet", "mode": "sample", "denoise_steps": steps, "grad_last_step": grad,
             **({"stop_steps": stop} if stop else {})}],
            "feedback": {"vae": str(VAE), "scorers": [{"kind": "linear", "seed": 1}]}}],
        "training": {"precision": "fp32"},
    })


def test_the_cost_file_holds_the_generate_use_and_plan_costs_prices_it_from_there(tmp_path):
    job = grpo_job(nodes=2)
    data = profile_job(job, repeats=3, warmup=1, links=False)  # medians of 3: the cost file's checks pass under load
    (gen,) = [op for op in build_metagraph(job).metaops if op.mode == "generate"]
    key = profile_key(gen, Layout(1, 1))
    assert key.startswith("generate[") and "new=5" in key
    points = data["points"][key]
    assert [b for b, _ in points] == local_batches(gen, 2) == [4, 8] and all(t > 0 for _, t in points)
    assert "grpo" in data["head"]  # the grpo head, timed on stand-in rollouts of the generate use
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    model = make_cost_model(job, path)
    assert isinstance(model, ProfiledCostModel)
    measured = sorted((float(b), float(t)) for b, t in points)
    for dp in (1, 2):
        assert model.layout_time(gen, Layout(dp, 1)) == fit_piecewise(measured, 8 // dp)
    assert model.layout_time(gen, Layout(1, 1)) != AnalyticCostModel(model.hw).layout_time(gen, Layout(1, 1))


def test_an_auto_job_is_profiled_at_the_local_batches_of_every_count_the_planner_plans():
    """``grad_accum_steps: auto`` plans 1 and 2 micro-batches here (8 rows, groups of 4): the reward model, the
    policy's update, the head and the data are measured at 2 rows a device as well (2 micro-batches of 4 on 2
    devices), the generate use at the rows it decodes at once (every micro-batch's together), as before."""
    auto = grpo_job(nodes=2).model_copy(update={"training": grpo_job().training.model_copy(
        update={"grad_accum_steps": "auto"})})
    assert profiled_counts(auto) == (1, 2) and profiled_counts(grpo_job(nodes=2)) == (1,)
    data = profile_job(auto, repeats=1, warmup=0, links=False)
    graph = build_metagraph(auto)
    for op in graph.metaops:
        assert [b for b, _ in data["points"][profile_key(op, Layout(1, 1))]] == ([4, 8] if op.gen else [2, 4, 8])
    assert [b for b, _ in data["head"]["grpo"]] == [b for b, _ in data["data"]["grpo"]] == [2, 4, 8]
    assert local_batches(graph.metaops[0], 2, (1, 2, 4)) == [1, 2, 4, 8]  # 8 rows: 8, 4 / 4, 2 / 2, 1
    # the planner prices 2 micro-batches' reward model on 2 devices (2 rows each) from the point measured there
    reward = next(op for op in build_metagraph(auto.with_micro_batches(2)).metaops if op.component == "reward")
    point = dict(data["points"][profile_key(reward, Layout(1, 1))])[2]
    assert make_cost_model(auto.with_micro_batches(2), data).layout_time(reward, Layout(2, 1)) == pytest.approx(
        point * reward.num_layers)


def test_a_sample_use_is_profiled_as_its_denoising_steps():
    job = sample_job(3)
    data = profile_job(job, repeats=1, warmup=1, links=False)
    (op,) = build_metagraph(job).metaops
    assert list(data["points"]) == [profile_key(op, Layout(1, 1))] and "sample[" in next(iter(data["points"]))
    # the timer runs every step: 10-12 denoiser calls (the stop range 9..11, then the step with gradient) take longer
    # than 1 (the best of three runs each). Each call also draws noise, runs the backward of x0 and clears gradients,
    # the same for both: the ratio stays well under 10 (the exact counts: the test below)
    one, many = (sample_timer(j, build_metagraph(j).metaops[0], torch.device("cpu"))
                 for j in (sample_job(1), sample_job(12)))
    assert min(many(2) for _ in range(3)) > 1.5 * min(one(2) for _ in range(3))


def test_the_sample_timer_runs_what_a_worker_runs_through_the_stop_range(monkeypatch):
    """Each denoising step runs the use's input module and the head's output convolution (runtime.sampleop.run_sample's
    denoiser), and the stop step cycles through the stop range from call to call: stop + 1 denoiser calls each, and
    the step with gradient gives the layers their gradients (cleared again after the call)."""
    import runtime.profile_modes as modes

    calls, built = [], {}
    real = modes.build_modules

    def build_modules(job, op):
        modules = real(job, op)
        built["embed"], built["head"] = modules["embed:" + op.component, 0], modules["head:" + op.task, 0]
        built["embed"].register_forward_hook(lambda *args: calls.append("embed"))
        built["head"].conv_out.register_forward_hook(lambda *args: calls.append("conv_out"))
        return modules

    monkeypatch.setattr(modes, "build_modules", build_modules)
    job = sample_job(10, stop=[6, 9])
    timer = sample_timer(job, build_metagraph(job).metaops[0], torch.device("cpu"))
    per_call = []
    for _ in range(5):
        calls.clear()
        assert timer(2) > 0
        assert calls.count("embed") == calls.count("conv_out")
        per_call.append(calls.count("embed"))
    assert per_call == [7, 8, 9, 10, 7]
    assert all(p.grad is None for p in built["head"].parameters())


def test_the_generate_timer_decodes_every_new_token_with_the_whole_use():
    # this thread's CPU time (torch on one thread: the autouse fixture): the other pytest worker's load once made one
    # token 5.4 ms of wall time against 1.2 ms alone
    short, long = grpo_job(new_tokens=1), grpo_job(new_tokens=24)
    ops = [next(op for op in build_metagraph(j).metaops if op.mode == "generate") for j in (short, long)]
    (part, layers), = use_layers(long, ops[1])  # the use's two layers, not the MetaOp's one stand-in layer
    assert (part.num_layers, len(layers)) == (2, 2) and ops[1].num_layers == 1
    timers = [generate_timer(j, op, torch.device("cpu"), clock=time.thread_time) for j, op in zip((short, long), ops)]
    one, many = (min(t(4) for _ in range(3)) for t in timers)
    assert many > 4 * one
    prefill = min(timers[1](4, True) for _ in range(3))
    assert prefill < many / 4


def test_a_component_only_generating_embeds_every_decoded_position():
    job = parse_job({
        "name": "g", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"lm": {**LLAMA, "seq_len": 6}},
        "tasks": [{"name": "g", "batch_size": 2, "loss": "lm", "components": [
            {"component": "lm", "mode": "generate", "seq_len": 6, "new_tokens": 5}]}]})
    assert build_embed(job, "lm").positions.shape[0] == 11
