"""SIGINT (Ctrl-C) and SIGTERM (what ``loom stop`` and most schedulers send) during ``loom run``.

:class:`StopSignals` installs one handler for both. The first signal while the driver trains asks it to stop
after the step in flight (``requested``); the driver then writes a final checkpoint when one is due and raises
:class:`RunStopped`. Outside training (planning, start-up), and at a second signal, the handler raises
:class:`RunStopped` at once. Either way the driver's cleanup runs and the CLI prints one line and exits with
``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the shell's convention.

Why the handler is installed again after Ray starts: ``ray.init`` installs its own SIGTERM handler in this process
(``sys.exit(15)`` from wherever the main thread is), with which a SIGTERM ended ``loom run`` in a C++ stack dump
and exit code 134.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BaseException):
    """The run was stopped by a signal; the message is one line, ``exit_code`` is 128 + the signal number.

    A BaseException, as KeyboardInterrupt is: raised from the handler inside any code, it must not be swallowed by a
    library's ``except Exception``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """The run's SIGINT/SIGTERM handler (see the module docstring). Only in the main thread (Python's rule);
    elsewhere ``install`` does nothing and the signals keep their handlers."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal received
        self.graceful = False  # True while a stop can wait for the step in flight
        self.shielded = False  # True during cleanup: a signal is only recorded, so that cleanup finishes
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Install (or re-install, after a library replaced it) the handler for SIGINT and SIGTERM."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            current = signal.getsignal(signum)
            if signum not in self._previous:
                self._previous[signum] = current
            if current != self._handle:
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put back the handlers found by the first ``install`` (a C-level one Python cannot restore: the default)."""
        for signum, previous in self._previous.items():
            if previous is None:  # installed outside Python: the default behaviour instead
                previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.requested is None
        if first:
            self.requested = signum
        if self.shielded or (first and self.graceful):
            return
        raise RunStopped(signum, f"stopped by {signal_name(signum)}")
