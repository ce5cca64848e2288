"""The explicit, version-pinned CPU compatibility layer for megatron-core.

megatron-core assumes CUDA in many places. This module owns the few process-wide patches that let
a megatron-core ``TransformerLayer`` (local, non-Transformer-Engine spec) run forward and backward
on CPU at TP=1 and TP=2 over gloo, and nothing more:

1. ``torch.cuda.current_device`` returns ``"cpu"``. megatron passes it as ``device=`` when it
   allocates buffers (e.g. the global memory buffer that ``DotProductAttention`` uses), and the
   string ``"cpu"`` is a valid device there.
2. A CPU RNG states tracker (``CPURNGStatesTracker``) is installed through the module globals of
   ``megatron.core.tensor_parallel.random`` (``_CUDA_RNG_STATE_TRACKER`` and
   ``_CUDA_RNG_STATE_TRACKER_INITIALIZED``), so ``get_cuda_rng_tracker()`` returns it everywhere.
   Its ``add``/``fork`` swap the CPU generator's state instead of the CUDA one's.
3. ``seed(seed, tp_rank)`` replaces ``model_parallel_cuda_manual_seed`` (which calls
   ``torch.cuda.manual_seed`` and reads megatron's global parallel state); megatron's own name in
   ``tensor_parallel.random`` and ``tensor_parallel`` is rebound to a wrapper that calls it.

Where and when: call ``apply_cpu_compat()`` (idempotent) in a CPU worker process only, before
building any megatron module, then ``seed()``. It patches nothing when ``torch.cuda.is_available()``
(the version check still runs). The main or test process does not need it unless it builds
megatron modules itself. Applying it cannot be undone: it is process-global state, by design
confined to worker processes.

Pinned to megatron-core ``SUPPORTED_VERSION``; ``apply_cpu_compat`` refuses any other version,
because the patches edit private module globals that a release may rename.

Known failures on CPU even with this layer (measured; see the stack notes §1):
- sequence parallel: the local spec's torch LayerNorm asserts ``not sequence_parallel``;
- the distributed optimizer: ``distrib_optimizer.py`` checks for ``torch.cuda.FloatTensor``;
- gradient clipping: ``clip_grads.py`` asserts ``torch.cuda.FloatTensor`` grads;
- causal self-attention without an explicit mask: ``transformer/utils.py:get_default_causal_mask``
  allocates on ``device="cuda"`` (``AssertionError: Torch not compiled with CUDA enabled``).
Not covered and not tested: pipeline schedules (they need a ``torch.zeros(device="cuda")``
rewrite), megatron DDP and optimizers, activation recompute (``tensor_parallel.checkpoint`` saves
CUDA RNG states), MoE, CUDA graphs, FP8, Transformer-Engine specs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

SUPPORTED_VERSION = "0.16.1"

# Offsets megatron-core 0.16.1 uses in model_parallel_cuda_manual_seed; kept identical so that a
# CPU run draws the same per-rank streams a GPU run would derive from the same seed.
_TENSOR_PARALLEL_SEED_OFFSET = 2718
_EXPERT_PARALLEL_SEED_OFFSET = 1024

_applied = False


def installed_version() -> str | None:
    """The installed megatron-core version string, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_applied() -> bool:
    """Whether ``apply_cpu_compat`` has patched this process."""
    return _applied


def _check_version() -> None:
    version = installed_version()
    if version != SUPPORTED_VERSION:
        raise RuntimeError(
            f"megatron-core ({version}) is not the version the CPU compatibility layer was written "
            f"and tested for; expected {SUPPORTED_VERSION}. Install megatron-core=={SUPPORTED_VERSION}, "
            f"or re-check every patch in runtime/megatron_compat.py against the new release and "
            f"update SUPPORTED_VERSION."
        )


def _make_tracker_class() -> type:
    """Build the CPU tracker as a subclass of megatron's ``CudaRNGStatesTracker``.

    Built lazily so that importing this module does not import megatron-core.
    """
    from megatron.core.tensor_parallel import random as mc_random

    class CPURNGStatesTracker(mc_random.CudaRNGStatesTracker):
        """megatron's RNG states tracker with the CPU default generator in place of CUDA's.

        ``add(name, seed)`` records the CPU generator state seeded with ``seed``; ``fork(name)``
        runs its body on that stream and saves where the stream got to, restoring the outer state
        afterwards. Nested forks behave as in megatron's tracker.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists in the RNG tracker")
            if name in self.states_:
                raise RuntimeError(f"RNG state {name!r} already exists in the RNG tracker")
            self.seeds_.add(seed)
            outer_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)

        @contextlib.contextmanager
        def fork(self, name: str = mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise RuntimeError(
                    f"RNG state {name!r} is not in the tracker; call runtime.megatron_compat.seed() "
                    f"in this process before running megatron modules"
                )
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CPURNGStatesTracker


def seed(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU replacement for megatron's ``model_parallel_cuda_manual_seed``.

    Seeds the process's default (CPU) generator with ``seed`` (megatron seeds the default CUDA
    generator; on CPU that generator is the CPU one) and resets the installed tracker with megatron's
    three streams: data-parallel (``seed``), tensor-model-parallel (``seed + 2718 + tp_rank``) and
    expert-parallel (``seed + 1024 + 100 * ep_rank + etp_rank``). Requires ``apply_cpu_compat()``.
    """
    if not _applied:
        raise RuntimeError("runtime.megatron_compat.seed() needs apply_cpu_compat() first, in a CPU process")
    from megatron.core.tensor_parallel import random as mc_random

    tracker = mc_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mc_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TENSOR_PARALLEL_SEED_OFFSET + tp_rank)
    tracker.add(
        mc_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + _EXPERT_PARALLEL_SEED_OFFSET + 100 * ep_rank + etp_rank,
    )


def _model_parallel_manual_seed(
    seed_value: int,
    *args: object,
    tp_rank: int | None = None,
    ep_rank: int | None = None,
    etp_rank: int | None = None,
    **kwargs: object,
) -> None:
    """Stands in for megatron's ``model_parallel_cuda_manual_seed`` once the layer is applied.

    Accepts megatron's signature; the tracker flavour arguments (TE, inference, cudagraph) have no
    CPU meaning and are ignored. Missing ranks are read from megatron's global parallel state, as the
    original does.
    """
    from megatron.core import parallel_state

    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if ep_rank is None:
        ep_rank = parallel_state.get_expert_model_parallel_rank()
    if etp_rank is None:
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    seed(seed_value, tp_rank, ep_rank, etp_rank)


def _cpu_current_device() -> str:
    return "cpu"


def apply_cpu_compat() -> None:
    """Patch this CPU process so megatron-core's TransformerLayer runs on CPU (see module docstring).

    Idempotent. Raises RuntimeError before patching anything when the installed megatron-core is
    not ``SUPPORTED_VERSION``. Does nothing when CUDA is available.
    """
    global _applied
    _check_version()
    if _applied:
        return
    if torch.cuda.is_available():
        logger.info("CUDA is available; megatron CPU compatibility layer not applied")
        return
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.current_device = _cpu_current_device
    mc_random._CUDA_RNG_STATE_TRACKER = _make_tracker_class()()
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mc_random.model_parallel_cuda_manual_seed = _model_parallel_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = _model_parallel_manual_seed
    _applied = True
    logger.info("megatron-core %s CPU compatibility layer applied", SUPPORTED_VERSION)
