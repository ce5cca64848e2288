"""``training.rollout_lag: 1`` at run time: which weights a generate MetaOp decodes step k's rollouts with (those step
k-1 started from, W_{k-1}; step 0's with the initial ones), computed two ways that must agree.

- :class:`Behaviour` (the single-process reference, runtime.reference): decodes step k's rows at step k with a copy
  of W_{k-1} it took at step k-1 (the definition, written the plain way).
- :class:`RolloutsAhead` (every worker, runtime.executor): decodes step k+1's rows at step k with the weights it holds
  then, W_k (and step k+1's seeds), so no weight copy is kept, and step k uses the rows decoded at step k-1. On the
  generation's own pool (planner.rolloutlag.generation_pool: no device runs both a generate slice and another) that
  decode runs in a thread beside the rest of step k (the others' scoring and training, the gradient sync): the
  overlap planner.rolloutlag prices, by the same rule. Its rows are part of the worker's checkpoint (runtime.portable), so a resumed run decodes
  nothing again and equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from planner.spec import JobSpec
from runtime.sampleop import layer_keys

Key = tuple[str, int]  # (module name, layer), as runtime.rollout's
# (step, then the first and end row of each span: runtime.rollout.run_generate) of a generate MetaOp's decoded rows
Rows = tuple[int, ...]


class Behaviour:
    """The reference's lag: at step k the process's modules hold W_k; :meth:`lookup` copies them for step k+1 (at the
    step's first lookup: its micro-batches share one W_k) and answers with the copy taken at step k-1 (the modules
    themselves at step 0, or when step k-1 did not run here)."""

    def __init__(self):
        # MetaOp -> (step copied at, copies, the copies of the step before or None)
        self.kept: dict[int, tuple[int, dict[Key, nn.Module], dict[Key, nn.Module] | None]] = {}

    def lookup(self, job: JobSpec, op, module: Callable[[str, int], nn.Module], step: int
               ) -> Callable[[str, int], nn.Module]:
        kept = self.kept.get(op.id)
        if kept is None or kept[0] != step:
            keys = [("embed:" + op.component, 0), *layer_keys(job, op), ("head:" + op.task, 0)]
            before = kept[1] if kept is not None and kept[0] == step - 1 else None
            with torch.no_grad():
                kept = self.kept[op.id] = (step, {k: copy.deepcopy(module(*k)) for k in keys}, before)
        before = kept[2]
        return module if before is None else lambda name, layer: before[(name, layer)]


class RolloutsAhead:
    """One worker's rows decoded a step ahead, by generate MetaOp (module docstring). ``background``: decode them in a
    thread (the worker is in the generation's own pool); :meth:`wait` joins it, and must run before the worker's
    weights change (optimizer step, hand-off) or are saved."""

    def __init__(self, background: bool):
        self.rows: dict[int, tuple[Rows, torch.Tensor]] = {}
        self.pending: dict[int, tuple[Rows, Future]] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if background else None
        self.span: tuple[float, float] | None = None  # perf_counter start and end of the last decode ahead

    def take(self, op: int, rows: Rows, decode: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Step ``rows[0]``'s rows (:data:`Rows`) of MetaOp ``op``: those decoded a step ahead, else (step 0, or a
        restart without them) ``decode(step)`` now, with the weights the step starts from."""
        self.wait()
        kept = self.rows.pop(op, None)
        return kept[1] if kept is not None and kept[0] == rows else decode(rows[0])

    def ahead(self, op: int, rows: Rows, decode: Callable[[int], torch.Tensor]) -> None:
        """Decode ``rows`` (the next step's) with the weights held now: in the thread, or at once."""
        timed = self._timed(decode)
        if self.pool is None:
            self.rows[op] = (rows, timed(rows[0]))
        else:
            self.pending[op] = (rows, self.pool.submit(timed, rows[0]))

    def _timed(self, decode: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
        def run(step: int) -> torch.Tensor:
            start = time.perf_counter()
            out = decode(step)
            self.span = (start, time.perf_counter())
            return out
        return run

    def wait(self) -> None:
        """Join the decodes in flight (their errors raise here)."""
        for op, (rows, future) in list(self.pending.items()):
            self.rows[op] = (rows, future.result())
            del self.pending[op]

    def state(self) -> dict[int, tuple[Rows, torch.Tensor]]:
        """The rows decoded ahead (after :meth:`wait`), for a checkpoint."""
        self.wait()
        return {op: (rows, t.detach().cpu().clone()) for op, (rows, t) in self.rows.items()}

    def restore(self, state: dict[int, tuple[Rows, torch.Tensor]], device: torch.device) -> None:
        self.wait()
        self.rows = {op: (tuple(rows), t.to(device)) for op, (rows, t) in state.items()}
