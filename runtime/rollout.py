"""Use modes at run time: generate uses, the uses that read their tokens, forward uses, and weight hand-offs.

- A ``mode: generate`` use is one MetaOp (the rule planner and runtime share; a plan that splits it across waves is
  refused in one line; at tensor_parallel t each data-parallel rank's t devices decode as one TP group on megatron-core
  shards, runtime.tp_decode; with ``training.grad_accum_steps`` k its slice decodes its rows of all k micro-batches at
  once in the first and hands each micro-batch its own, planner.generation.decode_batches): its slice holds the
  component's input module,
  every layer and the LM head its task's loss head trains (the grpo head's ``policy``, or a next-token head), and
  decodes each of its rows (runtime.generate; row r of the task's batch: prompt ``r - r % samples``'s ids, so the
  ``samples`` rows of a group share the prompt). Its output rows are :func:`pack` ed ``(rows, P + 2N)`` float32: the
  tokens, then which generated tokens count; they carry no gradient (no backward pieces run for it).
- With ``training.rollout_lag: 1`` step k's rows are decoded with the weights step k-1 started from (step 0's with
  the initial ones; runtime.lagged: the worker decodes them during step k-1, the reference keeps a copy of the
  weights), and the packed rows carry a third block, the behaviour log-probabilities of the generated tokens
  ``(rows, P + 3N)``, for the loss's importance ratio (runtime.grpo).
- A use reading a generate use's tokens (its only input) embeds them with its own component's input module
  (:func:`rollout_input`); its ``seq_len`` must be the rollout's ``P + N`` (:func:`check_modes`).
- A ``mode: forward`` use runs with its parameters out of autograd (:func:`forward_only`): no weight gradient from
  it, while gradients still pass through its activations to earlier uses.

**Weight hand-off** (:class:`Roles`, derived once by the driver from the whole plan, runtime.prepare; every rank
receives the same in its payload). The plan's holdings
(planner.program.holdings) say which devices hold each module and sum its gradients. A device whose slice needs a
module it does not hold under the plan holds an *extra* copy: the LM head on a generate use's devices, a component's
input module on the devices of a use reading rollout tokens. An extra copy on a device that trains it (a train use
reading the tokens) joins the module's gradient all-reduce (the holders plus those devices, one bucket after the
last backward, which also sums a module a mode trains only on devices that hold it: the plan's bucket would run
before the mode's backward); every other extra copy of a trainable module is a *receiver*: after the optimizer step a holder that
steps the module sends it its new weights (point-to-point; planner.handoff.sender: the lowest in the receiver's node,
else the lowest). ``components.X.weights_from: Y`` adds hand-offs
from the lowest device that steps each module of Y to every device holding X's counterpart. A device that holds a
component's layers for generation and is one of the plan's holders of them steps them itself (it is in their
gradient all-reduce, with a zero gradient of its own), so it needs no hand-off. Every receiver takes a layer as it
holds it (:attr:`Roles.shards`, from the plan's TP groups, runtime.assignment.layer_tp_groups): a device decoding at
tensor_parallel t (:attr:`Roles.tp_decode`) its TP rank's shard of each layer it decodes (runtime.tp_decode.flat_shard),
from a trainer of that shard where the trainers run at t, a device running a ``weights_from`` copy tensor-parallel its
shard of the copy, any other receiver the whole layer (also a whole copy on a device that decodes tensor-parallel). A
sender holding another shard than its receiver takes first gathers the layer in its TP group (runtime.tp_decode.
needs_gather; planner.handoff prices those gathers); planner.generation.decode_refused names the placements this
cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import math

import torch
import torch.distributed as dist
from torch import nn

from planner.components import use_shape
from planner.errors import SpecError
from planner.generation import modes_refused, rollout_width as rollout_width_of
from planner.spec import JobSpec, TaskComponentSpec
from runtime.generate import decoder_for, generate, lm_logits, row_generators
from runtime.tp_decode import flat_shard, is_matrix, needs_gather, packed_bytes, receive_order, unpack_wire
from runtime.sampleop import layer_keys
from runtime.tokenizer import prompt_mask_key

Key = tuple[str, int]  # (module name, layer): a param group's layer, "embed:<component>" or "head:<task>" at 0


def use_of(job: JobSpec, op) -> TaskComponentSpec:
    """The task use MetaOp ``op`` (planner or plan MetaOp) runs."""
    task = next(t for t in job.tasks if t.name == op.task)
    return next(u for u in task.components if u.use_name == op.use)


def has_modes(job: JobSpec) -> bool:
    """Whether any use of the job runs another mode than train, or a component takes another's weights."""
    return any(u.mode != "train" for t in job.tasks for u in t.components) or any(
        c.weights_from for c in job.components.values())


def seq_len_of(job: JobSpec, op) -> int:
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    return use_shape(job, t, next(i for i, u in enumerate(job.tasks[t].components) if u.use_name == op.use)).seq_len


def pack(tokens: torch.Tensor, generated: torch.Tensor, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """A rollout's rows as one float32 tensor ``(B, P + 2N)``: tokens (exact below 2^24), then the generated mask;
    with ``logprobs`` (the behaviour policy's, ``rollout_lag`` 1) ``(B, P + 3N)``, those last."""
    return torch.cat([tokens.float(), generated.float(), *([logprobs.float()] if logprobs is not None else [])], dim=1)


def behaviour_logprobs(x: torch.Tensor, prompt: int, new_tokens: int) -> torch.Tensor | None:
    """The behaviour log-probabilities ``(B, N)`` of :func:`pack` ed rows, None when they carry none (on-policy)."""
    if x.shape[1] < prompt + 3 * new_tokens:
        return None
    return x.detach()[:, prompt + 2 * new_tokens:prompt + 3 * new_tokens].float()


def rollout_width(job: JobSpec, op) -> int:
    """Width of generate MetaOp ``op``'s packed rows: ``P + 2N``, ``P + 3N`` with ``rollout_lag`` 1."""
    return rollout_width_of(seq_len_of(job, op), use_of(job, op).new_tokens, job.training.rollout_lag)


def unpack(x: torch.Tensor, prompt: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``(B, P + N)`` int64, generated ``(B, N)`` bool) of :func:`pack` ed rows."""
    x = x.detach()
    return x[:, :prompt + new_tokens].round().long(), x[:, prompt + new_tokens:prompt + 2 * new_tokens] > 0.5


def eos_of(comp) -> int | None:
    """The end-of-sequence token of a pretrained causal LM (its config's ``eos_token_id``); None for Loom's own kinds,
    whose synthetic vocabulary has none."""
    if not comp.pretrained:
        return None
    from planner.pretrained import resolve_pretrained

    eos = resolve_pretrained(comp.pretrained).config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def run_generate(job: JobSpec, op, module: Callable[[str, int], nn.Module], rows: Callable[[int, int], object],
                 step: int, spans: Sequence[tuple[int, int]],
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The rows of generate MetaOp ``op`` at ``step`` (its seeds) in ``spans`` (``[start, stop)`` ranges of the task's
    batch, decoded together, in order) :func:`pack` ed; ``module(name, layer)`` gives the modules it decodes with (the
    caller picks their weights: runtime.lagged; megatron-core blocks of a TP group decode tensor-parallel,
    runtime.tp_decode, with ``agree`` making the group's tokens one), ``rows(lo, hi)`` the task's
    runtime.data.TaskBatch of rows [lo, hi); with ``rollout_lag`` 1 the rows carry their log-probabilities. Each row
    draws from its own seeded generator, so a row's tokens do not depend on the rows decoded beside it."""
    lag = bool(job.training.rollout_lag)
    use = use_of(job, op)
    comp = job.components[op.component]
    prompts, masks, rows_of = [], [], []
    for start, stop in spans:
        first = start - start % use.samples
        batch = rows(first, stop)
        groups = [r - r % use.samples - first for r in range(start, stop)]
        prompts.append(batch.inputs[op.use][groups])
        mask = batch.targets.get(prompt_mask_key(op.use))  # left padding, never attended (runtime.generate)
        masks.append(None if mask is None else mask[groups])
        rows_of += range(start, stop)
    head = module("head:" + op.task, 0)
    decoder = decoder_for(module("embed:" + op.component, 0), [module(*key) for key in layer_keys(job, op)],
                          lm_logits(getattr(head, "policy", head)))
    eos = eos_of(comp)
    out = generate(decoder, torch.cat(prompts), use.new_tokens, use.temperature,
                   row_generators(job.training.seed, step, op.task, rows_of, use.samples),
                   eos_id=eos, pad_id=eos if eos is not None else 0,
                   prompt_mask=None if masks[0] is None else torch.cat(masks), agree=agree)
    return pack(out.tokens, out.generated, out.logprobs if lag else None)


def lower_matrices(module: nn.Module, dtype: torch.dtype) -> None:
    """Every matrix of ``module`` (a decode copy: :attr:`Roles.decode_copies`, a layer or an LM head, whose matrices
    are its linear layers' weights: runtime.tp_decode.is_matrix) in ``dtype``, the job's compute precision. Under
    autocast a linear layer computes in that dtype from the weight's cast, so the decode is the same; a float32 weight
    would be held twice while it decodes (torch keeps the cast of a weight that requires a gradient until the autocast
    region ends: planner.costmodel.CostModel.decode_cast_bytes), a weight in ``dtype`` once, at half the bytes. Biases
    and norms stay float32 (they are not cast the same way: megatron adds a bias to the product in float32). The
    hand-off sends the matrices in ``dtype`` too (:meth:`Roles.hand_off`)."""
    for p in module.parameters():
        if is_matrix(p):
            p.data = p.data.to(dtype)


def rollout_input(packed: torch.Tensor, embed: nn.Module, length: int) -> torch.Tensor:
    """What the first layer of a use reading rollout tokens runs on: its component's input module on the ``length``
    (prompt + new) tokens of the :func:`pack` ed rows."""
    return embed(packed.detach()[:, :length].round().long())


@contextmanager
def forward_only(job: JobSpec, op, modules: list[nn.Module]):
    """Run a ``mode: forward`` use's layers with their parameters out of autograd (autograd records at forward time, so
    other uses of the same modules still train); a no-op for other modes."""
    if use_of(job, op).mode != "forward":
        yield
        return
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def untrained(job: JobSpec) -> set[str]:
    """Components no use trains (frozen, or only forward and generate uses): the runtime freezes their modules
    (:func:`freeze_untrained`), so no optimizer step (weight decay included) moves them."""
    trained = {u.component for t in job.tasks for u in t.components
               if u.mode == "train" or (u.mode == "sample" and u.grad_last_step)}
    return {name for name, comp in job.components.items() if comp.frozen or name not in trained}


def freeze_untrained(job: JobSpec, modules: dict[Key, nn.Module]) -> None:
    """Turn off the gradients of the modules of :func:`untrained` components (their layers and input modules)."""
    names = untrained(job)
    for (name, _), module in modules.items():
        if name.split(":", 1)[-1].split("#")[0] in names and not name.startswith("head:"):
            module.requires_grad_(False)


def check_modes(job: JobSpec, graph=None) -> None:
    """A use reading a generate use reads it alone, at the rollout's length (prompt + new_tokens); a forward use of a
    trained component does not recompute (its recomputed forward would record weight gradients). SpecError, one
    line, naming the use and the fix."""
    from planner.metagraph import build_metagraph  # the driver's check (runtime.checks); workers never call it

    graph = graph or build_metagraph(job)
    ops = {op.id: op for op in graph.metaops}
    for op in graph.metaops:
        if use_of(job, op).mode == "forward" and op.recompute and op.component not in untrained(job):
            raise SpecError(f"task '{op.task}' use '{op.use}' (mode forward) of trained component '{op.component}' "
                            "cannot recompute: its recomputed forward would train it. Set recompute: false.")
        rollouts = [d for d in op.deps if use_of(job, ops[d]).mode == "generate"]
        if not rollouts or ops[op.deps[0]].use == op.use:
            continue
        src, use = ops[rollouts[0]], use_of(job, op)
        want = seq_len_of(job, src) + use_of(job, src).new_tokens
        if len(op.deps) > 1 or seq_len_of(job, op) != want or use.mode == "generate":
            raise SpecError(
                f"task '{op.task}' use '{op.use}' reads the rollouts of generate use '{src.use}': it must read them "
                f"alone, at seq_len {want} (prompt {seq_len_of(job, src)} + new_tokens {use_of(job, src).new_tokens}),"
                f" without generating itself; it has inputs {[ops[d].use for d in op.deps]} and seq_len "
                f"{seq_len_of(job, op)}.")


@dataclass
class Roles:
    """What the modes add to a plan's execution, the same on every rank (module docstring): the generate MetaOps,
    the MetaOps reading their tokens, the extra module copies, the gradient sets that grow by them, the hand-offs
    ``(receiver key, sender key, sender, receiver)`` and, per task with rollouts, the moves of rollout rows to the
    loss's devices ``(src, dst, start, stop)``."""

    generate: set[int]
    readers: dict[int, int]  # MetaOp -> the generate MetaOp it reads
    extra: dict[Key, tuple[int, ...]]
    synced: dict[Key, tuple[int, ...]]
    hand_offs: list[tuple[Key, Key, int, int]]
    # task -> (generate MetaOp, wave of the loss's host slice, moves)
    rollout_moves: dict[str, tuple[int, int, list[tuple[int, int, int, int]]]]
    widths: dict[int, int]  # generate MetaOp -> width of its packed rows (P + 2N); sample MetaOp -> C * h * w
    sample: dict[int, bool] = field(default_factory=dict)  # sample MetaOp -> whether its x0 carries gradient
    # device -> the TP group it decodes in, for a generate slice at tensor_parallel > 1 (runtime.tp_decode): its
    # layer hand-offs carry its TP rank's shard
    tp_decode: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # (receiver key, receiving device) -> (tp_size, tp_rank): the TP shard of a layer a hand-off's receiver holds
    # (runtime.assignment.layer_tp_groups: a layer it decodes or runs tensor-parallel); absent: the whole layer
    shards: dict[tuple[Key, int], tuple[int, int]] = field(default_factory=dict)
    # module -> the devices that hold a copy of it only to decode with (a layer or LM head of a generate use, received
    # after every step, trained elsewhere): they keep its matrices in the compute precision (:func:`lower_matrices`)
    decode_copies: dict[Key, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, job: JobSpec, plan) -> Roles:
        from planner import program
        from planner.handoff import sender
        from planner.metagraph import build_metagraph
        from planner.validate import placed_schedule
        from runtime.assignment import layer_tp_groups, sample_range

        graph = build_metagraph(job)
        ops = graph.metaops
        placed = placed_schedule(plan)
        held: dict[Key, set[int]] = {}  # a module's holders, any TP shard
        shards: dict[Key, dict[int, set[int]]] = {}  # a layer's holders by TP shard
        for h in program.holdings(ops, placed):
            held.setdefault(h.key[:2], set()).update(h.devices)
            shards.setdefault(h.key[:2], {})[h.key[2]] = set(h.devices)
        why = modes_refused(ops, placed)  # the generate and sample layouts the runtime does not run
        if why is not None:
            raise NotImplementedError(f"{why}: the runtime does not run it (planner.generation.modes_refused). "
                                      "Re-plan with `loom run JOB.yaml` (without --plan), which plans what it runs.")
        generate = {op.id for op in ops if use_of(job, op).mode == "generate"}
        sample = {op.id: use_of(job, op).grad_last_step for op in ops if use_of(job, op).mode == "sample"}
        readers = {op.id: d for op in ops for d in op.deps if d in generate and ops[d].use != op.use}
        slices = [s for wave in plan.waves for s in wave.slices]
        need: dict[Key, set[int]] = {}
        decoding: dict[Key, set[int]] = {}  # the layers and LM heads generate slices decode with
        trains: dict[Key, set[int]] = {}
        tp_decode: dict[int, tuple[int, ...]] = {}  # device -> the TP group it decodes in (tensor_parallel > 1)
        for s in slices:
            op = ops[s.metaop]
            if s.metaop in generate:
                if s.first_layer != 0 or s.num_layers != op.num_layers:
                    raise NotImplementedError(
                        f"{op.name}: a generate use runs as one MetaOp (all {op.num_layers} layers in one slice); the "
                        f"plan runs layers {s.first_layer}..{s.first_layer + s.num_layers - 1}. Re-plan with the "
                        "planner that knows generate uses.")
                for key in [("embed:" + op.component, 0), *layer_keys(job, op), ("head:" + op.task, 0)]:
                    need.setdefault(key, set()).update(s.devices)
                    if not key[0].startswith("embed:"):
                        decoding.setdefault(key, set()).update(s.devices)
                for i in range(0, len(s.devices), s.tp_degree) if s.tp_degree > 1 else ():
                    tp_decode.update({d: tuple(s.devices[i:i + s.tp_degree]) for d in s.devices[i:i + s.tp_degree]})
            if s.metaop in sample:  # the component's real modules (runtime.sampleop), trained with grad_last_step
                from runtime.sampleop import module_keys

                for key in module_keys(job, op):
                    need.setdefault(key, set()).update(s.devices)
                    if sample[s.metaop] and not job.components[op.component].frozen:
                        trains.setdefault(key, set()).update(s.devices)
            if s.metaop in readers and s.first_layer == 0:
                key = ("embed:" + op.component, 0)
                need.setdefault(key, set()).update(s.devices)
                if use_of(job, op).mode == "train" and not job.components[op.component].frozen:
                    trains.setdefault(key, set()).update(s.devices)
        extra = {k: tuple(sorted(d - held.get(k, set()))) for k, d in need.items() if d - held.get(k, set())}
        # every module a mode trains is summed after the last backward, over its holders and the extra copies that
        # train it: the plan's bucket of a module a sample use's x0 trains would be launched at the loss, before the
        # sample's backward has added its gradient (a loss host data parallel over the sampling devices)
        synced = {k: tuple(sorted(held.get(k, set()) | devices)) for k, devices in trains.items()}
        frozen = {("embed:" + n, 0) for n in untrained(job)}

        def steppers(key: Key) -> tuple[int, ...]:
            return synced.get(key) or tuple(sorted(held.get(key, set())))

        def senders(key: Key, device: int) -> tuple[int, ...]:  # a TP decode's shard: from a trainer of that shard
            group, by_shard = tp_decode.get(device), shards.get(key, {})
            if group is None or key[0].startswith(("embed:", "head:")) or len(by_shard) != len(group):
                return steppers(key)  # the sender cuts it (from its whole layer, or its TP group's gathered one)
            return tuple(sorted(by_shard[group.index(device)]))  # trainers at the decode's degree: their own shard

        per_node = job.cluster.devices_per_node
        hand_offs = [(k, k, sender(senders(k, d), d, per_node), d) for k in sorted(extra) if k not in frozen
                     and steppers(k) for d in extra[k] if d not in synced.get(k, ())]
        for name, comp in sorted(job.components.items()):
            if comp.weights_from:
                hand_offs += _weights_from_moves(name, comp.weights_from, held, extra, steppers)
        # each receiver takes the layer as it holds it: a TP shard where it runs (or decodes) the layer
        # tensor-parallel, else whole, whatever else its device decodes (a weights_from copy beside a TP decode)
        tp_groups = layer_tp_groups(plan, lambda g: layer_keys(job, ops[g]) if g in generate else None)
        received = {(k, d): (len(tp_groups[k, d]), tp_groups[k, d].index(d)) for k, _, _, d in hand_offs
                    if (k, d) in tp_groups}
        # the extra copies a device holds only to decode with, refreshed by a hand-off after every step
        copies: dict[Key, set[int]] = {}
        for k, _, _, d in hand_offs:
            if d in decoding.get(k, ()) and d in extra.get(k, ()) and d not in synced.get(k, ()):
                copies.setdefault(k, set()).add(d)
        decode_copies = {k: tuple(sorted(d)) for k, d in copies.items()}
        moves = {}
        hosts = program.loss_hosts(ops, placed)
        for g in sorted(generate):
            task = ops[g].task
            src = next(s for s in slices if s.metaop == g)
            host = placed.waves[hosts[task][0][0]].slices[hosts[task][0][1]]
            batch = ops[g].batch_size
            out = []
            for i, dst in enumerate(host.devices[::host.layout.tp_degree]):
                a, b = sample_range(batch, host.layout.dp_degree, i)
                for j, dev in enumerate(src.devices[::src.tp_degree]):  # a TP group's first rank sends its rows
                    c, d = sample_range(batch, src.dp_degree, j)
                    if max(a, c) < min(b, d):
                        out.append((dev, dst, max(a, c), min(b, d)))
            moves[task] = (g, hosts[task][0][0], out)
        widths = {g: rollout_width(job, ops[g]) for g in generate}
        if sample:
            from runtime.sampleop import latent_shape

            widths |= {g: math.prod(latent_shape(job, ops[g])) for g in sample}
        return cls(generate, readers, extra, synced, hand_offs, moves, widths, sample, tp_decode, received,
                   decode_copies)

    def wire_pieces(self, plan, pieces: list) -> list:
        """The plan's pieces of one boundary as they run: a generate MetaOp's output rows at their packed width and a
        sample MetaOp's x0 (or latents) flattened, and none of their gradients (the plan may price them; nothing flows
        back into a rollout) except those of x0 of a sample use with ``grad_last_step``."""
        out = []
        for p in pieces:
            g = plan.waves[p.producer[0]].slices[p.producer[1]].metaop
            if g not in self.widths:
                out.append(p)
            elif not p.backward or self.sample.get(g):
                out.append(p.model_copy(update={"shape": (self.widths[g],)}))
        return out

    def move_rollouts(self, in_phase: Callable[[int], bool], st, rank: int, device: torch.device,
                      rows_of: Callable[[int, int], tuple[int, torch.Tensor]],
                      land: Callable[[int, tuple, int, torch.Tensor], None]) -> None:
        """Rollout rows to the devices computing the loss of the tasks whose loss host's wave is ``in_phase`` (a grpo
        loss reads the tokens); every rank walks the same moves, so the point-to-point calls pair up. The rows of
        every micro-batch move in the step's first (the decode made them all there: a loss host then meets each
        decoding device once a step, not once a micro-batch); ``rows_of(g, micro)``: this rank's (first row, rows)
        of generate MetaOp ``g`` in that micro-batch; ``land(micro, key, first, rows)`` keeps received rows for that
        micro-batch under ``("rollout", task)``."""
        if st.micro:
            return
        ops, landing = [], []
        for micro in range(st.num_micro):
            for task, (g, wave, moves) in sorted(self.rollout_moves.items()):
                if not in_phase(wave):
                    continue
                for src, dst, a, b in moves:
                    if rank == src:
                        first, rows = rows_of(g, micro)
                        piece = rows[a - first:b - first].contiguous()
                        if dst == rank:
                            landing.append((micro, task, a, piece.clone()))
                        else:
                            ops.append(dist.P2POp(dist.isend, piece, dst))
                    elif rank == dst:
                        buf = torch.empty((b - a, self.widths[g]), device=device)
                        ops.append(dist.P2POp(dist.irecv, buf, src))
                        landing.append((micro, task, a, buf))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for micro, task, a, rows in landing:
            land(micro, ("rollout", task), a, rows)

    def groups(self) -> list[tuple[int, ...]]:
        """The device sets whose gradient all-reduce the extras add (process groups to create, sorted)."""
        return sorted({d for d in self.synced.values() if len(d) > 1})

    def mine(self, rank: int) -> list[Key]:
        """The extra modules ``rank`` holds."""
        return [k for k, devices in sorted(self.extra.items()) if rank in devices]

    def handle(self, key: Key) -> bool:
        """Whether the gradient of module ``key`` is summed over :attr:`synced` instead of the plan's bucket."""
        return key in self.synced

    def _shard_of(self, key: Key, device: int) -> tuple[int, int] | None:
        """(tp_size, tp_rank) of the shard of layer ``key`` that ``device`` holds and receives (None: the whole
        module): :attr:`shards`, decided from the plan for the receiving module itself, so a whole copy on a device
        that decodes another component tensor-parallel still takes the whole layer."""
        return self.shards.get((key, device))

    def hand_off(self, modules: dict[Key, nn.Module], rank: int, device: torch.device,
                 tp_of: dict[Key, tuple[int, ...]] | None = None, low: torch.dtype | None = None) -> None:
        """After the optimizer step: every hand-off's weights from its sender to its receiver (point-to-point; every
        rank walks the same list, so the calls pair up; a sender that is its own receiver copies), each receiver
        taking the layer as it holds it (:meth:`_shard_of`; runtime.tp_decode.flat_shard, cut by the sender).
        ``tp_of``: the TP group of each tensor-parallel layer ``rank`` holds (runtime.executor): where the sender's
        shard is not what its receiver takes, every rank of the sender's group first gathers the whole layer, once
        per layer (runtime.tp_decode.needs_gather of the sender's shard, the same on every rank of the group; the
        groups walk the list in the same order, so their all-gathers pair up). ``low``: the compute dtype, in which
        a copy only to decode with (:attr:`decode_copies`) holds its matrices (:func:`lower_matrices`) and receives them
        (runtime.tp_decode.pack_wire: half the bytes of float32 under bf16); None (float32 compute): every tensor in
        float32."""
        from runtime.megatron_backend import gather_reference_weights

        tp_of = tp_of or {}
        whole: dict[Key, dict[str, torch.Tensor]] = {}
        for dst_key, src_key, src, dst in self.hand_offs:
            group = tp_of.get(src_key)
            if group is not None and src in group and src_key not in whole and needs_gather(
                    (len(group), group.index(src)), self._shard_of(dst_key, dst)):
                whole[src_key] = gather_reference_weights(modules[src_key])
        ops, landing = [], []
        for dst_key, src_key, src, dst in self.hand_offs:
            if rank not in (src, dst):
                continue
            shard = self._shard_of(dst_key, dst)
            matrices = low if dst in self.decode_copies.get(dst_key, ()) else None
            if rank == src:
                flat = flat_shard(modules[src_key], shard, whole.get(src_key), matrices).to(device)
                if src == dst:  # its own receiver: a copy, cut as the receiving module holds the layer
                    landing.append((receive_order(modules[dst_key], shard), flat, matrices))
                else:
                    ops.append(dist.P2POp(dist.isend, flat, dst))
            else:
                params = receive_order(modules[dst_key], shard)
                buf = (torch.empty(sum(p.numel() for p in params), device=device) if matrices is None else
                       torch.empty(packed_bytes(params, matrices), dtype=torch.uint8, device=device))
                ops.append(dist.P2POp(dist.irecv, buf, src))
                landing.append((params, buf, matrices))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        with torch.no_grad():
            for params, buf, matrices in landing:
                unpack_wire(buf, params, matrices)


def _weights_from_moves(name: str, source: str, held: dict, extra: dict, steppers) -> list[tuple[Key, Key, int, int]]:
    """Hand-offs of ``components.<name>.weights_from: <source>``: each module of ``source``'s (its layers, its input
    module) from the lowest device that steps it to every device holding ``name``'s counterpart."""
    out = []
    keys = set(held) | set(extra)
    for key in sorted(keys):
        group, layer = key
        if group == name:
            src_key = (source, layer)
        elif group == "embed:" + name:
            src_key = ("embed:" + source, 0)
        else:
            continue
        if not steppers(src_key):
            raise ValueError(f"components.{name}.weights_from ('{source}'): no device holds {src_key[0]} layer "
                             f"{src_key[1]} to hand its weights over; '{source}' must be used by a task.")
        receivers = sorted(held.get(key, set()) | set(extra.get(key, ())))
        out += [(key, src_key, steppers(src_key)[0], d) for d in receivers]
    return out


def copy_weights_from(job: JobSpec, modules: dict[Key, nn.Module]) -> None:
    """Single-process hand-off: every ``weights_from`` component's modules take their source's weights."""
    with torch.no_grad():
        for name, comp in job.components.items():
            if not comp.weights_from:
                continue
            for (group, layer), module in modules.items():
                src = (comp.weights_from, layer) if group == name else (
                    ("embed:" + comp.weights_from, 0) if group == "embed:" + name else None)
                if src is not None:
                    for p, q in zip(module.parameters(), modules[src].parameters()):
                        p.copy_(q)
