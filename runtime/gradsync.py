"""Gradient sync of a WaveWorker's step: the plan's gradient buckets, all-reduced over the devices that share them
as soon as the wave that finalises them is done, then the loss scale undone and the global-norm clip.

Every rank of a device set walks the plan's buckets in the plan's order (planner.program.grad_buckets), so the
async all-reduces pair up. Buckets are reduced in the compute precision (bf16/fp16 under autocast: the plan's
``grad_bytes``) and are float32 again after.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from kernels.grad_buffers import has_grad_buffer, keep_grad_buffer
from planner.phases import forward_positions, gather_events
from runtime.host import finish_collective
from runtime.megatron_backend import owned_fractions  # cheap: megatron-core itself is imported lazily
from runtime.optim import clip_coefficient, owned_square_sum, scale_gradients
from runtime.steps import GradBucket


class GradientSync:
    """The gradient half of a WaveWorker (mixed into it). Reads the worker's ``plan``, ``comm``, ``rank``,
    ``modules``, ``roles``, ``groups``, ``tp_of``, ``wire_dtype``, ``scaler``, ``device`` and ``payload``."""

    @functools.cached_property
    def _grad_buckets(self) -> list[GradBucket]:
        """This device's gradient buckets in launch order: the plan's buckets (planner.program.grad_buckets) that it
        shares with other devices, with its parameters of their members. Every rank of a device set walks the plan's
        buckets in the plan's order, so collectives pair up."""
        out = []
        synced = self.roles.synced if self.roles is not None else {}
        plan = self.plan
        events = gather_events(plan.metaops, plan.waves, plan.phases, plan.grad_buckets)
        position = forward_positions(plan.phases, len(plan.waves))
        for b, event in zip(plan.grad_buckets, events):
            if self.rank in b.devices and len(b.devices) > 1:
                params = [p for name, layer, _ in b.members if (name, layer) not in synced
                          for p in self.modules[(name, layer)].parameters() if p.requires_grad]
                if params:
                    out.append(GradBucket(b.ready_wave, tuple(b.devices), params, tuple(b.shards), position[event]))
        # the modules the modes' extra copies train too (runtime.rollout): summed over their holders and them, after
        # the last backward of the step, one bucket per device set (as the plan buckets a sample use's layers)
        shared: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        for key, devices in sorted(synced.items()):
            if self.rank in devices and len(devices) > 1:
                shared.setdefault(tuple(devices), []).extend(
                    p for p in self.modules[key].parameters() if p.requires_grad)
        out += [GradBucket(self.comm.phases[-1][0], devices, params) for devices, params in shared.items()]
        return out

    def _launch_sync(self, wave: int, pending: list | None) -> None:
        """Start the all-reduce (async) of every bucket whose gradients are final once ``wave``'s backward is
        done (``len(waves) + p``: phase p's loss stage); appends (bucket, flat gradients, work) to ``pending``. None: a
        micro-batch before the last (its gradients only accumulate). The bucket is reduced in the compute precision
        (bf16/fp16 under autocast: the plan's ``grad_bytes``), then its sum is float32 again."""
        if pending is None:
            return
        for bucket in self._grad_buckets:
            if bucket.ready_wave != wave:
                continue
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in bucket.params]).to(self.wire_dtype)
            work = dist.all_reduce(flat, group=self.groups.by_devices[bucket.devices], async_op=True)
            pending.append((bucket, flat, work))

    def _sync_gradients(self, pending: list) -> None:
        """Wait for the launched all-reduces; each parameter's gradient becomes its slice of the summed bucket (copied
        into it where the parameter keeps a persistent gradient buffer, kernels.grad_buffers)."""
        assert len(pending) == len(self._grad_buckets), "a gradient bucket was never launched"
        for bucket, flat, work in pending:
            finish_collective(work, flat.device)
            flat = flat.float()  # a no-op in fp32
            offset = 0
            for p in bucket.params:
                n = p.numel()
                if has_grad_buffer(p):  # a persistent buffer (runtime.optim) stays the gradient: the sum into it
                    keep_grad_buffer(p).copy_(flat[offset:offset + n].view_as(p))
                else:
                    p.grad = flat[offset:offset + n].view_as(p)
                offset += n

    def _finish_gradients(self) -> bool:
        """After the sync: undo the loss scale, then clip every gradient by the global norm over all devices; whether
        the optimizer may step (False: fp16 gradients overflowed somewhere; the scale halves). Collective over the
        whole world when the job clips or scales (one all-reduce of the sum of squares each device owns)."""
        clip = self.payload.training.grad_clip
        if not clip and not self.scaler.enabled:
            return True
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        if self.scaler.enabled:
            scale_gradients(params, 1.0 / self.scaler.scale)
        total = self._owned_square_sum()
        finish_collective(dist.all_reduce(total, group=self.groups.world if self.groups is not None else None,
                                          async_op=True), total.device)
        if not self.scaler.update(found_inf=not math.isfinite(float(total))):
            return False
        if clip:
            scale_gradients(params, clip_coefficient(float(total), clip))
        return True

    def _owned_square_sum(self) -> torch.Tensor:
        """The sum of squares of the gradients this device owns (runtime.optim.owned_square_sum): a parameter of a
        bucket of n holders counts 1/n, a replicated parameter of a tensor-parallel layer 1/tp_size."""
        replicas = {id(p): len(b.devices) for b in self._grad_buckets for p in b.params}
        fractions = {key: owned_fractions(module) for key, module in self.modules.items() if key in self.tp_of}
        return owned_square_sum(self.modules, replicas, fractions, self.device)
