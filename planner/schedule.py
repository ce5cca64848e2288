"""Wave schedules: the common currency of every scheduler, placement and the simulator.

A :class:`Schedule` is an ordered tuple of :class:`Wave`; a wave holds at most one
:class:`Slice` per MetaOp (``num_layers`` consecutive layers of it on ``num_devices`` devices).
Waves run one after another; inside a wave the slices run concurrently on disjoint devices. The runtime runs
every wave's forward in order and then every backward in reverse (planner.timeline), so a wave lasts its largest
forward plus its largest backward (:meth:`Problem.duration`): more than its slowest slice where its slices split
their compute differently between the passes (a recomputed layer, a frozen scorer, a decode). Device ids are chosen
later by placement.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from planner.costmodel import CostModel, Curve
from planner.metagraph import MetaGraph


@dataclass(frozen=True)
class Slice:
    """``num_layers`` consecutive layers of MetaOp ``metaop`` on ``num_devices`` devices."""

    metaop: int
    num_layers: int
    num_devices: int


@dataclass(frozen=True)
class Wave:
    slices: tuple[Slice, ...]

    @property
    def num_devices(self) -> int:
        return sum(s.num_devices for s in self.slices)


@dataclass(frozen=True)
class Schedule:
    waves: tuple[Wave, ...]


@dataclass(frozen=True)
class Problem:
    """What a scheduler sees: the MetaGraph, one curve per MetaOp (indexed by id) and N devices."""

    graph: MetaGraph
    curves: tuple[Curve, ...]
    num_devices: int

    @classmethod
    def build(cls, graph: MetaGraph, cost_model: CostModel) -> Problem:
        return cls(graph, tuple(cost_model.curve(op) for op in graph.metaops), cost_model.hw.num_devices)

    def layers(self, m: int) -> int:
        return self.graph.metaops[m].num_layers

    def slice_time(self, s: Slice) -> float:
        return self.curves[s.metaop].time(s.num_devices) * s.num_layers

    def forward_fraction(self, s: Slice) -> float:
        """The share of ``s``'s compute that runs in forward (its curve's, CostModel.forward_fraction; by passes for a
        curve built without shares)."""
        share = self.curves[s.metaop].forward_fraction(s.num_devices)
        return share if share is not None else CostModel.passes_fraction(self.graph.metaops[s.metaop])

    @functools.cached_property
    def forward_shares(self) -> tuple[tuple[float, ...], ...]:
        """Per MetaOp, :meth:`forward_fraction` at each of its curve's counts."""
        return tuple(tuple(self.forward_fraction(Slice(m, 1, n)) for n in curve.counts)
                     for m, curve in enumerate(self.curves))

    @functools.cached_property
    def pass_times(self) -> tuple[dict[int, tuple[float, float]], ...]:
        """Per MetaOp, count -> a layer's (forward, backward) seconds there (:meth:`forward_fraction` of its time)."""
        return tuple({n: (t * f, t - t * f) for n, t, f in zip(curve.counts, curve.times, shares)}
                     for curve, shares in zip(self.curves, self.forward_shares))

    def duration(self, slices: Iterable[tuple[int, int, int]]) -> float:
        """Seconds of a wave of ``slices`` (MetaOp, devices, layers) on the timeline: its largest forward plus its
        largest backward (each pass's slices run together, the passes one after the other)."""
        forward = backward = 0.0
        times = self.pass_times
        for m, n, l in slices:
            f, b = times[m][n]
            forward, backward = max(forward, f * l), max(backward, b * l)
        return forward + backward


def wave_duration(problem: Problem, wave: Wave) -> float:
    """Seconds of the wave's compute: its largest forward plus its largest backward (:meth:`Problem.duration`)."""
    return problem.duration((s.metaop, s.num_devices, s.num_layers) for s in wave.slices)


def compute_makespan(problem: Problem, schedule: Schedule) -> float:
    """Sum of wave durations: the compute part of the iteration time."""
    return sum(wave_duration(problem, w) for w in schedule.waves)


class ScheduleError(AssertionError):
    """A schedule violates an invariant (a bug in a scheduler, never a user error)."""


def check_schedule(problem: Problem, schedule: Schedule) -> None:
    """Raise ScheduleError unless: every layer of every MetaOp runs exactly once, no MetaOp runs in a wave
    before all its predecessors have finished, a MetaOp has at most one slice per wave, each slice uses a
    valid device count, and no wave uses more than N devices."""
    done = [0] * len(problem.graph)
    finished_before: list[bool] = [False] * len(problem.graph)
    for k, wave in enumerate(schedule.waves):
        if wave.num_devices > problem.num_devices:
            raise ScheduleError(f"wave {k} uses {wave.num_devices} devices > N={problem.num_devices}")
        seen: set[int] = set()
        for s in wave.slices:
            op = problem.graph.metaops[s.metaop]
            if s.metaop in seen:
                raise ScheduleError(f"wave {k}: MetaOp {op.name} has two slices")
            seen.add(s.metaop)
            if s.num_layers <= 0:
                raise ScheduleError(f"wave {k}: MetaOp {op.name} has a slice of {s.num_layers} layers")
            if s.num_devices not in problem.curves[s.metaop].counts:
                raise ScheduleError(f"wave {k}: MetaOp {op.name} on {s.num_devices} devices, not a valid count")
            for d in op.deps:
                if not finished_before[d]:
                    raise ScheduleError(f"wave {k}: MetaOp {op.name} runs before its predecessor "
                                        f"{problem.graph.metaops[d].name} finished")
            done[s.metaop] += s.num_layers
        for m in seen:
            if done[m] > problem.layers(m):
                raise ScheduleError(f"MetaOp {problem.graph.metaops[m].name} runs {done[m]} > {problem.layers(m)} layers")
        for m in seen:
            finished_before[m] = done[m] == problem.layers(m)
    for m, count in enumerate(done):
        if count != problem.layers(m):
            raise ScheduleError(f"MetaOp {problem.graph.metaops[m].name} runs {count} of {problem.layers(m)} layers")


def merge_adjacent_waves(problem: Problem, waves: Sequence[Wave]) -> tuple[Wave, ...]:
    """Merge consecutive waves that hold exactly the same (MetaOp, devices) set (fewer transfers, same time)."""
    out: list[Wave] = []
    for wave in waves:
        if not wave.slices:
            continue
        if out and _signature(out[-1]) == _signature(wave):
            prev = {s.metaop: s for s in out[-1].slices}
            out[-1] = Wave(tuple(
                Slice(s.metaop, s.num_layers + prev[s.metaop].num_layers, s.num_devices) for s in wave.slices
            ))
        else:
            out.append(wave)
    return tuple(out)


def _signature(wave: Wave) -> frozenset[tuple[int, int]]:
    return frozenset((s.metaop, s.num_devices) for s in wave.slices)


def independent_runs(problem: Problem, schedule: Schedule) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive waves with no dependency between any two of their MetaOps:
    the waves of such a run may be executed in any order."""
    runs, start, members = [], 0, set()
    for k, wave in enumerate(schedule.waves):
        ops = {s.metaop for s in wave.slices}
        if any(d in members for m in ops for d in problem.graph.metaops[m].deps):
            runs.append((start, k))
            start, members = k, set()
        members |= ops
    runs.append((start, len(schedule.waves)))
    return runs


def reverse_runs(problem: Problem, schedule: Schedule) -> Schedule:
    """The same waves with each independent run in reverse order (a valid schedule with other transfer and
    sync overlap: the last forward wave's gradients are ready first)."""
    waves: list[Wave] = []
    for start, end in independent_runs(problem, schedule):
        waves.extend(reversed(schedule.waves[start:end]))
    return Schedule(tuple(waves))


def memory_tightened(problem: Problem, cost_model: CostModel, share: float) -> Problem | None:
    """``problem`` with each MetaOp's counts and layouts limited to those where all its layers take at most ``share``
    of a device's memory (a MetaOp with no such count keeps its curve); None when no curve changes. The cost model
    picks each count's fastest layout within its memory limit, so a tighter limit trades speed for memory (a larger
    tensor-parallel degree, a wider optimizer shard), leaving room for the other slices a device runs."""
    curves = []
    for op, curve in zip(problem.graph.metaops, problem.curves):
        tight = cost_model._build_curve_within(op, share * cost_model.hw.memory_bytes / op.num_layers)
        curves.append(curve if tight is None else tight)
    return None if tuple(curves) == problem.curves else replace(problem, curves=tuple(curves))
