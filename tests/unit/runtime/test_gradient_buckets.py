"""Gradient buckets: when each parameter's gradient is final (a plan property), and the launch order every rank
derives from it, which must pair up the async all-reduces of every device set (no processes: the workers are
built without process groups)."""

from __future__ import annotations

from planner.api import plan_schedule
from planner.metagraph import build_metagraph
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from runtime.executor import WaveWorker
from runtime.prepare import build_payloads

JOB = parse_job({
    "name": "buckets",
    "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
    "components": {
        "img": {"kind": "vit", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "patch_size": 4, "image_size": 8},
        "txt": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 6},
        "aud": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 6},
    },
    "tasks": [
        {"name": "caption", "batch_size": 8, "components": [{"component": "img"}, {"component": "txt", "seq_len": 5}]},
        {"name": "align", "batch_size": 4, "loss": "contrastive",
         "components": [{"component": "aud", "after": []}, {"component": "txt", "after": []}]},
    ],
})


def plan():
    """The shared txt tower: layer 0 first runs in wave 1 (caption) and again in wave 2 (align), layer 1 in wave 2."""
    ids = {op.name: op.id for op in build_metagraph(JOB).metaops}
    waves = [[("caption.img", 2, 2), ("align.aud", 2, 2)], [("caption.txt", 1, 4)],
             [("caption.txt", 1, 2), ("align.txt", 2, 2)]]
    schedule = Schedule(tuple(Wave(tuple(Slice(ids[n], layers, k) for n, layers, k in w)) for w in waves))
    return plan_schedule(JOB, schedule, method="hand-made")


def test_a_gradient_is_final_after_the_earliest_wave_that_runs_it():
    p = plan()
    by_name = {}
    for h in p.holdings:
        by_name.setdefault((h.name, h.layer), set()).add(h.ready_wave)
    assert by_name[("txt", 0)] == {1} and by_name[("txt", 1)] == {2}
    assert by_name[("img", 0)] == by_name[("img", 1)] == by_name[("aud", 1)] == {0}
    assert by_name[("embed:img", 0)] == by_name[("embed:aud", 0)] == {0}
    assert by_name[("embed:txt", 0)] == {2}  # only align's txt (a root) runs the embedding; caption's reads img's tokens
    assert by_name[("head:caption", 0)] == by_name[("head:align", 0)] == {3}  # after the loss backward


def test_workers_take_their_buckets_from_the_plan(monkeypatch):
    """A worker all-reduces exactly the plan's buckets it shares with others, in the plan's order (but for a bucket
    of modules without parameters, e.g. the contrastive head, which every holder skips alike). It is built from the
    plan alone: with the MetaGraph builder disabled it still builds."""
    import planner.metagraph

    p = plan()
    payloads = build_payloads(JOB, p)  # in the driver

    def refuse(job):
        raise AssertionError("a worker rebuilt the MetaGraph")

    monkeypatch.setattr(planner.metagraph, "build_metagraph", refuse)
    for rank in range(4):
        w = WaveWorker(payloads[rank])
        want = [(b.ready_wave, tuple(b.devices)) for b in p.grad_buckets if rank in b.devices and len(b.devices) > 1
                and any(x.requires_grad for n, layer, _ in b.members for x in w.modules[(n, layer)].parameters())]
        assert [(b.ready_wave, b.devices) for b in w._grad_buckets] == want


def test_every_rank_of_a_device_set_launches_the_same_buckets_in_the_same_order():
    p = plan()
    workers = [WaveWorker(payload) for payload in build_payloads(JOB, p)]
    for w in workers:
        buckets = w._grad_buckets
        waves = [b.ready_wave for b in buckets]
        assert waves == sorted(waves, reverse=True)  # latest-ready first: backward runs the waves in reverse
        shared = [p for b in buckets for p in b.params]
        assert len({id(p) for p in shared}) == len(shared)  # a parameter is in one bucket only
        trainable = {id(p) for m in w.modules.values() for p in m.parameters() if p.requires_grad}
        alone = {id(p) for key, devs in w.holders.items() if len(devs) == 1 and w.rank in devs
                 for p in w.modules[key[:2]].parameters()}
        assert {id(p) for p in shared} == trainable - alone  # every shared trainable parameter is synced
    device_sets = {b.devices for w in workers for b in w._grad_buckets}
    assert (0, 1, 2, 3) in device_sets and len(device_sets) > 1
    for devices in device_sets:
        sequences = [[(b.ready_wave, [tuple(p.shape) for p in b.params]) for b in workers[r]._grad_buckets
                      if b.devices == devices] for r in devices]
        assert all(seq == sequences[0] for seq in sequences), devices
