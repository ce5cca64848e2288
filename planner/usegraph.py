"""A job's use graph: which uses feed which (roots, leaves), what feeds the first layer of a use (:class:`Connection`:
the inputs' shapes against the use's own, see runtime.connect) and which input modules a MetaOp's first layer runs
(:func:`input_modules`, recorded on every MetaOp by build_metagraph, so the plan names each module's holders).

Pure Python: ``loom validate`` checks a job with these (runtime.checks) without torch; the runtime's layer
builders import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner.components import output_shape, upstream_indices, use_shape
from planner.kinds import kind_of
from planner.spec import ComponentSpec, JobSpec, TaskSpec

if TYPE_CHECKING:  # planner.metagraph imports this module to record each MetaOp's input modules
    from planner.metagraph import MetaGraph, MetaOp


# --------------------------------------------------------------------------- task graph


def upstream_uses(task: TaskSpec) -> dict[str, list[str]]:
    """For each use of ``task`` (in order), the uses whose outputs feed it (default: the previous use)."""
    return {use.use_name: task.upstream_names(u) for u, use in enumerate(task.components)}


def root_uses(job: JobSpec, task_index: int) -> list[str]:
    """Uses of the task that read raw data (no upstream use), in task order."""
    return [name for name, ups in upstream_uses(job.tasks[task_index]).items() if not ups]


def leaf_uses(job: JobSpec, task_index: int) -> list[str]:
    """Uses of the task that no other use reads (they feed the loss head), in task order."""
    ups = upstream_uses(job.tasks[task_index])
    read = {u for deps in ups.values() for u in deps}
    return [name for name in ups if name not in read]


def use_component(job: JobSpec, task_index: int, use_name: str) -> tuple[str, ComponentSpec]:
    """(component name, spec) of the use ``use_name`` of task ``task_index``."""
    use = next(u for u in job.tasks[task_index].components if u.use_name == use_name)
    return use.component, job.components[use.component]


def sample_source(job: JobSpec, t: int, u: int) -> int | None:
    """The index of the ``mode: sample`` use whose samples use ``u`` of task ``t`` reads as its images (one of its
    ``after:`` uses is one); None for a use that reads no sample use. Such a use's first layer reads its component's
    input module applied to the samples (runtime.sampleop.sample_pixels), not a connector (runtime.checks says which
    uses may: :func:`runtime.checks.check_sample_reader`)."""
    task = job.tasks[t]
    return next((i for i in upstream_indices(job, t, u) if task.components[i].mode == "sample"), None)


def use_index(job: JobSpec, op: MetaOp) -> tuple[int, int]:
    """(task index, use index) of MetaOp ``op``'s use."""
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    return t, next(i for i, use in enumerate(job.tasks[t].components) if use.use_name == op.use)


# --------------------------------------------------------------------------- connections


@dataclass(frozen=True)
class Connection:
    """What feeds the first layer of a non-root use of a non-bridge kind: each input's output ``(positions, width)``
    in ``after:`` order, and the use's declared ``seq_len`` and ``width``."""

    inputs: tuple[tuple[int, int], ...]
    seq_len: int
    width: int

    @property
    def positions(self) -> int:
        return sum(s for s, _ in self.inputs)

    @property
    def projected(self) -> bool:
        """Whether some input has another width (the use needs its ``adapt:`` module)."""
        return any(w != self.width for _, w in self.inputs)

    @property
    def text_len(self) -> int:
        """The use's own text tokens after its inputs (0 unless its inputs are shorter than it)."""
        return max(self.seq_len - self.positions, 0)

    @property
    def plain(self) -> bool:
        """Whether the inputs are read as they are (concatenated when several)."""
        return not self.projected and self.positions == self.seq_len


def connection(job: JobSpec, t: int, u: int) -> Connection | None:
    """The :class:`Connection` of use ``u`` of task ``t``; None for a root use, a use of a bridge kind and a use reading
    a sample use's images (:func:`sample_source`)."""
    comp = job.components[job.tasks[t].components[u].component]
    ups = upstream_indices(job, t, u)
    if not ups or kind_of(comp).bridge or sample_source(job, t, u) is not None:
        return None
    return Connection(tuple(output_shape(job, t, p) for p in ups), use_shape(job, t, u).seq_len, comp.hidden_size)


def op_connection(job: JobSpec, graph: MetaGraph, op: MetaOp) -> Connection | None:
    """The connection ``op`` applies: its use's, when ``op`` is the use's first MetaOp (fed by other uses) and the
    inputs are not read as they are; else None."""
    if not op.deps or graph.metaops[op.deps[0]].use == op.use:
        return None
    c = connection(job, *use_index(job, op))
    return None if c is None or c.plain else c


def reads_embed(job: JobSpec, graph: MetaGraph, op: MetaOp) -> bool:
    """Whether ``op``'s layer 0 starts with its component's input module: a root MetaOp's (raw data in), the first
    MetaOp of a decoder or unet2d use fed by another use (the module also reads the upstream output), and the first
    MetaOp of a use reading a sample use's images (:func:`sample_source`: the module embeds them)."""
    if not op.deps:
        return True
    if graph.metaops[op.deps[0]].use == op.use:
        return False
    return kind_of(job.components[op.component]).bridge or sample_source(job, *use_index(job, op)) is not None


def input_modules(job: JobSpec, graph: MetaGraph, op: MetaOp) -> list[str]:
    """Names of the modules ``op``'s first layer runs before it (each a module ``(name, 0)``): ``embed:<component>``
    where :func:`reads_embed` or a connector adds the use's text, ``adapt:<component>`` where a connector projects
    an input (runtime.connect). Empty for a MetaOp that reads its inputs as they are."""
    c = op_connection(job, graph, op)
    if c is None:
        return ["embed:" + op.component] if reads_embed(job, graph, op) else []
    return ["adapt:" + op.component] * c.projected + ["embed:" + op.component] * bool(c.text_len)
