"""Which Ray node runs which rank: the plan's nodes mapped onto a cluster's nodes (pure; imports no Ray).

The plan numbers its devices 0..N-1 and puts device ``d`` on plan node ``d // devices_per_node``; the
planner keeps every slice's tensor-parallel groups (and its heavy flows) inside one plan node. Rank
``r`` of a run is device ``r``. A run therefore needs each plan node on one Ray node of its own:
plan node ``i`` on a Ray node that holds all of ranks ``i * devices_per_node ..`` and no rank of any
other plan node. :class:`RankPlacement` is that decision as data (the Ray placement-group bundles
and which bundle each rank takes); :func:`placement_mismatch` says, before anything is reserved,
why a cluster cannot hold it; :func:`misplaced_ranks` checks where the actors actually run.

The Ray side (reserving the bundles, scheduling actors into them) is
:func:`orchestrator.actors.reserve_nodes` and :func:`orchestrator.actors.create_actors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

MAX_NODES_LISTED = 4  # a refusal names this many of the cluster's nodes, then counts the rest


@dataclass(frozen=True)
class ClusterNode:
    """One alive Ray node: its id (hex), address and total resources (not what is free now)."""

    node_id: str
    address: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class RankPlacement:
    """Ranks on nodes: plan node ``i`` holds ranks ``i * devices_per_node .. (i + 1) * devices_per_node - 1``,
    each rank taking ``cpus_per_rank`` CPUs and ``gpus_per_rank`` GPUs of its node's bundle."""

    num_nodes: int
    devices_per_node: int
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """The plan node of ``rank`` (also the index of its placement-group bundle)."""
        assert 0 <= rank < self.world_size, (rank, self.world_size)
        return rank // self.devices_per_node

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per plan node, each holding that node's ranks' resources. Reserved with ``STRICT_SPREAD``
        (every bundle on a different Ray node), a bundle is a whole plan node on one Ray node: see
        :func:`orchestrator.actors.reserve_nodes` for why one bundle per node rather than one per device."""
        bundle = {"CPU": self.cpus_per_rank * self.devices_per_node}
        if self.gpus_per_rank:
            bundle["GPU"] = self.gpus_per_rank * self.devices_per_node
        return [dict(bundle) for _ in range(self.num_nodes)]

    def describe(self) -> str:
        """``2 nodes x 2 workers (1 CPU each)``: what a refusal says the plan needs."""
        each = f"{self.cpus_per_rank:g} CPU" + (f" + {self.gpus_per_rank:g} GPU" if self.gpus_per_rank else "")
        nodes = "node" if self.num_nodes == 1 else "nodes"
        return f"{self.num_nodes} {nodes} x {self.devices_per_node} workers ({each} each)"


def nodes_from_ray(table: Iterable[dict[str, Any]]) -> list[ClusterNode]:
    """The alive nodes of ``ray.nodes()`` (a list of dicts with NodeID, Alive, NodeManagerAddress, Resources)."""
    return [ClusterNode(node_id=n["NodeID"], address=n.get("NodeManagerAddress", "?"),
                        cpus=float(n.get("Resources", {}).get("CPU", 0.0)),
                        gpus=float(n.get("Resources", {}).get("GPU", 0.0)))
            for n in table if n.get("Alive")]


def fitting_nodes(nodes: Sequence[ClusterNode], placement: RankPlacement) -> list[ClusterNode]:
    """The nodes that can hold one plan node's ranks on their own."""
    need = placement.bundles()[0]
    return [n for n in nodes if n.cpus >= need["CPU"] and n.gpus >= need.get("GPU", 0.0)]


def placement_mismatch(placement: RankPlacement, nodes: Sequence[ClusterNode], where: str) -> str | None:
    """Why ``nodes`` cannot hold ``placement`` (one line naming the numbers and a fix), or None when they can.

    Counts total resources: a node that is big enough but busy is the placement group's timeout's to report."""
    fit = fitting_nodes(nodes, placement)
    if len(fit) >= placement.num_nodes:
        return None
    need = placement.bundles()[0]
    size = f"{need['CPU']:g} CPUs" + (f" and {need['GPU']:g} GPUs" if "GPU" in need else "")
    listed = ", ".join(f"{n.address}: {n.cpus:g} CPUs" + (f", {n.gpus:g} GPUs" if "GPU" in need else "")
                       for n in nodes[:MAX_NODES_LISTED])
    more = f" and {len(nodes) - MAX_NODES_LISTED} more" if len(nodes) > MAX_NODES_LISTED else ""
    alive = f"{len(nodes)} alive node" + ("" if len(nodes) == 1 else "s")
    fix = f"cluster.num_nodes: {len(fit)}, or fewer devices_per_node" if fit else "fewer devices_per_node"
    wanted = f"{placement.num_nodes} Ray node" + ("" if placement.num_nodes == 1 else "s")
    return (f"{where}: the plan needs {wanted} with {size} each (one per plan node: "
            f"{placement.describe()}), but of the cluster's {alive} ({listed}{more}) only {len(fit)} "
            f"{'has' if len(fit) == 1 else 'have'} that many. Add nodes of that size, or plan for the cluster you "
            f"have ({fix}).")


def misplaced_ranks(placement: RankPlacement, node_of_rank: Sequence[str]) -> str | None:
    """Check where the actors run (``node_of_rank[r]``: rank r's Ray node id): every plan node on one Ray node, no
    two plan nodes on the same one. One line naming the first broken rule, or None."""
    assert len(node_of_rank) == placement.world_size, (len(node_of_rank), placement.world_size)
    ray_node_of: dict[int, str] = {}
    for rank, ray_node in enumerate(node_of_rank):
        plan_node = placement.node_of(rank)
        first = ray_node_of.setdefault(plan_node, ray_node)
        if first != ray_node:
            return f"plan node {plan_node} is split: rank {rank} runs on Ray node {ray_node}, not {first}"
    owners: dict[str, int] = {}
    for plan_node, ray_node in sorted(ray_node_of.items()):
        other = owners.setdefault(ray_node, plan_node)
        if other != plan_node:
            return f"plan nodes {other} and {plan_node} share Ray node {ray_node}"
    return None


def groups_across_nodes(groups: Iterable[Sequence[int]], node_of_rank: Sequence[str]) -> list[tuple[int, ...]]:
    """The rank groups (e.g. a plan's tensor-parallel groups) whose ranks run on more than one Ray node."""
    return [tuple(g) for g in groups if len({node_of_rank[r] for r in g}) > 1]
