"""Worlds of worker processes forked from one server that imported the runtime once (used by conftest.py and by the
tests that start their own workers).

A gloo world is one fresh process per rank. Started with ``spawn`` each process imports torch, the runtime,
transformers, megatron-core and diffusers again, 3-8 s of CPU per rank and most of an equivalence test's time. Here
the ranks fork from a multiprocessing forkserver that imported those modules once for the whole session: each rank
is still a new process that runs only its own world's work (the server never runs one itself, so nothing of an
earlier test's state reaches it) and module-level state is what a fresh import leaves. The server's environment is
the session's as it was when pytest loaded this file (variables a test sets never leak into later worlds), with one
intra-op thread per process (what ``runtime.host.configure_worker_process`` sets in every runtime worker anyway)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os

import torch.multiprocessing

# what a rank imports: the worker (runtime.executor), run_world's setup (orchestrator.recipes) and the libraries the
# component kinds import lazily (pretrained llamas, megatron-core tensor parallelism, diffusers UNets)
PRELOAD = [
    "runtime.local_world", "runtime.executor", "orchestrator.recipes", "safetensors.torch", "transformers",
    "megatron.core.tensor_parallel", "megatron.core.transformer.transformer_layer",
    "megatron.core.models.gpt.gpt_layer_specs", "diffusers.models.resnet",
    "diffusers.models.transformers.transformer_2d",
]
SESSION_ENV = dict(os.environ)


def ensure_server() -> None:
    """Start the preloaded forkserver (once per session) with the session's environment plus OMP_NUM_THREADS=1."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(SESSION_ENV, OMP_NUM_THREADS="1")
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_world(fn, args=(), nprocs: int = 1, join: bool = True, daemon: bool = False, start_method: str = "spawn"):
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with the ranks forked from the preloaded server
    (``start_method`` is there for spawn's signature and ignored). A rank that raises fails the call with its
    traceback, as with spawn."""
    ensure_server()
    return torch.multiprocessing.start_processes(fn, args, nprocs, join, daemon, start_method="forkserver")
