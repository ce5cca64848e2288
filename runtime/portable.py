"""A checkpoint layout that does not depend on the plan: parameters and AdamW state under global names, in the plain
(single-process, tensor-parallel gathered) layout, so that any plan of the same job can load it (resharding on load).

One safetensors file per rank (``rank_<r>.safetensors``), holding:

- ``p:<name>``: a whole parameter or persistent buffer of the plain layout, ``<name>`` as
  ``WaveWorker.named_parameters`` (``<param group or embed:/adapt:/head: name>/<layer>/<param>``); written by exactly
  one rank, the lowest that holds its module (tensor-parallel shards are gathered first).
- ``o:<state>@<start>:<name>``: elements ``[start, start + n)`` of the flattened optimizer state ``<state>``
  (``exp_avg``, ``exp_avg_sq``: every per-element state of the optimizer) of parameter ``<name>``. Without ZeRO-1 the
  lowest holder writes the whole tensor (start 0); with ZeRO-1 each holder of a gradient bucket writes the slices of
  its share, so the pieces of all ranks cover each parameter once. (A tensor-parallel parameter in a ZeRO-1 bucket:
  the holders all-gather the bucket's state first, since its shard layout is not the plain one; its lowest holder
  writes it whole.)
- ``s:<scalar>:<name>``: AdamW's ``step`` of the parameter, with the piece that starts at 0.
- ``loss_scale``: ``[scale, good steps]`` (float64) of fp16's loss scaler, in rank 0's file.
- ``a:<task>/<use>@<step>:<first row>``: with ``training.rollout_lag: 1``, rows ``[first, first + n)`` of the rollouts
  of generate use ``<use>`` for step ``<step>``, decoded a step ahead (runtime.lagged), written by the rank that
  decoded them; a worker of any plan takes the rows its slice needs (when the pieces cover them; else it decodes them
  again, with the weights the step starts from).

Why safetensors with a manifest rather than torch.distributed.checkpoint: the runtime's shards are not DTensors (ZeRO-1
shares are runs of a flattened bucket, TP shards are megatron's fused, permuted layouts), so DCP would need a custom
planner to express either; a flat name -> piece index is a few lines, readable without torch, and safetensors reads one
tensor (or a slice of one, ``get_slice``) without loading the rest, so a worker reads only what it holds. No pickle.

:func:`export_state` (collective: TP gathers, ZeRO-1 bucket gathers) returns a rank's tensors; the orchestrator writes
them and merges every rank's index into the checkpoint's manifest (``orchestrator.checkpoint``). :func:`import_state`
reads, from a :class:`PortableReader` over that index, exactly the parameters a worker of any plan holds and its
optimizer share, and refuses a checkpoint of another job (a missing name or another shape) with one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

SCALARS = ("step",)  # AdamW's per-parameter scalars (0-d tensors); every other state tensor is per element
LOSS_SCALE = "loss_scale"


class CheckpointMismatch(ValueError):
    """The checkpoint was not written by this job (a parameter it lacks, or of another shape): one line."""


def global_name(key: tuple[str, int], local: str) -> str:
    """``<module name>/<layer>/<parameter>``: the name a tensor has in every plan (``WaveWorker.named_parameters``)."""
    return f"{key[0]}/{key[1]}/{local}"


# --------------------------------------------------------------------------- export


def export_state(worker) -> dict[str, torch.Tensor]:
    """This rank's part of a portable checkpoint (see the module docstring): keys -> contiguous CPU tensors.

    Collective: every rank of the plan calls it (tensor-parallel gathers over each TP group, one all-gather of the
    optimizer state per ZeRO-1 bucket that holds a tensor-parallel parameter)."""
    worker.settle_parameters()
    writer = _writers(worker)
    out: dict[str, torch.Tensor] = {}
    for key, module in sorted(worker.modules.items()):
        if key in worker.tp_of:
            plain = _tp_plain(module, lambda p: p.detach())
        else:
            plain = {k: v.detach() for k, v in module.state_dict().items()}
        if writer.get(key) == worker.rank:  # none: a copy only to decode with, whose writer this rank does not see
            out.update({"p:" + global_name(key, n): t for n, t in plain.items()})
    _export_optimizer(worker, writer, out)
    for op, ((step, first, _), rows) in worker.ahead.state().items():
        meta = worker.plan.metaops[op]
        out[f"a:{meta.task}/{meta.use}@{step}:{first}"] = rows
    if worker.rank == 0:
        scaler = worker.scaler.state_dict()
        out[LOSS_SCALE] = torch.tensor([scaler["scale"], scaler["good_steps"]], dtype=torch.float64)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def _writers(worker) -> dict[tuple[str, int], int]:
    """The rank that writes each module's tensors: the lowest of every device holding any shard or copy of it (the
    plan's holders, and the copies a generate or sample use runs over: runtime.rollout.Roles.extra, the only holders
    of a component that no use trains in a slice of its own; not a copy only to decode with, Roles.decode_copies,
    whose matrices are in the compute precision while a trainer holds them in float32). A rank's Assignment names
    only the holdings it takes part in, so a rank holding only an extra copy does not see the plan's holders of that
    module: Roles.synced, the same on every rank, names both for a module a mode trains (a sample use's head, whose
    loss host is elsewhere)."""
    held = [((name, layer), devices) for (name, layer, _), devices in worker.holders.items()]
    if worker.roles is not None:  # a copy only to decode with (its matrices in the compute precision) never writes
        copies = worker.roles.decode_copies
        held += [(k, tuple(set(d) - set(copies.get(k, ())))) for k, d in worker.roles.extra.items()]
        held = [(k, d) for k, d in held if d] + list(worker.roles.synced.items())
    lowest: dict[tuple[str, int], int] = {}
    for key, devices in held:
        lowest[key] = min(min(devices), lowest.get(key, min(devices)))
    return lowest


def _export_optimizer(worker, writer: dict[tuple[str, int], int], out: dict[str, torch.Tensor]) -> None:
    """The optimizer state of every trainable parameter this rank updates, as ``o:`` pieces (module docstring)."""
    from runtime.zero import ShardedAdamW

    opt = worker.optimizer
    if opt is None:
        return
    state = opt.inner.state if isinstance(opt, ShardedAdamW) else opt.state
    whole: dict[int, dict[str, torch.Tensor]] = {id(p): s for p, s in state.items()}  # params updated whole
    if isinstance(opt, ShardedAdamW):
        whole.update(_tp_bucket_states(worker, opt))
        for share in opt.shares:
            _export_share(worker, share, state, out)
    for key, module in sorted(worker.modules.items()):
        for state_name in _state_names(whole):
            if key in worker.tp_of and state_name in SCALARS:  # the same on every TP rank: each reference takes it
                plain = {r: whole[id(p)][state_name] for n, p in module.named_parameters()
                         if state_name in whole.get(id(p), {}) for r in _references(module, n)}
            elif key in worker.tp_of:
                plain = _tp_plain(module, lambda p: whole.get(id(p), {}).get(state_name))
            else:
                plain = {n: whole[id(p)][state_name] for n, p in module.named_parameters()
                         if state_name in whole.get(id(p), {})}
            if writer.get(key) != worker.rank:
                continue
            for n, t in plain.items():
                if state_name in SCALARS:
                    out[f"s:{state_name}:{global_name(key, n)}"] = t
                else:
                    out[f"o:{state_name}@0:{global_name(key, n)}"] = t.reshape(-1)


def _state_names(states: dict[int, dict[str, torch.Tensor]]) -> list[str]:
    """The optimizer's state names (the same on every rank: the job's optimizer), sorted."""
    names = {n for s in states.values() for n in s}
    return sorted(names or ("exp_avg", "exp_avg_sq", "step"))


def _export_share(worker, share, state: dict, out: dict[str, torch.Tensor]) -> None:
    """The slices of this rank's ZeRO-1 share of one bucket, per parameter with its offset (tensor-parallel parameters
    are left to :func:`_tp_bucket_states`)."""
    names = _param_names(worker)
    offset = 0
    for p in share.params:
        lo, hi = offset, offset + p.numel()
        offset = hi
        name = names[id(p)]
        if name is None:  # a tensor-parallel shard: exported whole after a gather
            continue
        for run in share.runs:
            start, stop = max(lo, run.lo), min(hi, run.hi)
            if start >= stop or run.master not in state:
                continue
            for state_name, t in state[run.master].items():
                if state_name in SCALARS:
                    if start == lo:
                        out[f"s:{state_name}:{name}"] = t
                else:
                    out[f"o:{state_name}@{start - lo}:{name}"] = t[start - run.lo:stop - run.lo]


def _tp_bucket_states(worker, opt) -> dict[int, dict[str, torch.Tensor]]:
    """Whole optimizer state of every tensor-parallel parameter in a ZeRO-1 bucket, by ``id(param)``: one all-gather
    of the bucket's flattened state per state name among its holders (collective over each such bucket's group)."""
    import torch.distributed as dist

    names = _param_names(worker)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for share in opt.shares:
        if all(names[id(p)] is not None for p in share.params):
            continue
        states = [opt.inner.state.get(run.master, {}) for run in share.runs]
        for state_name in _state_names({i: s for i, s in enumerate(states)}):
            mine = torch.zeros(share.per, device=share.params[0].device)
            scalar = None
            for run, s in zip(share.runs, states):
                if state_name in s and state_name not in SCALARS:
                    mine[run.lo - share.lo:run.hi - share.lo] = s[state_name]
                elif state_name in s:
                    scalar = s[state_name]
            if state_name in SCALARS:  # the same on every holder after the same steps
                scalar = torch.tensor([float(scalar) if scalar is not None else -1.0])
                parts = [torch.empty(1) for _ in range(share.num_holders)]
                dist.all_gather(parts, scalar, group=share.group)
                value = max(float(t) for t in parts)
                for p in share.params:
                    if names[id(p)] is None and value >= 0:
                        out.setdefault(id(p), {})[state_name] = torch.tensor(value, dtype=torch.float32)
                continue
            parts = [torch.empty(share.per, device=mine.device) for _ in range(share.num_holders)]
            dist.all_gather(parts, mine, group=share.group)
            flat, offset = share.gathered(parts), 0
            for p in share.params:
                if names[id(p)] is None:
                    out.setdefault(id(p), {})[state_name] = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
    return out


def _param_names(worker) -> dict[int, str | None]:
    """``id(param)`` -> its global name for parameters of plain modules; None for tensor-parallel shards (which map to
    several plain tensors)."""
    out: dict[int, str | None] = {}
    for key, module in worker.modules.items():
        for n, p in module.named_parameters():
            out[id(p)] = None if key in worker.tp_of else global_name(key, n)
    return out


def _tp_plain(block, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``tensor_of(param)`` of every parameter of a megatron block, gathered over its TP group and mapped to the plain
    layer's names (runtime.megatron_backend's own map, as for weights and gradients). Collective."""
    from runtime.megatron_backend import _gather  # the one map between megatron shards and the plain layout

    with torch.no_grad():
        return _gather(block, tensor_of)


def _tp_local(block, plain: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter of a megatron block (by ``named_parameters`` name) from the plain tensors
    ``plain(reference name)``: the inverse of :func:`_tp_plain`, no communication (as ``load_reference``)."""
    from runtime.megatron_backend import _shard

    out = {}
    for name, _ in block.named_parameters():
        where = block.param_map[name.removeprefix("layer.")]
        out[name] = _shard(where.fuse([plain(r) for r in where.references], block), where, block)
    return out


# --------------------------------------------------------------------------- import


class PortableReader:
    """Reads pieces of a portable checkpoint: ``index`` maps each key to ``{"file", "shape"}`` (the manifest's
    ``tensors``), files are relative to ``directory``. Each file is opened once, and only the tensors (or slices)
    asked for are read."""

    def __init__(self, directory: str | Path, index: dict[str, dict], where: str):
        self.directory, self.index, self.where = Path(directory), index, where
        self._files: dict[str, object] = {}
        self.pieces: dict[tuple[str, str], list[tuple[int, int, str]]] = {}  # (state, name) -> (start, n, key)
        for key, entry in index.items():
            if key.startswith("o:"):  # o:<state>@<start>:<name> (names hold ':', states and offsets do not)
                _, piece, name = key.split(":", 2)
                state_name, start = piece.split("@")
                self.pieces.setdefault((state_name, name), []).append((int(start), math.prod(entry["shape"]), key))
        self.state_names = sorted({state_name for state_name, _ in self.pieces})  # per-element states
        self.tensors_read = 0

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            self._files[file] = safe_open(str(self.directory / file), framework="pt")
        return self._files[file]

    def has(self, key: str) -> bool:
        return key in self.index

    def tensor(self, key: str) -> torch.Tensor:
        self.tensors_read += 1
        return self._open(self.index[key]["file"]).get_tensor(key)

    def param(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Parameter (or buffer) ``name``; CheckpointMismatch when it is missing or not of ``shape`` (if given)."""
        entry = self.index.get("p:" + name)
        if entry is None:
            raise CheckpointMismatch(f"{self.where}: has no parameter '{name}': it was written by another job (other "
                                     "components or layers). Resume with the job that wrote it, or start a new run.")
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise CheckpointMismatch(f"{self.where}: parameter '{name}' has shape {tuple(entry['shape'])}, this job's "
                                     f"is {tuple(shape)}: it was written by another job. Resume with the job that "
                                     "wrote it, or start a new run.")
        return self.tensor("p:" + name)

    def state_range(self, state_name: str, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Elements ``[start, stop)`` of the flattened state ``state_name`` of parameter ``name``, read from the
        pieces that cover them (slices only); None when the checkpoint has no such state (never stepped)."""
        pieces = self.pieces.get((state_name, name))
        if not pieces:
            return None
        out = torch.empty(stop - start)
        covered = 0
        for first, n, key in pieces:
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                self.tensors_read += 1
                out[lo - start:hi - start] = self._open(self.index[key]["file"]).get_slice(key)[lo - first:hi - first]
                covered += hi - lo
        assert covered == stop - start, f"{self.where}: {state_name} of {name} covers {covered} of {stop - start}"
        return out

    def whole_state(self, state_name: str, name: str) -> torch.Tensor:
        """The whole state ``state_name`` of parameter ``name`` in its plain shape (zeros when the checkpoint has
        none: a parameter that was never stepped)."""
        shape = tuple(self.index["p:" + name]["shape"])
        got = self.state_range(state_name, name, 0, math.prod(shape))
        return (got if got is not None else torch.zeros(math.prod(shape))).reshape(shape)

    def scalar(self, state_name: str, name: str) -> torch.Tensor | None:
        key = f"s:{state_name}:{name}"
        return self.tensor(key) if key in self.index else None


def import_state(worker, reader: PortableReader) -> None:
    """Load the parameters ``worker`` holds and its optimizer state (whole, or its ZeRO-1 share) from ``reader``;
    no communication. CheckpointMismatch (one line) for a checkpoint of another job."""
    from runtime.zero import ShardedAdamW

    worker.settle_parameters()
    with torch.no_grad():
        for key, module in sorted(worker.modules.items()):
            if key in worker.tp_of:
                local = _tp_local(module, lambda r: reader.param(global_name(key, r)))
                for n, p in module.named_parameters():
                    if local[n].shape != p.shape:
                        raise CheckpointMismatch(f"{reader.where}: the parameters of {key[0]}/{key[1]} give a shard "
                                                 f"of {tuple(local[n].shape)} for {n}, this job's is {tuple(p.shape)}: "
                                                 "it was written by another job.")
                    p.copy_(local[n])
            else:
                current = module.state_dict()
                module.load_state_dict({n: reader.param(global_name(key, n), tuple(t.shape))
                                        for n, t in current.items()})
    opt = worker.optimizer
    if opt is not None:
        trainable = [p for m in worker.modules.values() for p in m.parameters() if p.requires_grad]
        if isinstance(opt, ShardedAdamW):
            _import_shares(worker, opt, reader)
            alone = {id(p) for g in opt.param_groups for p in g["params"]}
            trainable = [p for p in trainable if id(p) in alone]
            state = opt.inner.state if opt.inner is not None else {}
        else:
            state = opt.state
        for p, s in _whole_states(worker, reader, trainable).items():
            state[p] = s
    if reader.has(LOSS_SCALE):
        scale, good = reader.tensor(LOSS_SCALE).tolist()
        worker.scaler.load_state_dict({"scale": scale, "good_steps": int(good)})
    _import_ahead(worker, reader)


def _import_ahead(worker, reader: PortableReader) -> None:
    """The rollouts decoded a step ahead (``a:`` keys) that this worker's generate slices need, when the
    checkpoint's pieces cover their rows."""
    pieces: dict[str, list[tuple[int, int, int, str]]] = {}  # task/use -> (step, first, rows, key)
    for key, entry in reader.index.items():
        if key.startswith("a:"):
            name, at = key[2:].rsplit("@", 1)
            step, first = (int(v) for v in at.split(":"))
            pieces.setdefault(name, []).append((step, first, entry["shape"][0], key))
    state = {}
    for ref in worker.mine if pieces else ():
        s = worker.comm.slices[ref]
        meta = worker.plan.metaops[s.metaop]
        found = pieces.get(f"{meta.task}/{meta.use}", [])
        if worker.roles is None or s.metaop not in worker.roles.generate or not found:
            continue
        start, stop = worker._rows(ref)
        step = found[0][0]
        parts = sorted((first, n, key) for at, first, n, key in found
                       if at == step and first < stop and first + n > start)
        if sum(min(stop, first + n) - max(start, first) for first, n, _ in parts) != stop - start:
            continue
        rows = torch.cat([reader.tensor(key)[max(start, first) - first:min(stop, first + n) - first]
                          for first, n, key in parts])
        state[s.metaop] = ((step, start, stop), rows)
    worker.ahead.restore(state, worker.device)


def _whole_states(worker, reader: PortableReader, params: list) -> dict:
    """The optimizer state of each of ``params`` (updated whole by this rank) in its local layout, by parameter;
    parameters the checkpoint has no state for (never stepped) are left out."""
    wanted = {id(p) for p in params}
    out: dict = {}
    for key, module in sorted(worker.modules.items()):
        mine = [(n, p) for n, p in module.named_parameters() if id(p) in wanted]
        if not mine:
            continue
        if key in worker.tp_of:
            per_state = {s: _tp_local(module, lambda r, s=s: reader.whole_state(s, global_name(key, r)))
                         for s in reader.state_names}
            for n, p in mine:
                step = reader.scalar("step", global_name(key, _references(module, n)[0]))
                if step is not None:
                    out[p] = {"step": step.float()} | {s: t[n].to(p.device).clone() for s, t in per_state.items()}
            continue
        for n, p in mine:
            name = global_name(key, n)
            step = reader.scalar("step", name)
            if step is not None:
                out[p] = {"step": step.float()} | {s: reader.whole_state(s, name).view_as(p).to(p.device).clone()
                                                   for s in reader.state_names}
    return out


def _references(block, name: str) -> tuple[str, ...]:
    """The plain parameters a megatron parameter ``name`` holds (runtime.megatron_backend's map)."""
    return block.param_map[name.removeprefix("layer.")].references


def _import_shares(worker, opt, reader: PortableReader) -> None:
    """Each ZeRO-1 run's state from the pieces of its elements (plain parameters: slices only; tensor-parallel
    shards: their whole state, sharded, then sliced)."""
    names = _param_names(worker)
    tp_states = _whole_states(worker, reader, [p for s in opt.shares for p in s.params if names[id(p)] is None])
    for share in opt.shares:
        for run in share.runs:
            pieces: dict[str, list[torch.Tensor]] = {s: [] for s in reader.state_names}
            step, offset = None, 0
            for p in share.params:
                lo, hi = offset, offset + p.numel()
                offset = hi
                start, stop = max(lo, run.lo), min(hi, run.hi)
                if start >= stop:
                    continue
                for state_name in pieces:
                    if names[id(p)] is None:
                        whole = tp_states.get(p, {}).get(state_name)
                        got = whole.reshape(-1)[start - lo:stop - lo].cpu() if whole is not None else None
                        step = tp_states.get(p, {}).get("step", step)
                    else:
                        got = reader.state_range(state_name, names[id(p)], start - lo, stop - lo)
                        step = reader.scalar("step", names[id(p)]) if step is None else step
                    pieces[state_name].append(got if got is not None else torch.zeros(stop - start))
            if step is None:  # never stepped: AdamW starts this run's state itself
                continue
            device = run.master.device
            opt.inner.state[run.master] = {"step": step.float()} | {
                s: torch.cat(ts).to(device) for s, ts in pieces.items()}
