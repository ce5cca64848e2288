"""Shapes files (planner.shapes): parsing, resolution against a job, errors, clustering and the bucket lookup;
the device renumbering of planner.align and the plan choice of planner.cache_choice on hand-made prices."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from planner.align import max_assignment, node_preserving_permutation
from planner.cache_choice import INF, Priced, choose_plans, draw_buckets, expected_time, improve
from planner.errors import SpecError
from planner.shapes import cluster_points, job_at, load_shapes, parse_shapes, pick_bucket
from planner.spec import load_job

ROOT = Path(__file__).resolve().parents[3]
VLM = ROOT / "examples" / "vlm-cpu.yaml"


@pytest.fixture(scope="module")
def job():
    return load_job(VLM)


def test_distribution_is_the_product_of_normalised_marginals(job):
    shapes = parse_shapes({"distribution": {"caption": {"batch_size": {8: 1, 16: 3}},
                                            "match": {"seq_len": {"lm": {4: 2, 8: 2}}}}}, job)
    assert shapes.dims == (("caption", "batch_size", ""), ("match", "seq_len", "lm"))
    assert shapes.job_values == (16, 8)
    assert shapes.points == pytest.approx({(8, 4): 0.125, (8, 8): 0.125, (16, 4): 0.375, (16, 8): 0.375})
    assert shapes.mean() == (16, 8)  # 14 and 6, rounded to the nearest values the file gives (the larger on a tie)
    assert shapes.max() == (16, 8)


def test_batches_merge_equal_shapes_and_keep_the_jobs_values_elsewhere(job):
    shapes = parse_shapes({"batches": [
        {"tasks": {"caption": {"batch_size": 8}}},
        {"weight": 2, "tasks": {"caption": {"batch_size": 8}}},
        {"tasks": {"rate": {"seq_len": {"reward": 1}}, "caption": {"batch_size": 32}}},
    ]}, job)
    assert shapes.dims == (("caption", "batch_size", ""), ("rate", "seq_len", "reward"))
    # the first two batches leave rate's reward use at the job's seq_len (1): one shape with 3 of 4 weight units
    assert shapes.points == pytest.approx({(8, 1): 0.75, (32, 1): 0.25})


def test_job_at_writes_each_value_into_its_task_or_use(job):
    shaped = job_at(job, (("caption", "batch_size", ""), ("match", "seq_len", "lm")), (4, 6))
    tasks = {t.name: t for t in shaped.tasks}
    assert tasks["caption"].batch_size == 4
    assert [u.seq_len for u in tasks["match"].components] == [None, 6]
    assert tasks["vqa"] == {t.name: t for t in job.tasks}["vqa"]  # untouched


@pytest.mark.parametrize("doc, expected", [
    ({"distribution": {"captoin": {"batch_size": {8: 1}}}}, "'captoin' is not a task of job 'vlm-cpu'; did you mean 'caption'?"),
    ({"distribution": {"caption": {"seq_len": {"lmm": {8: 1}}}}}, "'lmm' is not a use of task 'caption'; did you mean 'lm'?"),
    ({"distribution": {"caption": {"seq_len": {"vision": {8: 1}}}}}, "no seq_len, so it cannot vary"),
    ({"distribution": {"caption": {"batch_size": {0: 1}}}}, "distribution.caption.batch_size: key 0:"),
    ({"distribution": {"caption": {"batch_size": {8: 0}}}}, "distribution.caption.batch_size[8] (0): input should be greater than 0"),
    ({"distribution": {"caption": {"batch_sise": {8: 1}}}}, "distribution.caption.batch_sise: unknown key; did you mean 'batch_size'?"),
    ({"batches": [{"tasks": {"caption": {"batch_size": 8}}}], "distribution": {"caption": {"batch_size": {8: 1}}}},
     "give exactly one of `batches`"),
    ({}, "give exactly one of `batches`"),
    ({"max_buckets": 99, "batches": [{"tasks": {}}]}, "max_buckets (99): input should be less than or equal to 8"),
    ({"batches": [{"weight": float("nan"), "tasks": {}}]}, "batches[0].weight (nan): input should be a finite number"),
    ({"distribution": {"caption": {"image_size": {"vision": {15: 1}}}}}, "is not a multiple of components.vision.patch_size"),
    ({"distribution": {"caption": {"seq_len": {"lm": {3_000_000: 1}}}}}, "caption.seq_len.lm (3000000) is over the limit"),
    ({"distribution": {"caption": {"batch_size": {v: 1 for v in range(1, 41)}},
                       "vqa": {"batch_size": {v: 1 for v in range(1, 41)}}}}, "1600 combinations of values is over the limit"),
])
def test_bad_shapes_are_one_spec_error_naming_the_file_and_path(job, doc, expected):
    with pytest.raises(SpecError) as err:
        parse_shapes(doc, job, "s.yaml")
    assert str(err.value).startswith("s.yaml: ")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_the_batches_limit_is_what_a_shapes_file_holds(job, tmp_path):
    """A shapes file is read as a job spec, at most MAX_SPEC_BYTES (256 KiB), while `batches:` allowed 100,000
    entries: several MB, which no file could hold (a 100,000-entry log of 6.8 MB was refused by its size, and took
    PyYAML 40 s to parse). The entry limit is what the file holds at 64 bytes an entry: a file at the limit loads, one
    entry more is refused by its count, with the fix (each distinct batch once, weighted)."""
    from planner.shapes import MAX_BATCHES
    from planner.spec_file import MAX_SPEC_BYTES

    entry = "  - {weight: 2, tasks: {caption: {batch_size: 16}, rate: {batch_size: 8}}}\n"  # 76 bytes
    path = tmp_path / "log.yaml"
    path.write_text("batches:\n" + entry * MAX_BATCHES)
    assert MAX_BATCHES * 64 <= MAX_SPEC_BYTES < path.stat().st_size  # entries longer than 64 bytes: the size limit
    with pytest.raises(SpecError, match="bytes is too large for a shapes file"):
        load_shapes(path, job)
    path.write_text("batches:\n" + entry.replace(", rate: {batch_size: 8}", "") * MAX_BATCHES)
    shapes = load_shapes(path, job)
    assert len(shapes.points) == 1
    with pytest.raises(SpecError) as err:
        parse_shapes({"batches": [{"tasks": {}}] * (MAX_BATCHES + 1)}, job, "s.yaml")
    assert str(err.value) == (f"s.yaml: batches: {MAX_BATCHES + 1} entries, over the limit of {MAX_BATCHES} (what a "
                              "shapes file of at most 256 KiB holds). Give each distinct batch once, with how often "
                              "it occurs as its `weight` (docs/shapes.md).")


def test_a_file_that_is_not_a_mapping_or_not_yaml_is_an_error(job, tmp_path):
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    with pytest.raises(SpecError, match="list.yaml: the top level must be a mapping"):
        load_shapes(tmp_path / "list.yaml", job)
    (tmp_path / "broken.yaml").write_text("distribution: {caption: [\n")
    with pytest.raises(SpecError, match="broken.yaml"):
        load_shapes(tmp_path / "broken.yaml", job)


def test_grad_accum_steps_must_divide_every_batch_size(job):
    accum = job.model_copy(update={"training": job.training.model_copy(update={"grad_accum_steps": 4})})
    with pytest.raises(SpecError, match=r"caption.batch_size \(6\) is not divisible by training.grad_accum_steps \(4\)"):
        parse_shapes({"distribution": {"caption": {"batch_size": {8: 1, 6: 1}}}}, accum)
    shapes = parse_shapes({"distribution": {"caption": {"batch_size": {8: 1, 12: 2}}}}, accum)
    assert shapes.mean() == (12,)  # 10.67, rounded to the nearest value the file gives


def test_clusters_partition_the_points_and_separate_distant_shapes(job):
    shapes = parse_shapes({"max_buckets": 2, "distribution": {
        "caption": {"batch_size": {2: 1, 4: 1, 64: 1, 128: 1}}}}, job)
    groups = cluster_points(shapes, 2)
    assert sorted(p for g in groups for p in g) == sorted(shapes.points)
    assert sorted(sorted(g) for g in groups) == [[(2,), (4,)], [(64,), (128,)]]
    assert cluster_points(shapes, 2) == groups  # deterministic
    assert len(cluster_points(shapes, 10)) == 4  # never more clusters than points


def test_pick_bucket_prefers_a_listed_shape_then_one_that_holds_it():
    buckets = [[(8, 4), (8, 8)], [(16, 4), (32, 16)]]
    assert pick_bucket(buckets, (16, 4)) == 1
    assert pick_bucket(buckets, (8, 8)) == 0
    assert pick_bucket(buckets, (4, 2)) == 0  # not listed: the first bucket with a member at least as large
    assert pick_bucket(buckets, (20, 10)) == 1
    assert pick_bucket(buckets, (64, 1)) is None


def test_max_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(20):
            w = rng.integers(0, 6, (n, n)).astype(float)
            col = max_assignment(w)
            assert sorted(col) == list(range(n))
            best = max(sum(w[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert sum(w[i, col[i]] for i in range(n)) == pytest.approx(best)


def test_node_preserving_permutation_maps_whole_nodes_and_recovers_a_relabelling():
    rng = np.random.default_rng(1)
    n, dpn = 8, 4
    truth = [5, 4, 7, 6, 1, 0, 3, 2]  # node 0 -> node 1 and node 1 -> node 0, devices shuffled inside
    kept = rng.uniform(0, 0.1, (n, n))
    for d, e in enumerate(truth):
        kept[d, e] += 10.0
    perm = node_preserving_permutation(kept, dpn)
    assert perm == truth
    assert all(len({perm[d] // dpn for d in range(a * dpn, (a + 1) * dpn)}) == 1 for a in range(n // dpn))


def _priced(seconds, probs, switch):
    return Priced(list(range(len(seconds))), list(range(len(probs))), probs, seconds, switch)


def test_choose_plans_takes_a_second_plan_only_when_switching_pays():
    # plan 0 is fine everywhere, plan 1 is much faster on shape 1 and does not fit shape 0
    seconds = [[1.0, 2.0], [INF, 1.0]]
    probs = [0.5, 0.5]
    cheap = _priced(seconds, probs, [[0.0, 0.1], [0.1, 0.0]])
    assert choose_plans(cheap, 2, 1) == [0, 1]
    assert expected_time(cheap, [0, 1], 1) == pytest.approx((1.0 + 0.05, 0.05))  # 0.5*0.5*0.1 both ways
    dear = _priced(seconds, probs, [[0.0, 4.0], [4.0, 0.0]])
    assert choose_plans(dear, 2, 1) == [0, 0]  # 2 s of switching in expectation beats 0.5 s saved
    assert choose_plans(dear, 2, 100) == [0, 1]  # unless a bucket is served for 100 steps
    assert choose_plans(cheap, 1, 1) == [0, 0]  # one plan at most: the best static one
    assert choose_plans(cheap, 2, 1, allowed=[0]) == [0, 0]  # plan 1 not allowed (e.g. it holds elsewhere)
    faster = _priced([[1.0, 2.0], [INF, 1.0], [0.9, 1.9]], probs, [[0.0] * 3] * 3)
    assert choose_plans(faster, 1, 1, allowed=[0, 1]) == [0, 0]  # the best static among the allowed


def test_choose_plans_is_never_worse_than_the_best_static_plan():
    rng = np.random.default_rng(2)
    for _ in range(30):
        plans, points = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        seconds = rng.uniform(0.5, 2.0, (plans, points))
        seconds[rng.uniform(size=seconds.shape) < 0.2] = INF
        seconds[0] = rng.uniform(1.0, 2.0, points)  # one plan fits every shape
        probs = rng.dirichlet(np.ones(points)).tolist()
        switch = rng.uniform(0, 1, (plans, plans))
        np.fill_diagonal(switch, 0)
        priced = _priced(seconds.tolist(), probs, switch.tolist())
        run_length = int(rng.integers(1, 50))
        choice = choose_plans(priced, int(rng.integers(1, 4)), run_length)
        static = min(expected_time(priced, [i] * points, run_length)[0] for i in range(plans)
                     if not any(math.isinf(t) for t in seconds[i]))
        assert expected_time(priced, choice, run_length)[0] <= static * (1 + 1e-9)
        assert all(seconds[i][j] < INF for j, i in enumerate(choice))
        assert improve(priced, choice, sorted(set(choice)), run_length) == choice  # a local optimum


def test_expected_time_is_the_mean_over_a_drawn_sequence_of_steps():
    """expected_time against the process the runtime follows (draw_buckets): a bucket drawn per run of run_length
    steps, each step a shape of it drawn with the members' weights, a switch paid whenever the plan changes."""
    seconds = [[1.0, 3.0, 2.0], [4.0, 1.0, 2.5]]
    probs = [0.3, 0.5, 0.2]
    switch = [[0.0, 2.0], [1.0, 0.0]]
    priced = _priced(seconds, probs, switch)
    choice = [0, 1, 0]  # plan 0 runs shapes 0 and 2 (mass 0.5), plan 1 shape 1 (mass 0.5)
    masses = [0.5, 0.5]
    members = {0: ([0, 2], [0.6, 0.4]), 1: ([1], [1.0])}
    rng = np.random.default_rng(3)
    for run_length in (1, 4):
        steps = 40_000
        order = draw_buckets(masses, run_length, steps, seed=5)
        assert order == draw_buckets(masses, run_length, steps, seed=5)
        assert all(order[k] == order[k - k % run_length] for k in range(steps))
        total = 0.0
        for k, plan in enumerate(order):
            shapes, weights = members[plan]
            total += seconds[plan][shapes[rng.choice(len(shapes), p=weights)]]
            if k and order[k - 1] != plan:
                total += switch[order[k - 1]][plan]
        expected, switching = expected_time(priced, choice, run_length)
        assert switching == pytest.approx(0.25 * 3.0 / run_length)
        assert total / steps == pytest.approx(expected, rel=0.02)


def test_weights_near_the_float_maximum_normalise(job):
    """1e308 + 1e308 overflows to inf: weights are scaled by the largest before they are summed."""
    shapes = parse_shapes({"distribution": {"caption": {"batch_size": {8: 1e308, 16: 1e308}}}}, job)
    assert shapes.points == pytest.approx({(8,): 0.5, (16,): 0.5})
    shapes = parse_shapes({"batches": [{"weight": 1e308, "tasks": {"caption": {"batch_size": 8}}},
                                       {"weight": 1e308, "tasks": {"caption": {"batch_size": 8}}},
                                       {"weight": 5e-324, "tasks": {"caption": {"batch_size": 16}}}]}, job)
    assert shapes.points[(8,)] == pytest.approx(1.0) and math.isfinite(sum(shapes.points.values()))
