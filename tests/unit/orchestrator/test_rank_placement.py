"""orchestrator.placement: plan nodes -> Ray placement-group bundles, and the checks before and after placing."""

from __future__ import annotations

import pytest

from orchestrator.placement import (
    ClusterNode, RankPlacement, fitting_nodes, groups_across_nodes, misplaced_ranks, nodes_from_ray,
    placement_mismatch,
)

TWO_BY_TWO = RankPlacement(num_nodes=2, devices_per_node=2)


def node(name: str, cpus: float, gpus: float = 0.0) -> ClusterNode:
    return ClusterNode(node_id=f"id-{name}", address=name, cpus=cpus, gpus=gpus)


def test_one_bundle_per_plan_node_holds_its_ranks():
    assert TWO_BY_TWO.bundles() == [{"CPU": 2.0}, {"CPU": 2.0}]
    assert [TWO_BY_TWO.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    on_gpus = RankPlacement(num_nodes=3, devices_per_node=4, gpus_per_rank=1)
    assert on_gpus.bundles() == [{"CPU": 4.0, "GPU": 4.0}] * 3
    assert on_gpus.world_size == 12 and on_gpus.node_of(11) == 2
    with pytest.raises(AssertionError):
        TWO_BY_TWO.node_of(4)


def test_nodes_from_ray_keeps_alive_nodes_and_their_totals():
    table = [
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}},
        {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"memory": 1e9}},
    ]
    assert nodes_from_ray(table) == [ClusterNode("a", "10.0.0.1", 8.0, 2.0), ClusterNode("c", "10.0.0.3", 0.0, 0.0)]


def test_a_cluster_with_enough_nodes_of_the_plan_size_fits():
    assert placement_mismatch(TWO_BY_TWO, [node("h", 2), node("w", 2)], "x") is None
    assert placement_mismatch(TWO_BY_TWO, [node("h", 0), node("w1", 4), node("w2", 3)], "x") is None  # a CPU-less head
    assert fitting_nodes([node("h", 0), node("w1", 4), node("w2", 1)], TWO_BY_TWO) == [node("w1", 4)]


def test_fewer_nodes_than_the_plan_is_refused_even_with_enough_cpus_in_total():
    problem = placement_mismatch(TWO_BY_TWO, [node("127.0.0.1", 4)], "--address (127.0.0.1:6379)")
    assert problem is not None and "\n" not in problem
    assert problem == (
        "--address (127.0.0.1:6379): the plan needs 2 Ray nodes with 2 CPUs each (one per plan node: 2 nodes x 2 "
        "workers (1 CPU each)), but of the cluster's 1 alive node (127.0.0.1: 4 CPUs) only 1 has that many. Add "
        "nodes of that size, or plan for the cluster you have (cluster.num_nodes: 1, or fewer devices_per_node).")


def test_a_node_smaller_than_a_plan_node_is_refused():
    problem = placement_mismatch(TWO_BY_TWO, [node("a", 2), node("b", 1)], "x")
    assert problem is not None and "of the cluster's 2 alive nodes (a: 2 CPUs, b: 1 CPUs) only 1 has" in problem


def test_gpu_ranks_need_nodes_with_a_gpu_per_rank():
    on_gpus = RankPlacement(num_nodes=2, devices_per_node=2, gpus_per_rank=1)
    assert placement_mismatch(on_gpus, [node("a", 8, 2), node("b", 8, 2)], "x") is None
    problem = placement_mismatch(on_gpus, [node("a", 8, 2), node("b", 8, 1)], "x")
    assert problem is not None and "2 Ray nodes with 2 CPUs and 2 GPUs each" in problem
    assert "(a: 8 CPUs, 2 GPUs, b: 8 CPUs, 1 GPUs) only 1 has" in problem


def test_a_refusal_lists_a_few_nodes_and_counts_the_rest():
    nodes = [node(f"n{i}", 1) for i in range(7)]
    problem = placement_mismatch(TWO_BY_TWO, nodes, "x")
    assert problem is not None and "n3: 1 CPUs and 3 more) only 0 have" in problem and "n4" not in problem


def test_actors_where_the_plan_puts_them_pass():
    assert misplaced_ranks(TWO_BY_TWO, ["A", "A", "B", "B"]) is None


def test_a_plan_node_split_over_two_ray_nodes_is_named():
    assert misplaced_ranks(TWO_BY_TWO, ["A", "B", "B", "B"]) == \
        "plan node 0 is split: rank 1 runs on Ray node B, not A"


def test_two_plan_nodes_on_one_ray_node_are_named():
    assert misplaced_ranks(TWO_BY_TWO, ["A", "A", "A", "A"]) == "plan nodes 0 and 1 share Ray node A"


def test_groups_across_nodes():
    nodes = ["A", "A", "B", "B"]
    assert groups_across_nodes([(0, 1), (2, 3)], nodes) == []
    assert groups_across_nodes([(0, 1), (1, 2), (0, 3)], nodes) == [(1, 2), (0, 3)]


def test_no_node_big_enough_suggests_smaller_plan_nodes_only():
    problem = placement_mismatch(TWO_BY_TWO, [node("a", 1), node("b", 1)], "x")
    assert problem is not None and problem.endswith("plan for the cluster you have (fewer devices_per_node).")
