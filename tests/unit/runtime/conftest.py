"""Fixtures shared by the runtime's unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tensor_reads(monkeypatch) -> list[str]:
    """The names of the tensors read from safetensors files (``safe_open(...).get_tensor``) from here on, in order:
    what a worker loading its modules of a pretrained folder reads."""
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    return read


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests, restored after: tiny models' many small calls (a denoising loop)
    run tens of times slower when two intra-op threads fight the machine's other processes for its cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
