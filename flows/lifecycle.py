"""How a flow process starts and stops: signals as people send them, and no orphaned Prefect server.

- Ctrl-C in a terminal sends SIGINT to the whole process group; `kill`, `timeout`, systemd and Kubernetes
  send SIGTERM; closing the terminal or losing the ssh session sends SIGHUP; Ctrl-\\ sends SIGQUIT. Each
  becomes an :class:`Interrupted` (a ``KeyboardInterrupt``) in the flow, so the training unwinds through
  its context managers: the MLflow run is marked KILLED, the run folder's lock and the exchange folder are
  released, and the last checkpoint (written atomically) is kept. During training the
  exception is raised only at safe points (:func:`safe_points`): at once while clients compute or the
  server aggregates (nothing shared is being written then), otherwise when the round's checkpoint and
  tracking writes are done.
- Without ``PREFECT_API_URL``, Prefect runs flows against a temporary server it starts as a child process.
  That child is moved into its own session, so a terminal's Ctrl-C does not stop it under a flow that is
  still reporting to it, and it is told to die with its parent, so a ``kill -9`` leaves no server behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# every signal a terminal or a service manager sends to stop a process; each ends like Ctrl-C, exit 128 + number
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGQUIT: 131}
_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by `signum` (one of :data:`EXIT_CODES`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(stopped: BaseException) -> int:
    """The exit status for a flow stopped by `stopped`: an :class:`Interrupted`, Prefect's
    ``TerminationSignal`` (it carries ``signal``) or a plain ``KeyboardInterrupt`` (Ctrl-C)."""
    signum = stopped.signum if isinstance(stopped, Interrupted) else getattr(stopped, "signal", signal.SIGINT)
    return EXIT_CODES.get(signum, 128 + signum)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def interrupt_behind(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` that `exc` was raised while handling, if any. A signal can land inside
    library code whose own clean-up then fails (Prefect's task engine, stopped before its task run exists,
    raises ``ValueError: Task run is not set`` from its crash handler): that is still the interrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


@contextmanager
def interrupt_unmasked() -> Iterator[None]:
    """An error raised while handling an :class:`Interrupted` leaves the block as that interrupt."""
    try:
        yield
    except Exception as exc:
        if (interrupt := interrupt_behind(exc)) is None:
            raise
        raise interrupt from None


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT raise :class:`Interrupted` in the main thread while inside."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in EXIT_CODES}
    try:
        with interrupt_unmasked():
            yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class SafePoints:
    """Where an interrupt may land: see :func:`safe_points`."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.immediate = False

    def handle(self, signum: int, frame: Any) -> None:
        self.pending = signum
        if self.immediate:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block a signal may stop at any instruction; one that arrived before it stops it at the start."""
        self.check()
        self.immediate = True
        try:
            with interrupt_unmasked():
                yield
        finally:
            self.immediate = False
        self.check()


@contextmanager
def safe_points() -> Iterator[SafePoints]:
    """The stopping signals (:data:`EXIT_CODES`) raise :class:`Interrupted` inside ``interruptible()`` blocks,
    and otherwise at the next one's boundary — never in the middle of a checkpoint or a tracking-store write.
    Off the main thread (signals only reach that one) the blocks are plain."""
    points = SafePoints()
    if threading.current_thread() is not threading.main_thread():
        yield points
        return
    previous = {s: signal.signal(s, points.handle) for s in EXIT_CODES}
    try:
        yield points
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: its own session, and SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the session alone still keeps a terminal's Ctrl-C away from it
        pass


def detach_temporary_server() -> None:
    """Make Prefect's temporary server (started on first use when no ``PREFECT_API_URL`` is set) a child in
    its own session that dies with this process. Does nothing when a server is configured."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a configured server (environment or profile): nothing is started here
        return

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            real_popen = subprocess.Popen

            def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                return real_popen(*args, preexec_fn=_die_with_parent, **kwargs)

            subprocess.Popen = popen  # type: ignore[misc] - only for this one call
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real_popen  # type: ignore[misc]

    # Prefect keeps one temporary server per port key (None: "pick one"); registering ours under that
    # key first makes Prefect's own lookup return it
    SubprocessASGIServer._instances.pop(None, None)
    DetachedServer(None)
