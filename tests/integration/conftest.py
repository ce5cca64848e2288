"""Fixtures of the integration tests: run_world's ranks fork from a preloaded server (_worlds.py says why)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from _worlds import start_world  # tests/integration/_worlds.py


@pytest.fixture(scope="session", autouse=True)
def forked_worlds():
    """For the session, runtime.local_world.run_world starts its ranks with start_world instead of mp.spawn: the same
    worker function and arguments, one new process per rank, without each re-importing the runtime."""
    import runtime.local_world

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime.local_world, "mp", SimpleNamespace(spawn=start_world))
        yield
