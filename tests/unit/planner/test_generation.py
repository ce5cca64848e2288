"""Pricing of generate and sample uses, detached edges, weight hand-offs and the RL role placements (colocated, split,
Loom's role candidate) on a small GRPO-shaped job."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from planner.api import make_cost_model, plan_job, plan_placed
from planner.baselines import baseline_plans
from planner.costmodel import CostModel, Layout
from planner.devices import DEVICES
from planner.generation import Decoder, bandwidth_bound_fraction, decode_batches, generate_seconds, kv_cache_bytes
from planner.handoff import hand_off_gathers, hand_off_seconds, hand_offs
from planner.metagraph import build_metagraph
from planner.phases import backward_positions
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, placed_ledger
from planner.plan import PLAN_VERSION, plan_from_json
from planner.program import grad_buckets, holdings, plan_edges
from planner.rlbaselines import colocated_schedule, rl_schedules, role_of, split_candidates, split_schedule, stage_plan
from planner.schedule import Problem
from planner.simulator import batch_draws, boundary_transfers, simulate, slice_passes, slice_seconds, walk
from planner.spec import load_job, parse_job
from planner.streamed import streamed_problem

H100 = DEVICES["h100"]
RATE = H100.peak_flops * H100.efficiency


def decoder(new_tokens: int = 128, prompt: int = 64) -> Decoder:
    """A 7B-class decoder (32 layers of hidden 4096, MHA) with a 32k vocabulary."""
    h, layers = 4096, 32
    params = layers * 12 * h * h + h * 32000
    return Decoder(layers=layers, hidden=h, kv_dim=h, params=params, prompt=prompt, new_tokens=new_tokens,
                   prefill_flops=2.0 * params * prompt, prefill_bytes=0.0, kernels=layers * 16)


def test_decode_cost_grows_with_new_tokens():
    times = [sum(generate_seconds(decoder(n), 8, 1, RATE, H100.mem_bandwidth, H100.launch_s, 2)) for n in (1, 64, 512)]
    assert times[0] < times[1] < times[2]
    # 64 -> 512 tokens: at least 8x the decode steps, each no cheaper (the KV cache grows)
    prefill = generate_seconds(decoder(1), 8, 1, RATE, H100.mem_bandwidth, H100.launch_s, 2)[0]
    assert times[2] - prefill >= 8 * (times[1] - prefill) * 0.999


def test_bandwidth_bound_at_small_batch_compute_bound_at_large():
    dec = decoder(64, prompt=16)
    assert bandwidth_bound_fraction(dec, 1, 1, RATE, H100.mem_bandwidth, 2) == 1.0
    assert bandwidth_bound_fraction(dec, 4096, 1, RATE, H100.mem_bandwidth, 2) == 0.0
    # bandwidth-bound: one row costs about one weight read per step; 8 rows cost about the same
    one = generate_seconds(dec, 1, 1, RATE, H100.mem_bandwidth, 0.0, 2)[1]
    assert one == pytest.approx(64 * dec.params * 2 / H100.mem_bandwidth, rel=0.01)
    assert generate_seconds(dec, 8, 1, RATE, H100.mem_bandwidth, 0.0, 2)[1] < 1.2 * one
    # compute-bound: doubling the rows doubles the time
    big = [generate_seconds(dec, r, 1, RATE, H100.mem_bandwidth, 0.0, 2)[1] for r in (4096, 8192)]
    assert big[1] == pytest.approx(2 * big[0], rel=0.01)


def test_kv_cache_formula_on_a_hand_made_case():
    # 2 (key, value) x 3 layers x 64 wide x 10 positions x 2 bytes x 5 rows
    assert kv_cache_bytes(3, 64, 10, 2, 5) == 2 * 3 * 64 * 10 * 2 * 5 == 38400


def grpo(devices: int = 4, **training) -> dict:
    """A tiny GRPO-shaped job on ``devices`` H100s of one node: the policy generates 4 samples per prompt, a frozen
    reward model and reference score them, the policy trains."""
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
             "vocab_size": 128, "seq_len": 24}
    return {
        "name": "grpo",
        "cluster": {"num_nodes": 1, "devices_per_node": devices, "device": "h100"},
        "components": {"policy": llama, "reference": {**llama, "frozen": True}, "reward": {**llama, "frozen": True}},
        "tasks": [{"name": "grpo", "batch_size": 16, "loss": "grpo", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 8, "new_tokens": 16,
             "samples": 4},
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "reference", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]},
        ]}],
        "training": {"precision": "bf16", **training},
        "planner": {"time_limit_s": 2},
    }


def setup(devices: int = 4):
    job = parse_job(grpo(devices))
    cost_model = make_cost_model(job)
    return job, cost_model, Problem.build(build_metagraph(job), cost_model)


def test_generate_use_is_one_detached_metaop_with_its_kv_cache():
    job, cost_model, problem = setup()
    rollout, reward, reference, policy = problem.graph.metaops
    assert (rollout.mode, rollout.num_layers, rollout.frozen, rollout.backward_factor) == ("generate", 1, True, 0.0)
    assert rollout.param_group == "policy@generate" and policy.param_group == "policy" and not policy.frozen
    # nothing trains upstream of a detached edge: the scorers run forward only
    assert reward.backward_factor == reference.backward_factor == 0.0 and policy.backward_factor == 2.0
    # the KV cache: 2 x 2 layers x kv width 32 (2 of 4 heads of 16) x (8 + 16) positions x 2 bytes, per local row
    layout = Layout(2, 2)
    assert cost_model.activation_bytes(rollout, layout) == 2 * 2 * 32 * 24 * 2 * 8 / 2
    # its output is the packed rollout rows (float32: 8 + 16 token ids, the 16-wide generated mask), no gradient back
    everyone = tuple(range(4))
    placed = PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 1, everyone, problem.curves[0].layout(4)),)),
                             PlacedWave(tuple(PlacedSlice(m, 0, problem.layers(m), (m,), problem.curves[m].layout(1))
                                              for m in (1, 2, 3)))))
    edges = [e for e in plan_edges(problem.graph.metaops, placed) if e.producer == (0, 0)]
    assert len(edges) == 3 and all(len(e.backward) == 0 for e in edges) and any(e.forward.remote.any() for e in edges)
    plan = plan_placed(job, placed, cost_model)
    token_pieces = [p for p in plan.pieces if tuple(p.producer) == (0, 0) and p.src != p.dst]
    assert token_pieces and all(p.bytes == (p.stop - p.start) * 4 * (24 + 16) for p in token_pieces)


def test_micro_batches_decode_their_rollouts_once_in_the_first():
    """With grad_accum_steps 2 the generate MetaOp carries one micro-batch's rows but decodes both micro-batches'
    rows at once: its KV cache is the whole batch's, each pass is priced half of that one decode, and the simulator
    puts the whole decode in the first micro-batch. On the colocated placement (the generation alone on every device
    first) the step is then shorter than decoding each micro-batch on its own (planner.streamed) by exactly the two
    half decodes less the one whole decode; the micro-batches are pipelined or not, the same."""
    whole = Problem.build(build_metagraph(parse_job(grpo(4))), make_cost_model(parse_job(grpo(4))))
    layout = Layout(2, 2)
    for pipelined in (False, True):
        job = parse_job(grpo(4, grad_accum_steps=2, pipeline_micro_batches=pipelined))
        cost_model = make_cost_model(job)
        problem = Problem.build(build_metagraph(job), cost_model)
        rollout, one = problem.graph.metaops[0], whole.graph.metaops[0]
        assert (rollout.batch_size, decode_batches(rollout), decode_batches(problem.graph.metaops[3])) == (8, 2, 1)
        assert cost_model.activation_bytes(rollout, layout) == cost_model.activation_bytes(one, layout)
        assert cost_model.layout_time(rollout, layout) == pytest.approx(cost_model.layout_time(one, layout) / 2)
        chunked = streamed_problem(parse_job(grpo(4)), 2, cost_model)
        half = cost_model.layout_time(chunked.graph.metaops[0], Layout(4, 1))
        assert 2 * half > cost_model.layout_time(rollout, Layout(4, 1)) * 2  # a decode reads the weights per token
        placed = colocated_schedule(problem)
        assert placed.waves[0].slices[0].layout == Layout(4, 1)
        once, each = simulate(problem, placed, cost_model), simulate(chunked, placed, cost_model)
        assert each.compute_s - once.compute_s == pytest.approx(2 * half - 2 * cost_model.layout_time(rollout,
                                                                                                      Layout(4, 1)))
        assert each.iteration_time_s - once.iteration_time_s == pytest.approx(each.compute_s - once.compute_s)


def test_rows_decoded_for_every_micro_batch_cross_in_the_first():
    """The rollouts of 4 micro-batches decoded at once on all 4 devices (a replica each, every micro-batch's rows on
    every replica), then two stages on device pairs that read them (reward and reference, each split over both pairs)
    and the policy's two layers: every boundary fed by the decode is priced with all 4 micro-batches' rows in the
    first micro-batch (runtime.transfers does the same), so a stage's later micro-batches wait for no decoding device.
    Crossing in every micro-batch, each stage would meet every replica 4 times a step, the pairs busy with each
    other's stages: the walk is longer by more than a stage's forward."""
    job = parse_job(grpo(4, grad_accum_steps=4, pipeline_micro_batches=True))
    cost_model = make_cost_model(job).with_in_flight(4)
    problem = Problem.build(build_metagraph(job), cost_model)
    pair, other = ((0, 1), Layout(2, 1)), ((2, 3), Layout(2, 1))
    placed = PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 1, (0, 1, 2, 3), Layout(4, 1)),)),
                             PlacedWave((PlacedSlice(1, 0, 1, *pair), PlacedSlice(2, 0, 1, *other))),
                             PlacedWave((PlacedSlice(1, 1, 1, *other), PlacedSlice(2, 1, 1, *pair))),
                             PlacedWave((PlacedSlice(3, 0, 1, *pair),)), PlacedWave((PlacedSlice(3, 1, 1, *other),))))
    _, forward, backward, decoded = boundary_transfers(problem, placed, cost_model)
    assert [len(d) for d in decoded] == [0, 2, 0, 1, 0, 0] and all(m == 4 for d in decoded for _, m in d)
    assert all(any(f is g for g in forward[k]) for k, d in enumerate(decoded) for f, _ in d)
    draws = batch_draws(problem, placed, cost_model)
    seconds = tuple(tuple(slice_seconds(problem, s, cost_model) for s in w.slices) for w in placed.waves)
    passes = slice_passes(problem, placed, seconds, draws, cost_model)
    program = grad_buckets(holdings(problem.graph.metaops, placed), backward_positions(placed.phases, 5))
    once, each = (walk(problem, placed, cost_model, forward, backward, program, passes, draws, rows).clocks.t.max()
                  for rows in (decoded, None))
    assert each - once > passes[1][0][0]


def test_a_decode_holds_autocasts_casts_of_the_layers_it_trains_and_copies_in_bf16():
    """Under bf16 a generate use's copy of its layers holds its matrices in bf16 (runtime.rollout.lower_matrices: 2
    bytes a parameter, nothing for autocast to cast), while the layers a device trains itself at the decode's TP
    degree decode from their float32 modules, whose casts torch keeps until the generation ends: the ledger's
    transient peak is the KV cache plus those layers' shards and the LM head in bf16. In fp32 nothing is cast."""
    job, cost_model, problem = setup()
    rollout = problem.graph.metaops[0]
    head = rollout.gen.decoder.params - rollout.layer.params
    assert head == 64 * 128  # hidden x vocabulary
    layout = Layout(2, 2)
    assert cost_model.bytes_per_param(rollout, layout) == 2.0  # bf16 matrices
    per_layer = rollout.layer.params / 2 / 2  # a layer's TP-2 shard
    assert cost_model.decode_cast_bytes(rollout, layout, 0, trained=True) == head * 2
    assert cost_model.decode_cast_bytes(rollout, layout, 2, trained=True) == (2 * per_layer + head) * 2
    assert cost_model.decode_cast_bytes(rollout, layout, 2, trained=False) == 0.0
    fp32 = make_cost_model(parse_job(grpo(4, precision="fp32")))
    assert fp32.decode_cast_bytes(rollout, layout, 2, trained=True) == 0.0
    assert fp32.bytes_per_param(rollout, layout) == 4.0
    kv = cost_model.activation_bytes(rollout, layout)
    decode = PlacedWave((PlacedSlice(0, 0, 1, (0, 1, 2, 3), layout),))
    scorers = PlacedWave((PlacedSlice(1, 0, 2, (0, 1), problem.curves[1].layout(2)),
                          PlacedSlice(2, 0, 2, (2, 3), problem.curves[2].layout(2))))
    for train, trained in (((0, 1), 2), ((2, 3), 0)):  # the policy trained at TP 2 on the first two devices, or the
        # last two (a TP-2 group of its own: its layers are not the decode's TP-2 shards on devices 0 and 1)
        placed = PlacedSchedule((decode, scorers, PlacedWave((PlacedSlice(3, 0, 2, train, Layout(1, 2)),))))
        ledger = placed_ledger(problem, placed, cost_model)
        assert ledger.decode_transient()[:2].tolist() == [kv + (trained * per_layer + head) * 2] * 2
    assert ledger.decode_transient()[2:].tolist() == [kv + (2 * per_layer + head) * 2] * 2


def test_sample_use_prices_its_denoising_steps_and_last_step_backward():
    unet = {"kind": "unet2d", "num_layers": 1, "hidden_size": 32, "channel_mults": [1, 2], "in_channels": 4,
            "image_size": 8}
    base = {"name": "fb", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "h100"},
            "components": {"unet": unet, "scorer": {"kind": "mlp", "num_layers": 2, "hidden_size": 16,
                                                    "frozen": True}},
            "tasks": [{"name": "fb", "batch_size": 4, "loss": "mse", "components": [
                {"component": "unet", "mode": "sample", "denoise_steps": 10, "grad_last_step": True}]}]}
    graph = build_metagraph(parse_job(base))
    (op,) = graph.metaops
    assert (op.num_layers, op.frozen, op.backward_factor, op.param_group) == (1, False, 2.0, "unet")
    assert CostModel.passes(op) == 12 and CostModel.passes_fraction(op) == pytest.approx(10 / 12)
    no_grad = {**base, "tasks": [{**base["tasks"][0], "components": [
        {"component": "unet", "mode": "sample", "denoise_steps": 10}]}]}
    (op,) = build_metagraph(parse_job(no_grad)).metaops
    assert (op.frozen, op.backward_factor, CostModel.passes(op), CostModel.passes_fraction(op)) == (True, 0.0, 10, 1)
    # a seeded stop in [3, 5]: at most 5 steps without gradient and the 6th with it run, priced at the range's last
    early = {**base, "tasks": [{**base["tasks"][0], "components": [
        {"component": "unet", "mode": "sample", "denoise_steps": 10, "grad_last_step": True, "stop_steps": [3, 5]}]}]}
    (op,) = build_metagraph(parse_job(early)).metaops
    assert CostModel.passes(op) == 8 and CostModel.passes_fraction(op) == pytest.approx(6 / 8)


def slices(problem, layout_of, *spec):
    """A placed schedule from ``(wave, metaop, first layer, layers, devices)`` tuples."""
    waves: dict[int, list] = {}
    for k, m, first, count, devices in spec:
        waves.setdefault(k, []).append(PlacedSlice(m, first, count, devices, layout_of(m, len(devices))))
    return PlacedSchedule(tuple(PlacedWave(tuple(waves[k])) for k in sorted(waves)))


def test_hand_off_bytes_on_hand_made_placements():
    job, cost_model, problem = setup()
    ops = problem.graph.metaops
    layout = lambda m, n: problem.curves[m].layout(n)  # noqa: E731
    per_layer = ops[3].layer.params
    # split: the rollout on devices 0-1 (TP 1), the update on 2-3: devices 0 and 1 each receive both trained layers
    split = slices(problem, layout, (0, 0, 0, 1, (0, 1)), (1, 1, 0, 2, (2,)), (1, 2, 0, 2, (3,)), (2, 3, 0, 2, (2, 3)))
    offs = hand_offs(ops, split, {}, 2, 4)
    assert [(h.metaop, h.device, h.bytes, h.cross_node) for h in offs] == [(0, 0, 2 * per_layer * 2, False),
                                                                          (0, 1, 2 * per_layer * 2, False)]
    assert hand_off_seconds(offs, cost_model, 4) == pytest.approx(
        H100.intra_latency_s + 2 * per_layer * 2 / cost_model.hw.intra_bandwidth)
    predicted = plan_placed(job, split, cost_model).predicted
    # the simulator moves the runtime's float32 parameters (CostModel.param_bytes_moved), but a decode's copy holds
    # and receives its matrices in the compute precision (bf16 here); unsized, a layer is its modelled matrices
    assert (cost_model.param_bytes_moved, cost_model.decode_matrix_bytes) == (4, 2)
    moved = hand_offs(ops, split, {}, cost_model.param_bytes_moved, 4, matrix_bytes=cost_model.decode_matrix_bytes)
    assert [h.bytes for h in moved] == [h.bytes for h in offs]
    assert predicted.handoff_s == pytest.approx(hand_off_seconds(moved, cost_model, 4))
    # sized, the norms and biases move in float32 beside the matrices in bf16
    sized = hand_offs(ops, split, {}, 4, 4, size=lambda name: (per_layer + 100, 3) if name == ops[3].param_group
                      else (0, 0), matrix_bytes=2, matrices=lambda name: per_layer if name == ops[3].param_group
                      else None)
    assert [h.bytes for h in sized] == [2 * (per_layer * 2 + 100 * 4)] * 2
    # the update split by layers: layer 0 on devices 0-1, layer 1 on 2-3; the rollout's devices lack layer 1 only
    half = slices(problem, layout, (0, 0, 0, 1, (0, 1)), (1, 3, 0, 1, (0, 1)), (2, 3, 1, 1, (2, 3)),
                  (1, 1, 0, 2, (2,)), (1, 2, 0, 2, (3,)))
    assert [(h.device, h.bytes) for h in hand_offs(ops, half, {}, 2, 4)] == [(0, per_layer * 2), (1, per_layer * 2)]
    # colocated: the generating devices train every layer, nothing moves
    together = slices(problem, layout, (0, 0, 0, 1, (0, 1)), (1, 3, 0, 2, (0, 1)), (1, 1, 0, 2, (2,)),
                      (1, 2, 0, 2, (3,)))
    assert hand_offs(ops, together, {}, 2, 4) == []
    # across nodes: the bytes go over the network, priced at the node's bandwidth
    far = hand_offs(ops, split, {}, 2, 2)
    assert all(h.cross_node and h.network_bytes == h.bytes for h in far)
    assert hand_off_seconds(far, cost_model, 2) == pytest.approx(
        H100.inter_latency_s + 2 * 2 * per_layer * 2 / cost_model.hw.inter_bandwidth)


def test_tensor_parallel_trainers_gather_before_a_hand_off_of_another_cut():
    """The policy trains at tensor_parallel 2 on devices 2-3. A TP-1 decode on devices 0-1 takes whole layers, so the
    trainers' TP group all-gathers each layer first (its split parameters: all but the two norms), priced with
    CostModel.allgather_time before the sends; a TP-2 decode on 0-1 takes each rank's shard from the trainer of that
    shard: no gather, the sends alone."""
    data = grpo()
    data["components"]["policy"]["tensor_parallel"] = [1, 2]
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    ops, graph = problem.graph.metaops, problem.graph
    assert graph.tp_whole_params["policy"] == 2 * 64  # llama: the two RMSNorm weights
    per_layer = ops[3].layer.params
    for decode_tp in (1, 2):
        placed = PlacedSchedule((
            PlacedWave((PlacedSlice(0, 0, 1, (0, 1), Layout(2 // decode_tp, decode_tp)),)),
            PlacedWave((PlacedSlice(1, 0, 2, (0,), Layout(1, 1)), PlacedSlice(2, 0, 2, (1,), Layout(1, 1)))),
            PlacedWave((PlacedSlice(3, 0, 2, (2, 3), Layout(1, 2)),))))
        gathers = hand_off_gathers(ops, placed, {}, 4, 4, graph.tp_whole_params)
        offs = hand_offs(ops, placed, {}, 4, 4, tp_whole_params=graph.tp_whole_params)
        if decode_tp == 1:
            split = (per_layer - 2 * 64) * 4
            assert [(g.param_group, g.layer, g.devices, g.bytes) for g in gathers] == [
                ("policy", 0, (2, 3), split), ("policy", 1, (2, 3), split)]
        else:
            assert gathers == []
        gather_s = 2 * cost_model.allgather_time((per_layer - 2 * 64) * 4, 2, False) if decode_tp == 1 else 0.0
        assert hand_off_seconds(offs, cost_model, 4, gathers) == pytest.approx(
            hand_off_seconds(offs, cost_model, 4) + gather_s, rel=1e-12)
        predicted = plan_placed(job, placed, cost_model).predicted
        assert predicted.handoff_s == pytest.approx(hand_off_seconds(
            hand_offs(ops, placed, {}, cost_model.param_bytes_moved, 4, tp_whole_params=graph.tp_whole_params,
                      matrix_bytes=cost_model.decode_matrix_bytes), cost_model, 4, hand_off_gathers(ops, placed, {}, cost_model.param_bytes_moved, 4, graph.tp_whole_params)))


def test_explicit_weights_from_hands_off_to_the_copy():
    data = grpo()
    data["components"]["sampler"] = {**data["components"]["policy"], "weights_from": "policy"}
    data["tasks"][0]["components"][0]["component"] = "sampler"
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    assert problem.graph.weights_from == {"sampler": "policy"}
    layout = lambda m, n: problem.curves[m].layout(n)  # noqa: E731
    placed = slices(problem, layout, (0, 0, 0, 1, (0,)), (1, 1, 0, 2, (1,)), (1, 2, 0, 2, (2,)), (1, 3, 0, 2, (3,)))
    (off,) = hand_offs(problem.graph.metaops, placed, problem.graph.weights_from, 2, 4)
    assert (off.component, off.source, off.device) == ("sampler", "policy", 0)
    assert off.bytes == 2 * problem.graph.metaops[3].layer.params * 2


def test_colocated_and_split_placements():
    job, cost_model, problem = setup()
    co = colocated_schedule(problem)
    assert [len(w.slices) for w in co.waves] == [1, 1, 1, 1]  # every role in turn
    assert all(s.devices[0] == 0 for w in co.waves for s in w.slices)
    sizes = split_candidates(problem)
    assert sizes and all(sum(s.values()) <= 4 for s in sizes)
    placed = split_schedule(problem, sizes[0])
    pools: dict[str, set[int]] = {}
    for w in placed.waves:
        for s in w.slices:
            pools.setdefault(role_of(problem, s.metaop), set()).update(s.devices)
    assert set(pools) == {"policy@generate", "reward", "reference", "policy"}
    assert sum(len(p) for p in pools.values()) == len(set().union(*pools.values()))  # disjoint pools
    found = rl_schedules(problem, cost_model)
    assert set(found) == {"colocated", "split"}
    names = [b.name for b in baseline_plans(problem, cost_model)]
    assert names[-2:] == ["colocated", "split"]


def test_role_placements_only_for_rl_shaped_jobs():
    data = grpo()
    data["tasks"][0]["components"] = [{"component": "policy"}]
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    assert rl_schedules(problem, cost_model) == {}


@pytest.mark.parametrize("devices", [4, 8])
def test_loom_is_never_slower_than_colocated_or_split(devices):
    outcome = plan_job(parse_job(grpo(devices)))
    plan = outcome.plan
    assert {"colocated", "split"} <= set(plan.baselines)
    for name in ("colocated", "split"):
        if name not in plan.baseline_notes:  # it fits
            assert plan.predicted.iteration_time_s <= plan.baselines[name] * (1 + 1e-9)
    assert max(plan.peak_memory_bytes) <= plan.cluster.memory_bytes
    # the plan records modes and hand-offs and loads back (version bumped)
    again = plan_from_json(plan.to_json())
    assert again.version == PLAN_VERSION == 10
    assert [m.mode for m in again.metaops] == ["generate", "forward", "forward", "train"]
    assert again.predicted.handoff_s == pytest.approx(outcome.simulation.handoff_s)
    assert len(again.handoffs) == len(outcome.simulation.handoffs)


@pytest.mark.parametrize("field, value, message", [
    ("mode", "decode", "metaops[0].mode ('decode') is not a use mode"),
    ("num_layers", 2, "metaops[0].num_layers (2) is not 1 for a generate MetaOp"),
    ("handoff", 9, "handoffs[0].metaop (9) is not a MetaOp of the plan"),
])
def test_a_plan_with_a_bad_mode_or_hand_off_is_one_error_line(field, value, message):
    from planner.errors import SpecError
    from planner.plan import Plan

    job, cost_model, problem = setup()
    data = plan_placed(job, colocated_schedule(problem), cost_model).model_dump(mode="json")
    if field == "handoff":
        data["handoffs"] = [{"component": "policy", "source": "policy", "metaop": value, "device": 0, "bytes": 1.0,
                             "cross_node": False}]
    else:
        data["metaops"][0][field] = value
    text = Plan.model_validate(data).sealed().to_json()
    with pytest.raises(SpecError) as info:
        plan_from_json(text, "bad.json")
    assert str(info.value).startswith(f"bad.json: {message}") and "\n" not in str(info.value)


def test_stage_plan_splits_layers_over_disjoint_sub_pools():
    _, _, problem = setup(8)
    policy = 3
    assert stage_plan(problem, policy, 8, 1) == [(0, 2, 0, problem.curves[policy].counts[-1])]
    two = stage_plan(problem, policy, 8, 2)
    assert [(first, count, offset) for first, count, offset, _ in two] == [(0, 1, 0), (1, 1, 4)]
    assert all(n <= 4 for *_, n in two)
    assert len(stage_plan(problem, 0, 8, 4)) == 1  # a generate MetaOp is one layer: never staged


def test_role_placements_fit_by_pipeline_stages_when_whole_models_do_not():
    """With devices just too small for every role's whole model beside the others, the colocated placement finds
    layouts and pipeline stages that fit, as a verl user would, and Loom's plan fits and is no slower."""
    job, cost_model, problem = setup(8)
    whole = max(simulate(problem, colocated_schedule(problem), cost_model).peak_memory_bytes)
    data = grpo(8)
    data["cluster"]["memory_gib"] = 0.8 * whole / 2**30
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    whole = max(simulate(problem, colocated_schedule(problem), cost_model).peak_memory_bytes)
    assert whole > cost_model.hw.memory_bytes
    placed, sim = rl_schedules(problem, cost_model)["colocated"]
    assert max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes
    plan = plan_job(job, cost_model).plan
    assert max(plan.peak_memory_bytes) <= plan.cluster.memory_bytes
    assert plan.predicted.iteration_time_s <= sim.iteration_time_s * (1 + 1e-9)


def test_a_searched_placement_whose_decode_the_runtime_cannot_place_is_never_chosen():
    """bench/rl/grpo-7b-16.yaml under as_run: with the decode copies in bf16 the solver's schedules fit, and the
    searches after placing (the order search here) reached a placement decoding at TP 2 on devices that train the
    policy at TP 4, which the runtime does not run (decode_refused): it had been chosen (14.54 s). Such placements are
    skipped like ones that do not fit: the plan is one the runtime runs."""
    from planner.candidates import runnable
    from planner.generation import as_run
    from planner.plan import job_for_plan

    job = load_job(Path(__file__).parents[3] / "bench" / "rl" / "grpo-7b-16.yaml")
    job = job.model_copy(update={"training": job.training.model_copy(update={"shard_optimizer": True})})
    cost_model = make_cost_model(job)
    with as_run(cost_model):
        outcome = plan_job(job, cost_model)
        problem = Problem.build(build_metagraph(job_for_plan(job, outcome.plan)), cost_model)  # its micro-batches
        assert runnable(problem, outcome.placed, cost_model.hw.devices_per_node) is None


def test_as_run_plans_tensor_parallel_decodes_whose_weights_the_runtime_places():
    """runtime.tp_decode decodes Loom's llama kind at tensor_parallel > 1 when each decoding device either trains the
    layers in its decode group or trains none of them and receives its cut after each step (decode_refused);
    modes_refused names the rest. Under as_run the rollout keeps its TP layouts, and Loom's plan and
    both role baselines run as planned (bench.rl's 'as the runtime runs it' table)."""
    from planner.generation import as_run, decode_refused, modes_refused

    data = grpo(4)
    data["components"]["policy"]["tensor_parallel"] = [1, 2, 4]
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    rollout = problem.graph.metaops[0]
    assert rollout.gen.tensor_parallel
    assert {lay.tp_degree for lay in cost_model.layouts(rollout, 4)} == {1, 2, 4}

    def placed(rollout_devices, rollout_tp, train_tp):
        def layout(m, n):
            return {0: Layout(n // rollout_tp, rollout_tp), 3: Layout(n // train_tp, train_tp)}.get(m) or \
                problem.curves[m].layout(n)
        return slices(problem, layout, (0, 0, 0, 1, rollout_devices), (1, 1, 0, 2, (0, 1)), (1, 2, 0, 2, (2, 3)),
                      (2, 3, 0, 2, (0, 1, 2, 3)))

    # colocated, the same TP-2 groups for decoding and training: the decode uses the trained shards
    assert modes_refused(problem.graph.metaops, placed((0, 1, 2, 3), 2, 2)) is None
    # colocated at other degrees: device 0 trains in group [0] and would decode in [0, 1]
    assert decode_refused(problem.graph.metaops, placed((0, 1, 2, 3), 2, 1)) == (
        "grpo.rollout decodes on device 0 in TP group [0, 1], which runs layer 0 of policy in TP group [0]")
    # a pool of its own (devices 0-1 decode, the update on 2-3): its cut comes from trainers at any degree
    split = lambda tp, train: slices(problem, lambda m, n: Layout(n // tp, tp) if m == 0 else (  # noqa: E731
        Layout(n // train, train) if m == 3 else problem.curves[m].layout(n)),
        (0, 0, 0, 1, (0, 1)), (1, 1, 0, 2, (2,)), (1, 2, 0, 2, (3,)), (2, 3, 0, 2, (2, 3)))
    for tp, train in ((2, 1), (2, 2), (1, 2)):
        assert modes_refused(problem.graph.metaops, split(tp, train)) is None
    with as_run(cost_model):
        assert {lay.tp_degree for lay in cost_model.layouts(rollout, 4)} == {1, 2, 4}
        ran = Problem.build(build_metagraph(job), cost_model)
        outcome = plan_job(job, cost_model)
        assert modes_refused(ran.graph.metaops, outcome.placed) is None
        for found, _ in rl_schedules(ran, cost_model).values():
            assert modes_refused(ran.graph.metaops, found) is None
    assert not cost_model.modes_as_run


def test_decode_refused_names_what_a_walk_over_every_layer_and_device_names():
    """decode_refused checks a table of TP groups per device and layer (numpy): it refuses the placements, and names
    the device, layer and groups, that the plain walk over the generate slices' TP groups, the component's (group,
    layer) pairs sorted and the group's devices (layer_tp_groups' map) names, over every degree and pool here."""
    from planner.generation import decode_refused, layer_tp_groups

    data = grpo(4)
    data["components"]["policy"]["tensor_parallel"] = [1, 2, 4]
    job = parse_job(data)
    problem = Problem.build(build_metagraph(job), make_cost_model(job))
    ops = problem.graph.metaops

    def walked(placed):
        held = layer_tp_groups(ops, placed)
        runs = sorted({(ops[s.metaop].param_group, j) for w in placed.waves for s in w.slices
                       if ops[s.metaop].gen is None and ops[s.metaop].component == "policy"
                       for j in range(s.first_layer, s.first_layer + s.num_layers)})
        for w in placed.waves:
            for s in w.slices:
                if ops[s.metaop].gen is None:
                    continue
                tp = s.layout.tp_degree
                for i in range(0, len(s.devices), tp):
                    members = tuple(s.devices[i:i + tp])
                    for group, j in runs:
                        for d in members:
                            mine = held.get((group, j, d))
                            if mine is not None and mine != members:
                                return (f"grpo.rollout decodes on device {d} in TP group {list(members)}, which "
                                        f"runs layer {j} of {group} in TP group {list(mine)}")
        return None

    said = []
    for rollout_tp in (1, 2, 4):
        for train_tp in (1, 2, 4):
            for rollout_devices, train_devices in (((0, 1, 2, 3), (0, 1, 2, 3)), ((0, 1, 2, 3), (2, 3)),
                                                   ((2, 3), (0, 1, 2, 3)), ((0, 1), (2, 3))):
                if len(rollout_devices) < rollout_tp or len(train_devices) < train_tp:
                    continue
                layout = {0: Layout(len(rollout_devices) // rollout_tp, rollout_tp),
                          3: Layout(len(train_devices) // train_tp, train_tp)}
                placed = slices(problem, lambda m, n: layout.get(m) or problem.curves[m].layout(n),
                                (0, 0, 0, 1, rollout_devices), (1, 1, 0, 2, (0, 1)), (1, 2, 0, 2, (2, 3)),
                                (2, 3, 0, 2, train_devices))
                said.append(decode_refused(ops, placed))
                assert said[-1] == walked(placed)
    assert None in said and len({x for x in said if x}) > 3  # both answers, and several different refusals


def test_as_run_keeps_a_pretrained_decode_tensor_parallel_and_a_sample_use_at_1(tmp_path):
    """A pretrained Llama-family causal LM decodes tensor-parallel too (runtime.tp_decode over
    runtime.megatron_pretrained's blocks): under as_run its generate use keeps its TP layouts; a sample use is the
    one mode still run at tensor_parallel 1 only (its MetaOp's Generation says so)."""
    from planner.generation import Generation, as_run, runs_tensor_parallel

    sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
    from make_models import save_llama  # examples/make_models.py

    folder = save_llama(tmp_path / "llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2)
    data = grpo(4)
    data["components"]["policy"] = {"pretrained": str(folder), "seq_len": 24, "tensor_parallel": [1, 2]}
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    rollout = problem.graph.metaops[0]
    assert rollout.gen.tensor_parallel and runs_tensor_parallel(rollout)
    with as_run(cost_model):
        assert {lay.tp_degree for lay in cost_model.layouts(rollout, 4)} == {1, 2}
    assert not runs_tensor_parallel(replace(rollout, gen=Generation("sample", 1, denoise_steps=4)))


def test_a_generation_pool_spread_over_nodes_hands_off_over_nvlink():
    """With rollout_lag 1 Loom's role placement also spreads the generation pool over the nodes (pool_order), so
    every generating device has a trainer in its node and receives the weights over NVLink from it (handoff.sender,
    the rule runtime.rollout.Roles sends by), where a pool on the first node receives them over the network."""
    from planner.handoff import sender
    from planner.rlbaselines import level_split_schedule, pool_order

    assert pool_order(8, 4, 4) == (0, 1, 4, 5, 2, 3, 6, 7)
    assert pool_order(8, 4) == tuple(range(8))
    assert pool_order(8, 3, 4) is None and pool_order(4, 2, 4) is None  # not a multiple of the nodes; one node
    assert sender({2, 3, 6, 7}, 4, 4) == 6 and sender({2, 3}, 4, 4) == 2  # in the node, else the lowest
    data = grpo(8, rollout_lag=1)
    data["cluster"] = {"num_nodes": 2, "devices_per_node": 4, "device": "h100"}
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    # the trainer alone on the other devices first (trained_alone), then the scorers side by side
    first = level_split_schedule(problem, 1, True, 0.5, gen_pool=True)
    spread = level_split_schedule(problem, 1, True, 0.5, gen_pool=True, spread=4)
    gen = {d for w in spread.waves for s in w.slices if s.metaop == 0 for d in s.devices}
    assert gen == {0, 1, 4, 5}
    assert not gen & {d for w in spread.waves for s in w.slices if s.metaop != 0 for d in s.devices}
    far, near = (simulate(problem, placed, cost_model) for placed in (first, spread))
    assert far.handoffs and any(h.cross_node for h in far.handoffs)
    assert near.handoffs and not any(h.cross_node for h in near.handoffs)
    assert near.handoff_s < far.handoff_s


def test_role_searches_also_try_the_generation_at_tensor_parallel_1():
    """A curve keeps the fastest layout per count, which decodes tensor-parallel here; the role searches
    (rlbaselines._search) also search a version with the generation's tensor_parallel 1 curve, which the runtime runs,
    and every other MetaOp's curve as it was."""
    from planner.rlbaselines import tp1_generation_version

    data = grpo(8)
    data["components"]["policy"].update(tensor_parallel=[1, 2, 4], hidden_size=4096, num_heads=32, num_layers=4)
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    assert max(lay.tp_degree for lay in problem.curves[0].layouts) > 1
    version = tp1_generation_version(problem, cost_model)
    assert {lay.tp_degree for lay in version.curves[0].layouts} == {1}
    assert version.curves[1:] == problem.curves[1:]
    assert tp1_generation_version(version, cost_model) is None  # nothing left to change
    rollout = problem.graph.metaops[0]  # devices where the generation fits at TP 4 and not at TP 1: no version
    least = {tp: min(cost_model.layer_memory(rollout, Layout(n // tp, tp)) for n in (4, 8)) for tp in (1, 4)}
    data["cluster"]["memory_gib"] = (least[1] + least[4]) / 2 / 2**30
    tight = parse_job(data)
    tight_model = make_cost_model(tight)
    tight_problem = Problem.build(build_metagraph(tight), tight_model)
    assert tp1_generation_version(tight_problem, tight_model) is None
