"""Single-process training of a job: the reference every distributed run must reproduce.

The same modules (built by runtime.modules with the same seeds), the same synthetic batches and
the same AdamW (runtime.optim's parameter groups, learning-rate schedule, clipping and autocast), with
every task's whole batch on one device, or its ``training.grad_accum_steps`` micro-batches one after the
other. Parameter names match :meth:`runtime.executor.WaveWorker.named_parameters`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from planner.metagraph import build_metagraph
from planner.spec import JobSpec
from runtime.assignment import input_order
from runtime.data import TaskBatch, task_batch
from runtime.embeddings import build_input_module, first_input
from runtime.heads import build_head
from runtime.init_from import MODEL_FILE, load_model  # noqa: F401  (re-exported: a run's model file, read back)
from runtime.init_from import ModelFileError
from runtime.modules import build_layer, layer_kwargs, row_kwargs
from runtime.sampleop import WHOLE_USE_MODES, build_module, layer_keys, run_sample, sample_context
from runtime.optim import autocast, build_grouped_optimizer, module_component, set_lr
from runtime.lagged import Behaviour
from runtime.rollout import (
    copy_weights_from, forward_only, freeze_untrained, has_modes, rollout_input, run_generate, seq_len_of,
    use_of,
)


def save_model(path: str | Path, per_rank: list[dict[str, torch.Tensor]]) -> None:
    """Write the union of every rank's :meth:`WaveWorker.named_parameters` (replicas are equal after a step) as
    ``{"parameters": {name: tensor}}``, atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"parameters": merge_parameters(per_rank)}, tmp)
    os.replace(tmp, path)


def merge_parameters(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The union of every rank's named parameters (replicas are equal after a step; a copy only to decode with holds
    its matrices in the compute precision, runtime.rollout.lower_matrices: a float32 replica wins), sorted by name."""
    merged: dict[str, torch.Tensor] = {}
    for params in per_rank:
        for name, tensor in params.items():
            if name not in merged or tensor.dtype == torch.float32 != merged[name].dtype:
                merged[name] = tensor
    return dict(sorted(merged.items()))


class ReferenceTrainer:
    def __init__(self, job: JobSpec):
        self.job = job
        self.graph = build_metagraph(job)
        self.modules: dict[tuple[str, int], torch.nn.Module] = {}
        for op in self.graph.metaops:
            # a sample use: its placeholder and the component's real layers (runtime.sampleop), as the workers hold
            whole = op.mode in WHOLE_USE_MODES  # a sample or generate use: its stand-in and the component's layers
            keys = layer_keys(job, op) if whole else []
            for key in [(op.param_group, layer) for layer in range(op.num_layers)] + keys:
                if key not in self.modules:
                    sampled = build_module(job, self.graph.metaops, key) if whole else None
                    self.modules[key] = sampled if sampled is not None else build_layer(job, op, key[1])
            for name in op.input_modules:
                if (name, 0) not in self.modules:
                    self.modules[(name, 0)] = build_input_module(job, name)
        for t, task in enumerate(job.tasks):
            self.modules[("head:" + task.name, 0)] = build_head(job, t)
        if has_modes(job):
            freeze_untrained(job, self.modules)
        self.optimizer = build_grouped_optimizer(job, (
            (module_component(self.graph.metaops, name), p)
            for (name, _), module in self.modules.items() for p in module.parameters()))
        self.device = torch.device("cpu")
        self.last_rollouts = {}
        self.behaviour = Behaviour()  # rollout_lag 1: the weights the generate uses decode with (runtime.lagged)

    def task_loss(self, t: int, step: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``loss_weight * sum of per-sample losses / batch_size`` of task ``t`` over rows [start, stop) of its batch at
        ``step`` (default the whole batch: the mean), computed under the job's autocast."""
        task = self.job.tasks[t]
        batch = task_batch(self.job, t, step, start, task.batch_size if stop is None else stop)
        batch = replace(batch, micro_first=start)  # the rows asked for are the (micro-)batch a loss may couple
        with autocast(self.job, self.device):
            per_sample = self.head(t)(self.forward(t, batch, step), batch)
        return task.loss_weight * per_sample.float().sum() / task.batch_size

    def head(self, t: int) -> torch.nn.Module:
        """Task ``t``'s loss head."""
        return self.modules[("head:" + self.job.tasks[t].name, 0)]

    def forward(self, t: int, batch: TaskBatch, step: int = 0) -> dict[str, torch.Tensor]:
        """Task ``t``'s leaf outputs by use name for ``batch`` (the loss head's input), and its generate uses' rollouts
        (runtime.rollout; drawn for ``step``, rows numbered from ``batch.first_row``)."""
        ops = self.graph.ops_of_task(self.job.tasks[t].name)
        outputs: dict[int, torch.Tensor] = {}
        rollouts = []
        for op in ops:
            if has_modes(self.job) and use_of(self.job, op).mode == "generate":
                with torch.no_grad():
                    module = lambda name, layer: self.modules[(name, layer)]  # noqa: E731
                    if self.job.training.rollout_lag:
                        module = self.behaviour.lookup(self.job, op, module, step)
                    outputs[op.id] = run_generate(
                        self.job, op, module, lambda lo, hi: task_batch(self.job, t, step, lo, hi), step,
                        [(batch.first_row, batch.first_row + batch.num_samples)])
                rollouts.append(op)
                self.last_rollouts[op.id] = outputs[op.id]
                continue
            if op.mode == "sample":  # the whole denoising loop; x0 with gradient when grad_last_step
                context = sample_context([outputs[op.deps[i]] for i in input_order(self.job, self.graph, op.id)])
                outputs[op.id] = run_sample(self.job, op, lambda name, layer: self.modules[(name, layer)], step,
                                            batch.first_row, batch.first_row + batch.num_samples, context=context)
                self.last_rollouts[op.id] = outputs[op.id].detach()
                continue
            kwargs = layer_kwargs(self.job, op) | row_kwargs(self.job, op, lambda: batch)
            inputs = [outputs[op.deps[i]] for i in input_order(self.job, self.graph, op.id)]
            if any(o in rollouts for o in (self.graph.metaops[d] for d in op.deps)) and op.segment == 0:
                x = rollout_input(inputs[0], self.modules[("embed:" + op.component, 0)], seq_len_of(self.job, op))
            else:
                x = first_input(self.job, self.graph, op, inputs, lambda name: self.modules[(name, 0)], lambda: batch)
            layers = [self.modules[(op.param_group, layer)] for layer in range(op.num_layers)]
            with forward_only(self.job, op, layers) if has_modes(self.job) else contextlib.nullcontext():
                for layer in layers:  # float32 between layers, as the workers (executor._fp32_output)
                    x = layer(x, **kwargs).float()
            outputs[op.id] = x
        consumed = {d for op in ops for d in op.deps}
        return {op.use: outputs[op.id] for op in ops if op.id not in consumed or op in rollouts}

    last_gradients: dict[str, torch.Tensor] | None = None  # the last train_step's, when asked for
    last_rollouts: dict[int, torch.Tensor]  # generate MetaOp -> its packed rows of the last forward (runtime.rollout)

    def train_step(self, step: int, keep_gradients: bool = False) -> dict[str, float]:
        """One optimizer step: every micro-batch's losses backward (gradients accumulate), clipping by global norm,
        the scheduled learning rate, AdamW. Per-task mean losses over the whole batch. With ``keep_gradients`` the
        gradients AdamW steps with (clipped) are left in :attr:`last_gradients`."""
        k = self.job.training.grad_accum_steps
        losses = {task.name: 0.0 for task in self.job.tasks}
        for micro in range(k):
            parts = {}
            for t, task in enumerate(self.job.tasks):
                rows = task.batch_size // k
                parts[task.name] = self.task_loss(t, step, micro * rows, (micro + 1) * rows)
                losses[task.name] += float(parts[task.name].detach())
            sum(parts.values()).backward()
        params = [p for module in self.modules.values() for p in module.parameters() if p.requires_grad]
        if self.job.training.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.job.training.grad_clip)
        if keep_gradients:  # named as named_parameters, those with a gradient
            self.last_gradients = {f"{name}/{layer}/{pname}": p.grad.detach().clone()
                                   for (name, layer), module in sorted(self.modules.items())
                                   for pname, p in module.named_parameters() if p.grad is not None}
        if self.optimizer is not None:
            set_lr(self.optimizer, self.job.training, step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if has_modes(self.job):  # weights_from: the hand-off (one process holds every copy of the rest)
            copy_weights_from(self.job, self.modules)
        return {task.name: losses[task.name] / task.loss_weight if task.loss_weight else 0.0
                for task in self.job.tasks}

    def load_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Copy ``params`` (names as :meth:`named_parameters`) into the model; a ModelFileError when the names differ
        (a model file of another job)."""
        own = {f"{name}/{layer}/{pname}": p for (name, layer), module in self.modules.items()
               for pname, p in module.named_parameters()}
        if set(own) != set(params):
            missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
            raise ModelFileError(
                f"the model file does not match job '{self.job.name}' (missing {missing[:3]}, unexpected {extra[:3]}); "
                "evaluate with the job spec it was trained from."
            )
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(params[name])

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{layer}/{pname}": p.detach().clone()
                for (name, layer), module in sorted(self.modules.items()) for pname, p in module.named_parameters()}
