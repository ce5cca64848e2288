"""A side channel for large wave-boundary pieces (the executor's alternative to point-to-point).

The executor moves every piece of activation (or of its gradient) between two devices point-to-point in the
default group, except, when the worker has a :class:`PieceChannel`, the pieces of at least ``channel.min_bytes``:
the producer posts those and the consumer takes them (blocking until they are there). Posting never blocks and
every rank posts its pieces of a boundary before it waits for anything, so a boundary cannot deadlock; which
pieces take the channel is a function of the plan (their sizes), the same on both ends. The Ray layer provides
one over Ray's object store (``orchestrator.actors.ObjectStoreChannel``), which on one host is cheaper than gloo
for large pieces (bench/transfer: from 32 MiB). Imports only torch.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import torch


class PieceChannel(Protocol):
    """Where pieces of ``min_bytes`` and more go: ``post`` on the producer, ``take`` (from rank ``src``) on the
    consumer, matched by ``key`` (unique within a step: the executor's :func:`piece_key`)."""

    min_bytes: int

    def post(self, key: Hashable, tensor: torch.Tensor) -> None: ...

    def take(self, src: int, key: Hashable) -> torch.Tensor: ...


def piece_key(step: int, forward: bool, piece: Hashable, target: int) -> tuple:
    """The key of one piece's move: the step, the direction, the piece and where it goes (backward sends a piece's
    gradient to every TP device of its producer)."""
    return step, forward, piece, target
