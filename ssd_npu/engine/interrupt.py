"""SIGINT / SIGTERM as a request to stop after the current step (then checkpoint and exit).

A second SIGINT while a stop is pending abandons the step at once (KeyboardInterrupt), for
a user who does not want to wait; the newest complete checkpoint is still intact, because
checkpoints are only ever renamed into place whole.
"""

from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """Context manager: `requested()` turns True after SIGINT or SIGTERM; `signum` says which."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: do not wait for the step
        self.signum = signum
        print(
            f"\nssd-npu: {signal.Signals(signum).name} received; stopping after this step "
            "and writing a checkpoint (Ctrl-C again to abandon the step).",
            flush=True,
        )

    def __enter__(self) -> StopOnSignal:
        # Signal handlers can only be installed from the main thread (not under e.g. a
        # threaded test runner); elsewhere this is a no-op and signals act as usual.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
