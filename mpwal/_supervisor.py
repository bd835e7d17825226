"""The writer's enactor supervisor: starts the enactor, restarts it when it dies, stops it.

The enactor runs as a thread of the writer (``"thread"``: it may be handed the writer's records
in memory), as a process the writer starts (``"process"``: it keeps its own interpreter lock),
or not at all (``"none"``: ``mpwal enactor PATH`` runs elsewhere). A dead one is restarted at
most five times a second; what killed it is kept in ``errors`` for ``Writer.stats()``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from ._enactor import Enactor, Handoff
from ._errors import storage_error

log = logging.getLogger("mpwal")
RESTART_DELAY = 0.2  # seconds between an enactor's start and its next restart
_PROCESS_CODE = ("import sys; from mpwal._enactor import run_process; "
                 "run_process(sys.argv[1], int(sys.argv[2]))")


class EnactorSupervisor:
    def __init__(self, path: str, mode: str, handoff: Handoff | None) -> None:
        self.path = path
        self.mode = mode
        self.handoff = handoff
        self.restarts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._started = 0.0
        self._enactor: Enactor | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def holding(self) -> bool:
        """Whether the enactor thread holds enactor.lock (so a log handed over now is whole)."""
        return self._enactor is not None and self._enactor.holding

    def start(self) -> None:
        """Start the enactor; StorageError if a process cannot be started."""
        self._started = time.monotonic()  # also when it fails: retried RESTART_DELAY later
        self._stop = threading.Event()
        if self.mode == "thread":
            e = Enactor(self.path, self._stop)
            e.detach_on_new_writer = False
            e.handoff = self.handoff
            self._enactor = e
            self._thread = threading.Thread(target=self._run_thread, args=(e,),
                                            name="mpwal-enactor", daemon=True)
            self._thread.start()
        elif self.mode == "process":
            env = dict(os.environ)  # the child imports this very mpwal, installed or not
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _PROCESS_CODE, self.path, str(os.getpid())],
                    stdin=subprocess.DEVNULL, close_fds=True, env=env)
            except OSError as e:
                raise storage_error(e, "starting the enactor process") from None

    def _run_thread(self, e: Enactor) -> None:
        try:
            e.run()
        except BaseException:
            self.errors.append(repr(e.error))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def supervise(self) -> None:
        """Restart an enactor that died (at most once per RESTART_DELAY)."""
        if time.monotonic() - self._started < RESTART_DELAY:
            return
        dead = ((self._thread is not None and not self._thread.is_alive())
                or (self._proc is not None and self._proc.poll() is not None))
        if not dead:
            return
        if self._proc is not None:
            self.errors.append(f"enactor process exited with {self._proc.returncode}")
        self.restarts += 1
        log.warning("restarting the enactor of %s", self.path)
        try:
            self.start()
        except OSError as e:  # (a StorageError) tried again at the next check
            self.errors.append(str(e))

    def stop(self) -> None:
        """Stop the enactor and wait for it (a process gets SIGTERM, then SIGKILL after 10 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
