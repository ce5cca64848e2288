"""Transfers at wave boundaries: the plan's pieces between devices, for runtime.executor.WaveWorker.

Forward, rows of producers' outputs go to the devices that read them; backward, the gradients of those rows go back to
every device of the producers. planner.program decided every piece; this module only moves them, in the plan's order
on every rank, so the point-to-point calls pair up. Pieces cross in the compute precision (the plan's bytes) and are
float32 again on arrival; large ones go through the worker's channel (runtime.channel) when it has one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from planner.phases import FORWARD, LOSS
from runtime.assignment import LOSS_WAVE, Piece
from runtime.channel import piece_key
from runtime.steps import StepState


class PieceTransfers:
    """The transfer half of a WaveWorker (mixed into it). Reads the worker's ``plan``, ``comm`` (its CommSchedule),
    ``rank``, ``device``, ``wire_dtype``, ``channel``, ``roles`` and ``_rows(ref)``; keeps the last micro-batch's sent
    pieces in :attr:`last_sent`."""

    last_sent: list[tuple[Piece, int]] = []  # the last micro-batch's pieces sent to other devices, bytes as sent
    _sent_step: int | None = None

    def _exchange(self, wave: int, st: StepState, forward: bool, phase: int | None = None) -> None:
        """Move the plan's pieces of one boundary (planner.program decided them): forward, rows of producers'
        outputs to the devices that read them; backward, the gradients of those rows back to every device of
        the producers (accumulated into their output gradients). Every rank walks the same boundaries and the
        plan's pieces in the plan's order, so the point-to-point calls pair up. On gloo each boundary's messages carry
        its own tag and, once this boundary is done, the next one's receives are posted (:meth:`_post_receives`)."""
        at = self._boundary_index((wave, forward, None if wave != LOSS_WAVE else phase))
        if forward and st.micro == 0:
            self._exchange_decoded(at, st)
        for key, rows in (self._early or {}).pop(st.move_id, {}).items():  # decoded rows, received in the first
            st.received.setdefault(key, []).extend(rows)
        pieces = self._boundary_pieces(at)
        tag = at + 1 if self._ahead_enabled() else 0
        ops, landing = [], []
        for p in pieces:
            if p.src != self.rank:
                continue
            tensor = self._piece_tensor(p, st, forward).to(self._wire_dtype_of(p))
            if p.dst == self.rank:
                landing.append((p, tensor.clone()))
                continue
            self._record_sent(st, p, tensor)
            if self._by_channel(p):
                self.channel.post(piece_key(st.move_id, forward, p, p.dst), tensor.contiguous())
            else:
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), p.dst, tag=tag))
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # posted for this boundary: a receive left behind would take a later boundary's message
            assert ahead[0] == (st.move_id, at), f"receives posted for {ahead[0]} met boundary {st.move_id, at}"
            received, requests = ahead[1], ahead[2]
        else:
            received, receives = self._receives(pieces, tag)
            requests = dist.batch_isend_irecv(receives) if receives else []
        requests += dist.batch_isend_irecv(ops) if ops else []
        for req in requests:
            req.wait()
        landing += received
        taken = [p for p in pieces if p.dst == self.rank and p.src != self.rank and self._by_channel(p)]
        landing += [(p, self.channel.take(p.src, piece_key(st.move_id, forward, p, self.rank))) for p in taken]
        for p, tensor in landing:
            self._land(p, tensor.float(), st, forward)
        self._post_receives(st, at)

    def _exchange_decoded(self, at: int, st: StepState) -> None:
        """In the step's first micro-batch, the pieces of boundary ``at`` whose producer decoded every micro-batch's
        rows at once (a generate use, runtime.executor's ``_rollouts``), for all the micro-batches: each stage that
        reads the rollouts then meets the decoding devices once a step, as planner.simulator.walk prices it, instead
        of once a micro-batch (pipelined, a rendezvous with every decode replica in turn). Point-to-point, in
        micro-batch then plan order on every rank; a later micro-batch's rows wait in :attr:`_early` for its turn."""
        pieces = self._decoded_pieces(at)
        if not pieces:
            return
        tag = len(self._boundary_order()) + at + 1 if self._ahead_enabled() else 0
        ops, landing = [], []
        for micro in range(st.num_micro):
            move_id = st.move_id - st.micro + micro
            for p in pieces:
                if p.src == self.rank:
                    first, rows = self.decoded[self.plan.waves[p.producer[0]].slices[p.producer[1]].metaop]
                    tensor = rows[micro][p.start - first:p.stop - first].to(self._wire_dtype_of(p)).contiguous()
                    if p.dst == self.rank:
                        landing.append((micro, p, tensor.clone()))
                        continue
                    if micro == st.num_micro - 1:
                        self._record(move_id, p, tensor)
                    ops.append(dist.P2POp(dist.isend, tensor, p.dst, tag=tag))
                elif p.dst == self.rank:
                    buf = torch.empty((p.stop - p.start, *p.shape), device=self.device, dtype=self._wire_dtype_of(p))
                    ops.append(dist.P2POp(dist.irecv, buf, p.src, tag=tag))
                    landing.append((micro, p, buf))
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        for micro, p, tensor in landing:
            self._land_rows(st, micro, self._forward_key(p), p.start, tensor.float())

    def _land_rows(self, st: StepState, micro: int, key: tuple, first: int, rows: torch.Tensor) -> None:
        """Rows received for micro-batch ``micro`` of ``st``'s step under ``st.received``'s ``key``: into ``st`` when
        it is that micro-batch's, else kept in :attr:`_early` until its first exchange."""
        if micro == st.micro:
            st.received.setdefault(key, []).append((first, rows))
            return
        if self._early is None:
            self._early = {}
        self._early.setdefault(st.move_id - st.micro + micro, {}).setdefault(key, []).append((first, rows))

    def _decoded_pieces(self, at: int) -> list[Piece]:
        """The pieces of boundary ``at`` whose producer decodes several micro-batches' rows at once."""
        return self._pieces(at)[1]

    def _decoded_once(self, p: Piece) -> bool:
        return (not p.backward and self.roles is not None and self.payload.training.grad_accum_steps > 1
                and self.plan.waves[p.producer[0]].slices[p.producer[1]].metaop in self.roles.generate)

    _early: dict[int, dict[tuple, list[tuple[int, torch.Tensor]]]] | None = None  # move id -> key -> (first, rows)

    def _receives(self, pieces: list[Piece], tag: int) -> tuple[list[tuple[Piece, torch.Tensor]], list]:
        """The buffers of this device's point-to-point receives among ``pieces`` (in the plan's order) and their
        receive operations."""
        received, ops = [], []
        for p in pieces:
            if p.dst != self.rank or p.src == self.rank or self._by_channel(p):
                continue  # not mine, landed by the send loop, or taken from the channel
            buf = torch.empty((p.stop - p.start, *p.shape), device=self.device, dtype=self._wire_dtype_of(p))
            ops.append(dist.P2POp(dist.irecv, buf, p.src, tag=tag))
            received.append((p, buf))
        return received, ops

    def _post_receives(self, st: StepState, at: int) -> None:
        """Post the receives of the boundary that follows boundary ``at`` of ``st``'s micro-batch in the step's walk
        (:meth:`_exchanges`; in order, the same micro-batch's next one) now, while this device computes the wave
        before it. On this kind of VM a gloo message that lands on a worker blocked in its receive right after several
        milliseconds of compute costs ~3 ms instead of ~0.1 ms (``python -m bench.gloo_idle``); a receive posted
        before the compute does not pay it, and ``loom profile`` prices links without it. Gloo only: NCCL runs a
        posted receive on the communicator's stream, ahead of the collectives issued after it."""
        if not self._ahead_enabled():
            return
        order, position = self._exchanges()
        following = position[st.micro, at] + 1
        if following >= len(order):
            return
        micro, nxt = order[following]
        received, receives = self._receives(self._boundary_pieces(nxt), nxt + 1)
        if receives:
            move_id = st.move_id - st.micro + micro
            self._ahead = ((move_id, nxt), received, dist.batch_isend_irecv(receives))

    _ahead: tuple | None = None  # ((move_id, boundary), [(piece, buffer)], requests) posted by _post_receives
    _order: list[tuple[int, bool, int | None]] | None = None
    _exchange_order: tuple[list[tuple[int, int]], dict[tuple[int, int], int]] | None = None

    def _ahead_enabled(self) -> bool:
        return self.device.type == "cpu"

    def _boundary_order(self) -> list[tuple[int, bool, int | None]]:
        """Every boundary of one micro-batch as (wave, forward, phase of a loss stage) in the order the worker
        crosses them (runtime.executor: per phase its waves forward, the loss stage forth and back, its waves
        backward)."""
        if self._order is None:
            order = []
            for phase, (first, end) in enumerate(self.comm.phases):
                order += [(wave, True, None) for wave in range(first, end)]
                order += [(LOSS_WAVE, True, phase), (LOSS_WAVE, False, phase)]
                order += [(wave, False, None) for wave in reversed(range(first, end))]
            self._order = order
        return self._order

    def _exchanges(self) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int]]:
        """Every exchange of one step as (micro-batch, boundary index of :meth:`_boundary_order`) in the order the
        worker meets them (``comm.walk``: planner.phases.step_walk), and the position of each in that list."""
        if self._exchange_order is None:
            out = []
            for kind, micro, at in self.comm.walk:
                if kind == LOSS:
                    out += [(micro, self._boundary_index((LOSS_WAVE, forward, at))) for forward in (True, False)]
                else:
                    out.append((micro, self._boundary_index((at, kind == FORWARD, None))))
            self._exchange_order = out, {key: i for i, key in enumerate(out)}
        return self._exchange_order

    def _boundary_index(self, key: tuple[int, bool, int | None]) -> int:
        return self._boundary_order().index(key)

    def _boundary_pieces(self, at: int) -> list[Piece]:
        """The pieces of boundary ``at`` that cross in every micro-batch (not those of :meth:`_exchange_decoded`)."""
        return self._pieces(at)[0]

    def _pieces(self, at: int) -> tuple[list[Piece], list[Piece]]:
        """Boundary ``at``'s pieces as they run, split into those that cross in every micro-batch and those of rows
        decoded at once for all of them (:meth:`_decoded_once`); worked out once per boundary."""
        if self._split is None:
            self._split = {}
        if at not in self._split:
            wave, forward, phase = self._boundary_order()[at]
            pieces = self.comm.pieces_at(wave, backward=not forward, phase=phase)
            if self.roles is not None:  # rollout rows cross at their own width, and carry no gradient back
                pieces = self.roles.wire_pieces(self.plan, pieces)
            self._split[at] = ([p for p in pieces if not self._decoded_once(p)],
                               [p for p in pieces if self._decoded_once(p)])
        return self._split[at]

    _split: dict[int, tuple[list[Piece], list[Piece]]] | None = None

    def _record_sent(self, st: StepState, p: Piece, tensor: torch.Tensor) -> None:
        """Keep (piece, bytes) of every piece this device sends to another in :attr:`last_sent` (the last micro-batch's:
        the plan's pieces are one micro-batch's; pipelined, the micro-batches' sends interleave)."""
        if st.micro == st.num_micro - 1:
            self._record(st.move_id, p, tensor)

    def _record(self, move_id: int, p: Piece, tensor: torch.Tensor) -> None:
        if self._sent_step != move_id:
            self._sent_step, self.last_sent = move_id, []
        self.last_sent.append((p, tensor.numel() * tensor.element_size()))

    def _by_channel(self, p: Piece) -> bool:
        """Whether piece ``p`` moves through the channel: one of at least its ``min_bytes`` (rows in the compute
        precision), a function of the job and plan, so both ends agree."""
        size = (p.stop - p.start) * math.prod(p.shape) * self._wire_dtype_of(p).itemsize
        return self.channel is not None and size >= self.channel.min_bytes

    def _wire_dtype_of(self, p: Piece) -> torch.dtype:
        """The dtype piece ``p`` crosses in: the compute precision, except a generate use's packed rollout rows, which
        stay float32 (token ids are exact in float32 below 2^24, in bf16 only up to 256; runtime.rollout.pack)."""
        producer = self.plan.waves[p.producer[0]].slices[p.producer[1]]
        if self.roles is not None and producer.metaop in self.roles.generate:
            return torch.float32
        return self.wire_dtype

    def _piece_tensor(self, p: Piece, st: StepState, forward: bool) -> torch.Tensor:
        if forward:  # rows of my producer output
            y = st.outputs[p.producer]
            start, _ = self._rows(p.producer)
            return y.detach()[p.start - start:p.stop - start]
        leaf = st.inputs.get((p.consumer, p.input)) if p.consumer is not None else st.loss_inputs.get(p.producer)
        start, _ = self._rows(p.target)
        if leaf is None or leaf.grad is None:
            return torch.zeros((p.stop - p.start, *p.shape), device=self.device)
        return leaf.grad[p.start - start:p.stop - start]

    @staticmethod
    def _forward_key(p: Piece) -> tuple:
        """Where piece ``p``'s rows wait in ``StepState.received``: for their consumer's input, or the loss stage."""
        return ("slice", p.consumer, p.input) if p.consumer is not None else ("loss", p.producer)

    def _land(self, p: Piece, tensor: torch.Tensor, st: StepState, forward: bool) -> None:
        if forward:
            st.received.setdefault(self._forward_key(p), []).append((p.start, tensor))
            return
        start, stop = self._rows(p.producer)
        grad = st.grad_out.get(p.producer)
        if grad is None:
            grad = st.grad_out[p.producer] = torch.zeros((stop - start, *p.shape), device=self.device)
        grad[p.start - start:p.stop - start] += tensor
