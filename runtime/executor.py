"""Wave execution on one device: the Ray-agnostic worker logic.

A :class:`WaveWorker` holds the layers, embeddings and task heads its slices need and runs one
training step of a Plan: forward wave by wave (inputs arrive by point-to-point transfers at wave
boundaries, each slice's input is a fresh autograd leaf), the task losses on each task's loss host,
backward through the waves in reverse (gradients go back over the same pieces), then the gradients
of every parameter are summed over the devices that hold it and AdamW steps. Process groups come
in as one value (:class:`Groups`); nothing here reads global distributed state except the rank and
the default group handed in. Layers of slices with tp_degree > 1 run on megatron-core
(runtime.megatron_backend) over the slice's TP group; a layer keeps one TP degree over the plan.

Losses: a task's loss on a device is ``loss_weight * sum of its per-sample losses / batch size``, so
summing over data-parallel shards gives the full-batch mean, as in single-process training.

Training basics (runtime.optim): with ``training.grad_accum_steps`` k the plan's MetaOps carry the micro-batch
(batch_size / k rows; the planner plans it) and a step runs the waves k times on consecutive micro-batches,
gradients accumulating, then syncs the buckets once; then the gradients are clipped by their global norm (each
device adds the squares it owns, one all-reduce), the learning rate follows the schedule and the optimizer
steps. Forward runs under the job's autocast (bf16/fp16) over fp32 weights, gradients and optimizer state;
pieces cross devices in the compute precision (the plan's bytes) and are float32 again on arrival.

A worker is built from its payload (runtime.payload: its Assignment and the specs it builds and runs, never the whole
job). The transfers at wave boundaries are runtime.transfers' (PieceTransfers), the gradient buckets' sync and the
clip runtime.gradsync's (GradientSync), both mixed into :class:`WaveWorker`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from planner.kinds import kind_of
from planner.phases import FORWARD, LOSS, forward_positions
from planner.plan import PlanMetaOp, micro_batch_walk, zero_sharded
from planner.rolloutlag import generation_pool
from planner.rows import row_shares
from runtime.assignment import (
    LOSS_WAVE, CommSchedule, SliceRef, dp_rank_of, holders, input_order, is_lead, layer_tp_degrees, layer_tp_groups,
    loss_groups, sample_range, tp_group_of,
)
from runtime.channel import PieceChannel
from runtime.data import task_batch
from runtime.embeddings import build_input_module, first_input
from runtime.gradsync import GradientSync
from runtime.heads import build_head
from runtime.host import finish_collective
from runtime.kinds import is_token_decoder
from runtime.modules import build_layer, layer_kwargs, row_kwargs, run_layers
from runtime.optim import (
    LossScaler, PrecisionError, autocast, build_grouped_optimizer, compute_dtype, keep_kernel_grad_buffers,
    module_component, set_lr, zero_gradients,
)
from runtime.lagged import RolloutsAhead
from runtime.payload import WorkerPayload
from runtime.rollout import (
    Roles, forward_only, freeze_untrained, lower_matrices, rollout_input, run_generate, seq_len_of,
)
from runtime.sampleop import layer_keys, run_sample, sample_context
from runtime.steps import GradBucket, Lap, StepState, StepTiming, assemble_rows, fp32_output
from runtime.transfers import PieceTransfers
from runtime.zero import ShardedAdamW

log = logging.getLogger(__name__)


@dataclass
class Groups:
    """The default group and one sub-group per device set that shares parameters (keyed by sorted ranks)."""

    world: object | None
    by_devices: dict[tuple[int, ...], object]

    @classmethod
    def create(cls, payload: WorkerPayload) -> Groups:
        """Collective: every rank of the default group calls this with its payload of the same plan; the groups are
        the plan's ``process_groups``, created in that order, then those the modes' extra module copies add
        (runtime.rollout.Roles.groups, sorted)."""
        sets = [tuple(s) for s in payload.assignment.process_groups]
        if payload.roles is not None:
            sets += [s for s in Roles(**payload.roles.fields()).groups() if s not in sets]
        return cls(dist.group.WORLD, {s: dist.new_group(list(s)) for s in sets})


class WaveWorker(PieceTransfers, GradientSync):
    """One device's part of a plan, built from the rank's :class:`~runtime.payload.WorkerPayload` (its Assignment, the
    specs it builds and runs, the training settings; runtime.prepare builds it in the driver). ``device``: where its
    modules live and compute (a CUDA device with an NCCL default group, or the CPU with gloo)."""

    def __init__(self, payload: WorkerPayload, groups: Groups | None = None, device: torch.device | str = "cpu",
                 channel: PieceChannel | None = None):
        plan, rank = payload.assignment, payload.rank
        assert plan.rank == rank, f"rank {rank}'s payload carries rank {plan.rank}'s assignment"
        # the payload offers the JobSpec surface the module builders, data and losses read (runtime.payload)
        self.payload, self.plan, self.rank, self.groups = payload, plan, rank, groups
        self.channel = channel  # large pieces go through it instead of point-to-point (runtime.channel)
        self.device = torch.device(device)
        # a worker rebuilds no MetaGraph: the plan's MetaOps carry what it builds and wires its modules from, and the
        # driver checked that the job can run and that the plan belongs to it (runtime.checks) before starting it
        self.comm = CommSchedule(plan, payload.training.grad_accum_steps, *micro_batch_walk(plan, payload.training))
        self.comm_loss_groups = loss_groups(self.comm)  # ascending, as process groups order their ranks
        assert all(list(g) == sorted(g) for g in self.comm_loss_groups.values())
        self.mine = self.comm.my_slices(rank)
        self.holders = holders(plan)
        self.tp_degree = layer_tp_degrees(plan, self.comm)
        self.task_index = {t.name: i for i, t in enumerate(payload.tasks)}  # positions in the payload's tasks
        # generate and forward uses, rollout readers and weight hand-offs (runtime.rollout, decided by the driver);
        # None: a plain training job
        self.roles = Roles(**payload.roles.fields()) if payload.roles is not None else None
        self.tp_of = self._my_tp_groups()
        self.modules: dict[tuple[str, int], torch.nn.Module] = {}
        # rollout_lag 1: this rank's generate slices decode a step ahead, in a thread beside the step where the plan
        # prices that overlap (planner.rolloutlag.generation_pool; runtime.lagged)
        early = {op.id for op in plan.metaops if self.roles is not None and op.id in self.roles.generate
                 and not op.deps} if payload.training.rollout_lag else set()
        self.ahead = RolloutsAhead(background=rank in generation_pool(
            ([(s.metaop, s.devices) for s in wave.slices] for wave in plan.waves), early))
        extra = self.roles.mine(rank) if self.roles is not None else []
        if self.roles is not None and self.roles.sample and payload.training.grad_accum_steps > 1:
            raise ValueError("training.grad_accum_steps > 1 with a sample use: its denoising loop runs once over the "
                             "whole batch; set grad_accum_steps: 1.")
        # generate MetaOp -> (first row, its rows of each micro-batch), decoded at once in the step's first
        # (:meth:`_rollouts`); kept for the step: they all cross in its first micro-batch (runtime.transfers)
        self.decoded: dict[int, tuple[int, list[torch.Tensor]]] = {}
        for (name, layer, _), devices in self.holders.items():
            if rank in devices and (name, layer) not in self.modules:
                self.modules[(name, layer)] = self._build((name, layer)).to(self.device)
        for key in extra:
            self.modules[key] = self._build(key).to(self.device)
        self.low = low = compute_dtype(payload, self.device)  # None: float32
        if self.roles is not None:  # the payload holds every task using a component this rank builds
            freeze_untrained(payload, self.modules)
            for key, devices in self.roles.decode_copies.items() if low is not None else ():
                if rank in devices:  # a copy only to decode with: its matrices in the compute precision
                    lower_matrices(self.modules[key], low)
        self.optimizer = self._build_optimizer()
        # the weights a loss kernel reads keep their .grad between steps, which the kernel adds into (runtime.optim)
        self.grad_buffers = keep_kernel_grad_buffers(self.modules.values())
        self.scaler = LossScaler(low == torch.float16)
        # pieces (activations and their gradients) and gradient buckets cross devices in the compute precision, as the
        # plan prices them
        self.wire_dtype = compute_dtype(payload, self.device) or torch.float32
        if self.device.type == "cuda" and groups is not None:
            # NCCL: the first operation on a group must involve all of its ranks, and the first on the default group
            # would otherwise be a point-to-point exchange between two of them (batch_isend_irecv's documented rule)
            dist.all_reduce(torch.zeros(1, device=self.device), group=groups.world)

    def _build_optimizer(self):
        """AdamW over the trainable parameters this device holds; with ZeRO-1 (``training.shard_optimizer``, or the
        plan's choice under ``auto``: planner.plan.zero_sharded) the state of every parameter shared with other
        devices is split among them (runtime.zero)."""
        owned = [(module_component(self.plan.metaops, name), p) for (name, _), m in self.modules.items()
                 for p in m.parameters() if p.requires_grad]
        if not (zero_sharded(self.plan, self.payload.training) and self.groups is not None and self._grad_buckets):
            return build_grouped_optimizer(self.payload, owned)
        shared = {id(p) for bucket in self._grad_buckets for p in bucket.params}
        return ShardedAdamW(self.payload, [(b.devices, b.params, b.shards or b.devices) for b in self._grad_buckets],
                            self.groups.by_devices,
                            self.rank, [p for _, p in owned if id(p) not in shared], {id(p): c for c, p in owned},
                            [b.gather_position for b in self._grad_buckets])

    @functools.cached_property
    def _forward_position(self) -> dict[int, int]:
        """Every forward event's position (planner.phases.forward_positions): where ZeRO-1's deferred gathers land."""
        return forward_positions(self.plan.phases, len(self.plan.waves))

    def _await_parameters(self, event: int) -> None:
        """Before forward event ``event`` (a wave, or ``len(waves) + p``: phase p's losses) runs on this device: land
        the deferred ZeRO-1 all-gathers of every bucket first needed there or before (runtime.zero)."""
        if isinstance(self.optimizer, ShardedAdamW):
            self.optimizer.wait_until(self._forward_position[event])

    def settle_parameters(self) -> None:
        """Land every deferred ZeRO-1 all-gather: this device's parameters are the last step's (call before reading
        them outside a training step: checkpoints, exports, evaluation)."""
        if isinstance(self.optimizer, ShardedAdamW):
            self.optimizer.settle()

    def _my_tp_groups(self) -> dict[tuple[str, int], tuple[int, ...]]:
        """The TP group (devices) in which this device runs each tensor-parallel layer it holds
        (runtime.assignment.layer_tp_groups): a generate slice's group holds the component's layers it decodes with
        (runtime.tp_decode), not its one-layer stand-in."""
        generate = self.roles.generate if self.roles is not None else set()

        def decoded(metaop: int):
            return layer_keys(self.payload, self.plan.metaops[metaop]) if metaop in generate else None

        return {key: group for (key, _), group in layer_tp_groups(self.plan, decoded, self.rank).items()}

    def _build(self, key: tuple[str, int]) -> torch.nn.Module:
        name, layer = key
        reference = None
        if self.roles is not None and (self.roles.sample or self.roles.generate):  # a whole-use MetaOp's stand-in
            # or the component's real layers it runs (runtime.sampleop.build_module)
            from runtime.sampleop import build_module

            reference = build_module(self.payload, self.plan.metaops, key)
        if reference is None:
            if name.startswith(("embed:", "adapt:")):
                return build_input_module(self.payload, name)
            if name.startswith("head:"):
                return build_head(self.payload, self.task_index[name.removeprefix("head:")])
            reference = build_layer(self.payload, next(op for op in self.plan.metaops if op.param_group == name),
                                    layer)
        if key not in self.tp_of:
            return reference
        # a layer trained or decoded tensor-parallel (a component only generate uses run has no train MetaOp: the
        # generate MetaOp's twin names it)
        op = next((op for op in self.plan.metaops if op.param_group == name), None) or next(
            t for twins in self.payload.twins.values() for t in twins if t.param_group == name)
        return self._megatron_layer(op, reference, self.tp_of[key])

    def _megatron_layer(self, op: PlanMetaOp, reference: torch.nn.Module, group: tuple[int, ...]) -> torch.nn.Module:
        from runtime import megatron_compat
        from runtime.megatron_backend import MegatronTransformerBlock, load_reference, seed_model_parallel_rng

        if self.device.type == "cpu":
            if compute_dtype(self.payload, self.device) is not None:  # a ValueError: `loom run` reports it in one line
                raise PrecisionError(
                    f"{op.name}: tensor_parallel {len(group)} with training.precision "
                    f"'{self.payload.training.precision}' on a CPU; megatron-core's tensor-parallel linears cannot run "
                    "backward under CPU autocast. Set training.precision: fp32, or tensor_parallel: [1]."
                )
            megatron_compat.apply_cpu_compat()
        tp_rank = group.index(self.rank)
        seed_model_parallel_rng(self.payload.training.seed, tp_rank)
        comp = self.payload.components[op.component]
        if comp.pretrained:  # a Hugging Face layer: the megatron layer follows its model's config
            from runtime.megatron_pretrained import build_pretrained_block

            block = build_pretrained_block(reference, self.groups.by_devices[group], tp_rank, len(group))
        else:
            kind = kind_of(comp)
            variant, ffn = kind.tp_variant, kind.ffn_size(comp)  # the megatron block variant and MLP width of the kind
            block = MegatronTransformerBlock(comp.hidden_size, comp.num_heads, ffn, self.groups.by_devices[group],
                                             tp_rank, len(group), variant=variant, num_kv_heads=comp.num_kv_heads,
                                             causal=is_token_decoder(comp))
            load_reference(block, reference)
        if comp.frozen:
            block.requires_grad_(False)
        return block

    # ------------------------------------------------------------------ one step

    last_timing: StepTiming | None = None  # where this device's last train_step went
    last_gradients: dict[str, torch.Tensor] | None = None  # the last train_step's, when asked for
    # generate MetaOp -> (first row, packed rows), sample MetaOp -> (first row, x0 flattened): the last step's
    last_rollouts: dict[int, tuple[int, torch.Tensor]] = {}
    # where the step in flight is: (step, micro-batch, wave, phase), replaced whole (read from another thread by the
    # driver's step watchdog, orchestrator.actors.WaveActor.progress)
    where: tuple[int, int, int, str] | None = None

    def train_step(self, step: int, keep_gradients: bool = False) -> dict[str, float]:
        """Forward, losses and backward of each of ``step``'s micro-batches, gradient sync, clipping and the optimizer
        at the scheduled learning rate; per-task mean losses over the whole batch (all ranks).

        Each gradient bucket's all-reduce starts, in the last micro-batch, as soon as the backward of the earliest
        wave that runs its parameters is done (the plan's bucket's ``ready_wave``) and overlaps the rest of backward;
        the optimizer waits for all of them. Where this device's time went is left in :attr:`last_timing`; with
        ``keep_gradients`` the synchronised (clipped) gradients the optimizer steps with are left in
        :attr:`last_gradients` (as :meth:`named_gradients`)."""
        lap = Lap(self.device)
        timing = StepTiming([0.0] * len(self.plan.waves), [0.0] * len(self.plan.waves))
        k = self.payload.training.grad_accum_steps
        pending: list[tuple[GradBucket, torch.Tensor, object]] = []
        states = [StepState(self.device, step, micro, k) for micro in range(k)]
        losses: dict[str, torch.Tensor] = {}
        for task, loss in self._walk(states, pending, timing, lap):
            losses[task] = losses[task] + loss if task in losses else loss
        self.decoded.clear()
        self.last_rollouts = {g: (first, rows.detach().cpu()) for g, (first, rows) in states[-1].rollouts.items()}
        self.where = (step, k - 1, -1, "gradient sync")
        self._sync_gradients(pending)
        timing.sync_s += lap("sync")
        may_step = self._finish_gradients()
        timing.sync_s += lap("sync")
        if keep_gradients:
            self.last_gradients = self.named_gradients()
            lap()  # not part of the step's time
        self._join_ahead(timing, lap)
        if self.optimizer is not None:
            if may_step:
                set_lr(self.optimizer, self.payload.training, step)
                if isinstance(self.optimizer, ShardedAdamW):
                    # the gathers overlap the next step's forward, as the plan prices them in a job whose uses all
                    # train (planner.simulator.gathers_overlap); a hand-off or a rollout reads the weights at once
                    self.optimizer.step(defer=self.roles is None)
                else:
                    self.optimizer.step()
            zero_gradients(self.optimizer, self.grad_buffers)
            timing.optimizer_s += lap("optimizer")
        if self.roles is not None:  # the updated weights to the devices that use but do not step them
            self.roles.hand_off(self.modules, self.rank, self.device, self.tp_of, self.low)
            timing.optimizer_s += lap("optimizer")
        out = self._reduce_losses(losses)
        lap("reduce_losses")
        timing.finish(lap)
        self.last_timing = timing
        return out

    def _join_ahead(self, timing: StepTiming, lap: Lap) -> None:
        """Wait for the next step's rollouts decoded in the background (rollout_lag 1) before this device's weights
        change; the wait counts as the generate wave's forward, and the decode's span goes to ``timing.ahead``."""
        if not self.ahead.pending:
            return
        self.ahead.wait()
        wave = min(r.wave for r in self.mine)
        timing.compute_s[wave] += lap("forward", wave)
        timing.ahead = (self.ahead.span[0] - lap.start, self.ahead.span[1] - lap.start)

    def _walk(self, states: list[StepState], pending: list, timing: StepTiming, lap: Lap) -> list:
        """Forward, losses and backward of every micro-batch (``states``, one each; gradients accumulate into
        ``.grad``) in the plan's order (planner.phases.step_walk: micro-batch after micro-batch, or pipelined), the
        buckets' all-reduces launched into ``pending`` during the last one's backward. A micro-batch's tensors of a
        wave are released once its backward of the wave is done (GPipe's fill and drain holds every micro-batch's
        until then, 1F1B a wave's few, in order one micro-batch's at a time, as the planner's memory model counts
        them). Returns this device's (task, loss) of every micro-batch."""
        out = []
        last = len(states) - 1
        for kind, micro, at in self.comm.walk:
            st = states[micro]
            if kind == FORWARD:
                self.where = (st.step, micro, at, "forward")
                self._exchange(at, st, forward=True)
                timing.transfer_s[at] += lap("transfer_forward", at)
                ref = self._my_slice(at)
                if ref is not None:
                    self._await_parameters(at)
                    with autocast(self.payload, self.device):
                        self._run_slice(ref, st.step, st)
                    timing.compute_s[at] += lap("forward", at)
            elif kind == LOSS:
                self.where = (st.step, micro, len(self.plan.waves), "loss")
                losses = self._loss_stage(st.step, st, pending if micro == last else None, timing, lap, at)
                out += [(task, loss.detach()) for task, loss in losses.items()]
            else:
                self.where = (st.step, micro, at, "backward")
                ref = self._my_slice(at)
                if ref is not None and ref in st.grad_out and st.outputs[ref].requires_grad:
                    torch.autograd.backward(st.outputs[ref], st.grad_out[ref])
                    timing.compute_s[at] += lap("backward", at)
                self._launch_sync(at, pending if micro == last else None)
                timing.sync_s += lap("sync", at)
                self._exchange(at, st, forward=False)
                timing.transfer_s[at] += lap("transfer_backward", at)
                phase = self.comm.phase_of[at]
                first, end = self.comm.phases[phase]
                # the micro-batch's tensors of this wave are done with once its gradients went back (the waves
                # after it ran their backward before): held as the planner counts them, one wave's at a time under
                # 1F1B (planner.phases.pipelined_in_flight); the phase's first wave ends the phase
                st.release(at, at + 1, done=at == first and phase == len(self.comm.phases) - 1)
        return out

    def _loss_stage(self, step: int, st: StepState, pending: list | None, timing: StepTiming, lap: Lap,
                    phase: int = 0) -> dict:
        """The leaves' outputs to the loss hosts of ``phase``'s tasks, their losses, their backward (then the heads'
        gradients are final: their buckets start), and the leaves' gradients back. Returns the losses this device
        holds."""
        self._exchange(LOSS_WAVE, st, forward=True, phase=phase)
        if self.roles is not None:
            self.roles.move_rollouts(lambda wave: self.comm.phase_of[wave] == phase, st, self.rank, self.device,
                                     lambda g, micro: (self.decoded[g][0], self.decoded[g][1][micro]),
                                     functools.partial(self._land_rows, st))
        with autocast(self.payload, self.device):
            losses = self._losses(step, st, phase)
        total = sum(losses.values())
        if isinstance(total, torch.Tensor) and total.requires_grad:
            (total * self.scaler.scale).backward()  # scale 1 unless fp16's loss scaling
        timing.loss_s += lap("loss")
        self._launch_sync(self.comm.loss_event(phase), pending)
        timing.sync_s += lap("sync")
        self._exchange(LOSS_WAVE, st, forward=False, phase=phase)
        timing.loss_s += lap("loss")
        return losses

    def _my_slice(self, wave: int) -> SliceRef | None:
        return next((r for r in self.mine if r.wave == wave), None)

    def _rows(self, ref: SliceRef) -> tuple[int, int]:
        s = self.comm.slices[ref]
        return sample_range(self.comm.batch(s.metaop), s.dp_degree, dp_rank_of(s, self.rank))

    def _run_slice(self, ref: SliceRef, step: int, st: StepState) -> None:
        s = self.comm.slices[ref]
        op = self.plan.metaops[s.metaop]
        start, stop = self._rows(ref)
        if self.roles is not None and s.metaop in self.roles.generate:  # the whole model's decode, no gradient
            st.outputs[ref] = self._rollouts(op, st, start, stop, tp_group_of(s, dp_rank_of(s, self.rank)))
            st.rollouts[s.metaop] = (start, st.outputs[ref])
            return
        if self.roles is not None and s.metaop in self.roles.sample:  # the whole denoising loop (runtime.sampleop)
            context = sample_context(self._slice_inputs(ref, start, stop, st) if self.comm.num_inputs(ref) else [])
            st.outputs[ref] = run_sample(self.payload, op, lambda name, layer: self.modules[(name, layer)], step, start,
                                         stop, self.device, context)
            st.rollouts[s.metaop] = (start, st.outputs[ref])  # kept as last_rollouts: the step's samples
            return
        kwargs = layer_kwargs(self.payload, op) | row_kwargs(
            self.payload, op, lambda: st.batch(self.payload, self.task_index[op.task], step, start, stop))
        inputs = self._slice_inputs(ref, start, stop, st) if self.comm.num_inputs(ref) else []
        if s.first_layer > 0:  # the rest of a MetaOp whose first layers ran in an earlier wave
            x = inputs[0]
        elif self.roles is not None and s.metaop in self.roles.readers:  # its own embedding of the rollout's tokens
            x = rollout_input(inputs[0], self.modules[("embed:" + op.component, 0)], seq_len_of(self.payload, op))
            if not is_lead(s, self.rank):  # as below: only the TP group's lead trains the embedding
                x = x.detach().requires_grad_(True)
        else:  # a root MetaOp's layer 0 reads raw data through its input module; other uses read their inputs
            x = first_input(self.payload, self.plan, op, inputs, lambda name: self.modules[(name, 0)],
                            lambda: st.batch(self.payload, self.task_index[op.task], step, start, stop))
            if op.input_modules and not is_lead(s, self.rank):
                # the other TP ranks repeat the lead's input modules, and megatron's backward hands every TP rank
                # the whole gradient of x: only the lead's reaches the modules (and the inputs: only the lead
                # sends their gradients back)
                x = x.detach().requires_grad_(True)
        layers = [functools.partial(fp32_output, self.modules[(op.param_group, layer)])
                  for layer in range(s.first_layer, s.first_layer + s.num_layers)]
        # megatron TP layers recompute too: their forward's all-reduces run again inside backward, at the same point
        # of the same graph on every rank of the TP group, so the group's collectives still pair up
        modules = [self.modules[(op.param_group, i)] for i in range(s.first_layer, s.first_layer + s.num_layers)]
        with forward_only(self.payload, op, modules):  # a forward use: no weight gradients, its input's still flow
            st.outputs[ref] = run_layers(layers, x, kwargs, op.recompute)

    def _rollouts(self, op: PlanMetaOp, st: StepState, start: int, stop: int, group: tuple[int, ...]) -> torch.Tensor:
        """Rows [start, stop) of micro-batch ``st.micro`` of generate MetaOp ``op``: in the step's first micro-batch
        this rank decodes its rows of every micro-batch at once (planner.generation.decode_batches: each decode step
        reads the weights once for all of them), and each micro-batch takes its own."""
        if st.micro == 0:
            size = self.payload.tasks[self.task_index[op.task]].batch_size // st.num_micro
            spans = [(j * size + start, j * size + stop) for j in range(st.num_micro)]
            self.decoded[op.id] = (start, list(self._generate(op, st.step, spans, group).split(stop - start)))
        return self.decoded[op.id][1][st.micro]

    def _generate(self, op: PlanMetaOp, step: int, spans: list[tuple[int, int]], group: tuple[int, ...]
                  ) -> torch.Tensor:
        """The rows of generate MetaOp ``op`` at ``step`` in ``spans`` (runtime.rollout.run_generate), decoded with
        the weights held now (in TP group ``group``: the ranks decode the same rows, each with its shard,
        runtime.tp_decode); with ``rollout_lag`` 1 those decoded during the previous step, and the next step's decoded
        now (runtime.lagged)."""
        t = self.task_index[op.task]
        agree = None
        if len(group) > 1:
            from runtime.tp_decode import agree_on_first

            agree = agree_on_first(self.groups.by_devices[group], group[0])

        def decode(at: int) -> torch.Tensor:  # grad mode, autocast and the current CUDA device are per thread
            device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with device, torch.no_grad(), autocast(self.payload, self.device):
                return run_generate(self.payload, op, lambda name, layer: self.modules[(name, layer)],
                                    lambda lo, hi: task_batch(self.payload, t, at, lo, hi).to(self.device), at, spans,
                                    agree)

        if not self.payload.training.rollout_lag:
            return decode(step)
        bounds = tuple(row for span in spans for row in span)
        rows = self.ahead.take(op.id, (step, *bounds), decode)
        self.ahead.ahead(op.id, (step + 1, *bounds), decode)
        return rows

    def _slice_inputs(self, ref: SliceRef, start: int, stop: int, st: StepState) -> list[torch.Tensor]:
        """Rows [start, stop) of each of ``ref``'s inputs, in the order of its use's ``after:`` list: each input's
        received rows become their own autograd leaf (so backward's gradient of an input is its part of the whole)."""
        leaves = []
        for i in range(self.comm.num_inputs(ref)):
            leaf = assemble_rows(st.received.pop(("slice", ref, i), []), start, stop).requires_grad_(True)
            st.inputs[(ref, i)] = leaf
            leaves.append(leaf)
        if len(leaves) == 1:  # one input, or the rest of a MetaOp split across waves
            return leaves
        return [leaves[i] for i in input_order(self.payload, self.plan, self.comm.slices[ref].metaop)]

    def _losses(self, step: int, st: StepState, phase: int = 0) -> dict[str, torch.Tensor]:
        out = {}
        for host in self.comm.loss_hosts_of(phase):
            s = self.comm.slices[host.host]
            if self.rank not in s.devices or not is_lead(s, self.rank):
                continue
            self._await_parameters(len(self.plan.waves) + phase)
            t = self.task_index[host.task]
            task = self.payload.tasks[t]
            start, stop = self._rows(host.host)
            outputs = {}
            for leaf in host.leaves:
                leaf_op = self.plan.metaops[self.comm.slices[leaf].metaop]
                x = assemble_rows(st.received.pop(("loss", leaf), []), start, stop).requires_grad_(True)
                st.loss_inputs[leaf] = x
                outputs[leaf_op.use] = x
            if self.roles is not None and host.task in self.roles.rollout_moves:  # the rollout's tokens (grpo)
                g = self.roles.rollout_moves[host.task][0]
                outputs[self.plan.metaops[g].use] = assemble_rows(st.received.pop(("rollout", host.task), []),
                                                                  start, stop)
            batch = st.batch(self.payload, t, step, start, stop)
            group = self.comm_loss_groups[host.task]
            if len(group) > 1:  # the task's other shards: a loss over the whole batch gathers their rows
                batch = replace(batch, gather_rows=functools.partial(_GatherRows.apply, group=self.groups.by_devices[
                    group], shares=row_shares(self.comm.batch(s.metaop), s.dp_degree)))
            per_sample = self.modules[("head:" + host.task, 0)](outputs, batch)
            out[host.task] = task.loss_weight * per_sample.float().sum() / task.batch_size
        return out

    # ------------------------------------------------------------------ gradients and losses

    def _reduce_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Every task's mean loss (all ranks): one all-reduce of the job's tasks in the job's order."""
        weights = self.payload.loss_weights
        values = torch.tensor([float(losses[n].detach()) if n in losses else 0.0 for n in weights],
                              dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        finish_collective(dist.all_reduce(values, async_op=True), self.device)
        return {n: float(v) / w if w else float(v) for (n, w), v in zip(weights.items(), values)}

    def state_dict(self) -> dict:
        """This device's part of a checkpoint: a snapshot (copies, not views) of its modules and optimizer state."""
        self.settle_parameters()
        return copy.deepcopy({
            "modules": {f"{name}/{layer}": module.state_dict() for (name, layer), module in sorted(self.modules.items())},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "loss_scale": self.scaler.state_dict(),
            "rollouts_ahead": self.ahead.state(),  # rollout_lag 1: the next step's rows, decoded already
        })

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of a worker built from the same payload (job, plan and rank)."""
        self.settle_parameters()
        for (name, layer), module in sorted(self.modules.items()):
            module.load_state_dict(state["modules"][f"{name}/{layer}"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if "loss_scale" in state:  # absent in checkpoints written before fp16's loss scaling
            self.scaler.load_state_dict(state["loss_scale"])
        self.ahead.restore(state.get("rollouts_ahead", {}), self.device)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter this device holds in the plain layout, keyed ``<group or embed:/head:name>/<layer>/<param>``.
        Collective over the TP groups of tensor-parallel layers (their shards are gathered)."""
        return self._named(gradients=False)

    def named_gradients(self) -> dict[str, torch.Tensor]:
        """The gradients of :meth:`named_parameters` (those that have one), the same keys; collective likewise."""
        return self._named(gradients=True)

    def _named(self, gradients: bool) -> dict[str, torch.Tensor]:
        from runtime.megatron_backend import gather_reference_grads, gather_reference_weights

        self.settle_parameters()
        out = {}
        for (name, layer), module in sorted(self.modules.items()):
            if (name, layer) in self.tp_of:
                items = (gather_reference_grads if gradients else gather_reference_weights)(module).items()
            else:
                items = ((n, p.grad if gradients else p) for n, p in module.named_parameters())
            out.update({f"{name}/{layer}/{pname}": t.detach().cpu().clone() for pname, t in items if t is not None})
        return out


class _GatherRows(torch.autograd.Function):
    """Rows of every data-parallel shard of a loss, concatenated in rank order (``shares``: rows per rank, planner.rows;
    a shard one row short is padded for the all-gather); backward sums the gradient of the whole over the shards
    (every shard's loss reads every row) and hands each its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, shares: tuple[int, ...]) -> torch.Tensor:
        ctx.group, ctx.start, ctx.rows = group, sum(shares[:dist.get_rank(group)]), x.shape[0]
        padded = torch.cat([x, x.new_zeros((max(shares) - x.shape[0], *x.shape[1:]))]).contiguous()
        pieces = [torch.empty_like(padded) for _ in shares]
        dist.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, shares)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start:ctx.start + ctx.rows], None, None
