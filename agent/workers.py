"""``parley serve --workers N``: several agent processes behind one address, on one host.

One Python process runs one event loop, and one event loop holds ~20 rooms before its bursts of work
delay voice frames (README, "Rooms per process"), however many cores the host has. With
``--workers N`` the ``parley serve`` process becomes a front (``signaling/front.py``) that owns the
public address and routes each room's signaling to one of N worker processes; each worker is a whole
``parley serve`` listening on a Unix socket in a private run directory. Media never passes through
the front: each worker's aiortc peers have their own UDP ports.

Speech recognition is shared, not duplicated: unless ``PARLEY_STT_WORKER`` names one already, the
front starts a ``parley stt-worker`` and every agent process sends it its audio, so the host holds
one Whisper model and batches all rooms' requests together.

Every child is supervised: one that exits is started again (with a back-off), its rooms are gone
(their sessions are marked interrupted by the restarted worker, which has the same instance name).
Children ask the kernel to stop them when the front is gone, so a killed front leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("parley.workers")

READY_TIMEOUT_S = 120.0  # loading a model on a cold cache can take this long
STOP_TIMEOUT_S = 15.0  # a worker closes its rooms and saves their sessions on SIGTERM


async def _accepts(path: str) -> bool:
    """Whether something listens on the Unix socket ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Child:
    """One supervised child process (an agent worker or the STT worker) listening on ``socket_path``."""

    def __init__(self, name: str, argv: list[str], socket_path: str, env: dict[str, str],
                 on_exit: Callable[[], None] | None = None):
        self.name, self.argv, self.socket_path, self.env = name, argv, socket_path, env
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def start(self, required: bool = True) -> None:
        """Start it and wait until it listens. If it exits or never does: raise, or (not
        ``required``) log it and keep starting it again in the background."""
        try:
            await self._spawn()
        except RuntimeError as e:
            if required:
                raise
            log.error("%s; the others start without it, and it is started again until it runs", e)
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env)
        waiter = asyncio.create_task(self.proc.wait())
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                # The child binds its socket only once its model and store are open: a readiness
                # probe, as an orchestrator would run one, answered within 50 ms of it listening.
                while not await _accepts(self.socket_path):
                    if waiter.done():
                        raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} while starting")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(f"{self.name} did not listen within {READY_TIMEOUT_S:.0f}s") from None
        finally:
            waiter.cancel()
        log.info("%s ready (pid %d)", self.name, self.proc.pid)

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            assert self.proc is not None
            status = await self.proc.wait()
            if self._stopping:
                return
            log.error("%s (pid %d) exited with status %s; starting it again in %.0fs", self.name,
                      self.proc.pid, status, backoff)
            if self.on_exit is not None:
                self.on_exit()
            await asyncio.sleep(backoff)  # a child that dies at start must not spin the host
            try:
                await self._spawn()
                self.restarts += 1
                backoff = 1.0
            except RuntimeError as e:
                log.error("%s", e)
                backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; waits for the process and its supervisor."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", self.name, STOP_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class WorkerPool:
    """The children of a front: an STT worker (unless one is configured) and N agent workers."""

    def __init__(self, settings, n: int, *, stt_worker: bool, on_worker_exit: Callable[[int], None],
                 worker_argv: Callable[[int, str], list[str]] | None = None):
        """``worker_argv(i, socket_path)``: the command of worker ``i`` (default: ``parley serve --uds``)."""
        self.run_dir = Path(tempfile.mkdtemp(prefix="parley-"))  # 0700: only this user reaches the sockets
        self.stt: Child | None = None
        self.workers: list[Child] = []
        env = {**os.environ, "PARLEY_PARENT_PID": str(os.getpid())}
        cli = [sys.executable, "-m", "agent.cli"]
        worker_argv = worker_argv or (lambda i, path: [*cli, "serve", "--uds", path])
        if stt_worker:
            path = str(self.run_dir / "stt.sock")
            self.stt = Child("stt-worker", [*cli, "stt-worker", "--socket", path], path, {**env, **_stt_env(settings)})
            env = {**env, "PARLEY_STT_WORKER": path}
        host = socket.gethostname()
        for i in range(n):
            path = str(self.run_dir / f"worker-{i}.sock")
            # Its own instance name: a restarted worker marks only its own cut-off sessions.
            wenv = {**env, "PARLEY_INSTANCE": f"{settings.instance or f'{host}:{settings.port}'}/{i}",
                    "PARLEY_MAX_ROOMS": str(max(1, -(-settings.max_rooms // n)))}
            self.workers.append(Child(f"worker {i}", worker_argv(i, path), path, wenv,
                                      on_exit=lambda i=i: on_worker_exit(i)))

    @property
    def sockets(self) -> list[str]:
        return [w.socket_path for w in self.workers]

    async def start(self) -> None:
        try:
            if self.stt is not None:
                # As in one process: a model that cannot load (no network for its first download,
                # a wrong path) leaves the conversations working without speech recognition.
                await self.stt.start(required=False)
            await asyncio.gather(*(w.start() for w in self.workers))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))
        if self.stt is not None:
            await self.stt.stop()
        for p in self.run_dir.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()



def serve_worker(app, socket_path: str, **uvicorn_options) -> None:
    """Run ``app`` as a worker of a front: on its private Unix socket, trusting the front's
    X-Forwarded-For (only the front can reach the socket) so per-address limits see the browser,
    and stopping when the front is gone."""
    import uvicorn

    die_with_parent()
    uvicorn.run(app, uds=socket_path, proxy_headers=True, forwarded_allow_ips="*", **uvicorn_options)


def _stt_env(settings) -> dict[str, str]:
    """The front's speech-recognition settings for its STT worker, however the front got them."""
    out = {}
    # Every stt_ setting, so that a new one cannot be forgotten here; stt_worker is the front's own.
    for name in type(settings).model_fields:
        if not name.startswith("stt_") or name == "stt_worker":
            continue
        value = getattr(settings, name)
        if value is not None:
            out[f"PARLEY_{name.upper()}"] = str(value)
    return out


def die_with_parent() -> None:
    """In a child of a front: have the kernel stop this process when the front is gone (killed,
    say), so no worker outlives it holding rooms nobody can reach. Linux only; elsewhere a front
    that is killed outright leaves its workers to be stopped by hand."""
    expected = os.environ.get("PARLEY_PARENT_PID")
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):  # the front died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
