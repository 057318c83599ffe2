"""The STT engine as a separate worker process, shared by several agent processes on one host.

``parley stt-worker --socket PATH`` runs one ``WhisperSTT`` (one model, one batching queue) and
serves it over a Unix domain socket; ``RemoteSTT`` is the client, with the same ``transcribe`` as
the in-process engine. The GPU then holds one model however many agent processes use it, and
their requests are batched together.

Wire format, both ways: a 4-byte big-endian length, a UTF-8 JSON header of that length, then
``header["bytes"]`` bytes of payload (float32 little-endian PCM, 16 kHz mono; absent when 0).

    client -> worker   {"op": "transcribe", "id": 7, "final": true, "language": "en", "prompt": null,
                        "urgent": false, "bytes": N}
                       {"op": "cancel", "id": 7}        the caller gave up: skip what of it has not started
                       {"op": "warm_up", "id": 8}       load the model; answered when loaded
    worker -> client   {"id": 7, "ok": true, "result": {...STTResult...} | null}    null: a dropped partial
                       {"id": 7, "ok": false, "error": "..."}

Requests on one connection are answered as they finish, not in order.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import fields

import numpy as np

from .audio import rms_dbfs
from .frames import PIPELINE_RATE
from .stt import STTResult, STTUnavailable, WhisperOptions, WhisperSTT

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 60 * PIPELINE_RATE * 4  # 60 s of float32: twice the longest segment the VAD makes
_RESULT_FIELDS = [f.name for f in fields(STTResult)]


async def _read_message(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_HEADER:
        raise ValueError(f"header of {n} bytes is too large")
    header = json.loads(await reader.readexactly(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    size = int(header.get("bytes") or 0)
    if not 0 <= size <= MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes is too large")
    return header, (await reader.readexactly(size) if size else b"")


def _pack(header: dict, payload: bytes = b"") -> bytes:
    header = {**header, "bytes": len(payload)}
    data = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data + payload


# ---------------------------------------------------------------------- the worker


class STTWorker:
    """Serves one engine to every process that connects to ``socket_path``."""

    def __init__(self, engine: WhisperSTT, socket_path: str):
        self.engine = engine
        self.socket_path = socket_path
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        _remove_stale_socket(self.socket_path)
        self._server = await asyncio.start_unix_server(self._serve_connection, path=self.socket_path)
        log.info("STT worker listening on %s", self.socket_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        self._connections.add(me)
        jobs: dict[int, asyncio.Task] = {}
        lock = asyncio.Lock()

        async def reply(message: dict) -> None:
            async with lock:
                writer.write(_pack(message))
                await writer.drain()

        async def run(rid: int, header: dict, payload: bytes) -> None:
            try:
                if header["op"] == "warm_up":
                    await self.engine.warm_up()
                    message = {"id": rid, "ok": True, "result": None}
                else:
                    audio = np.frombuffer(payload, dtype="<f4")
                    result = await self.engine.transcribe(audio, final=bool(header.get("final")),
                                                          language=header.get("language"), prompt=header.get("prompt"),
                                                          urgent=bool(header.get("urgent")))
                    message = {"id": rid, "ok": True,
                               "result": None if result is None else {k: getattr(result, k) for k in _RESULT_FIELDS}}
            except asyncio.CancelledError:
                return  # the client cancelled it or left: nobody to answer
            except Exception as e:
                message = {"id": rid, "ok": False, "error": str(e) or type(e).__name__}
            finally:
                jobs.pop(rid, None)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await reply(message)

        try:
            while True:
                try:
                    header, payload = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                op, rid = header.get("op"), header.get("id")
                if op == "cancel":
                    if (job := jobs.get(rid)) is not None:
                        job.cancel()
                elif op in ("transcribe", "warm_up") and isinstance(rid, int):
                    jobs[rid] = asyncio.create_task(run(rid, header, payload))
                else:
                    await reply({"id": rid, "ok": False, "error": f"unknown request {op!r}"})
        except (ValueError, json.JSONDecodeError) as e:
            log.warning("STT worker: dropping a client that sent a malformed message: %s", e)
        except ConnectionError:
            pass  # the client left
        finally:
            for job in list(jobs.values()):
                job.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
            self._connections.discard(me)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a worker that died is removed; one that still answers is not ours."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise RuntimeError(f"another STT worker is already listening on {path}")


async def serve(socket_path: str, options: WhisperOptions, *, ready: asyncio.Event | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (or cancellation). The model is loaded before listening."""
    engine = WhisperSTT(options)
    await engine.warm_up()
    worker = STTWorker(engine, socket_path)
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    print(f"parley stt-worker ready on {socket_path}", flush=True)
    try:
        await stop.wait()
    finally:
        await worker.close()
        engine.close()


# ---------------------------------------------------------------------- the client


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str):
        self.reader, self.writer, self.path = reader, writer, path
        self.pending: dict[int, asyncio.Future] = {}
        self.alive = True
        self.reader_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        error: Exception = STTUnavailable(f"STT worker at {self.path} closed the connection")
        try:
            while True:
                header, _ = await _read_message(self.reader)
                fut = self.pending.pop(header.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(header)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, json.JSONDecodeError) as e:
            if not isinstance(e, asyncio.IncompleteReadError):
                error = STTUnavailable(f"STT worker at {self.path}: connection failed: {e}")
        finally:
            self.alive = False
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self.pending.clear()
            self.writer.close()

    def send(self, header: dict, payload: bytes = b"") -> None:
        if not self.alive or self.writer.is_closing():
            raise STTUnavailable(f"STT worker at {self.path} closed the connection")
        self.writer.write(_pack(header, payload))

    async def close(self) -> None:
        self.alive = False
        self.writer.close()
        self.reader_task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.reader_task, 2)


class RemoteSTT:
    """``STT`` served by a ``parley stt-worker`` process over a Unix socket.

    Connects on first use and again after the worker restarts; one connection per event loop.
    A request fails with ``STTUnavailable`` when the worker cannot be reached or drops the
    connection, and a final with ``TimeoutError`` after ``timeout_s``; a partial that times out is
    treated as dropped (None).
    """

    def __init__(self, socket_path: str, *, timeout_s: float = 30.0, partial_timeout_s: float = 5.0,
                 connect_timeout_s: float = 5.0, warm_up_timeout_s: float = 600.0,
                 min_audio_s: float = WhisperOptions.min_audio_s, silence_dbfs: float = WhisperOptions.silence_dbfs):
        self.socket_path = socket_path
        self.timeout_s, self.partial_timeout_s = timeout_s, partial_timeout_s
        self.connect_timeout_s, self.warm_up_timeout_s = connect_timeout_s, warm_up_timeout_s
        self.min_audio_s, self.silence_dbfs = min_audio_s, silence_dbfs
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._ids = 0
        self._in_flight = 0

    @property
    def queue_depth(self) -> int:
        """Requests this client is waiting on (the worker's queue is shared with other processes)."""
        return self._in_flight

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test, a restarted server): start afresh
            self._loop, self._conn, self._lock = loop, None, asyncio.Lock()
        async with self._lock:
            if self._conn is None or not self._conn.alive:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path),
                                                            self.connect_timeout_s)
                except (OSError, asyncio.TimeoutError) as e:
                    raise STTUnavailable(
                        f"STT worker not reachable at {self.socket_path} ({e or type(e).__name__}); "
                        f"is `parley stt-worker --socket {self.socket_path}` running?") from e
                self._conn = _Connection(reader, writer, self.socket_path)
            return self._conn

    async def _call(self, header: dict, payload: bytes, timeout: float) -> dict:
        conn = await self._connection()
        self._ids += 1
        rid = self._ids
        fut = asyncio.get_running_loop().create_future()
        conn.pending[rid] = fut
        self._in_flight += 1
        try:
            conn.send({**header, "id": rid}, payload)
            return await asyncio.wait_for(fut, timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if conn.pending.pop(rid, None) is not None and conn.alive:
                with contextlib.suppress(Exception):
                    conn.send({"op": "cancel", "id": rid})  # free its place in the worker's queue
            raise
        finally:
            self._in_flight -= 1
            conn.pending.pop(rid, None)

    async def warm_up(self) -> None:
        """Connect and have the worker load its model (it usually has already)."""
        reply = await self._call({"op": "warm_up"}, b"", self.warm_up_timeout_s)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error") or "STT worker failed to load its model")

    async def transcribe(
        self, audio: np.ndarray, *, final: bool, language: str | None = None, prompt: str | None = None,
        urgent: bool = False,
    ) -> STTResult | None:
        duration = len(audio) / PIPELINE_RATE
        if duration < self.min_audio_s or rms_dbfs(audio) < self.silence_dbfs:
            return STTResult("", language, 1.0, 0.0, duration, 0.0)  # as the engine would, without the trip
        pcm = np.ascontiguousarray(audio, dtype="<f4").tobytes()
        header = {"op": "transcribe", "final": final, "language": language, "prompt": prompt, "urgent": urgent}
        t0 = time.monotonic()
        try:
            reply = await self._call(header, pcm, self.timeout_s if final or urgent else self.partial_timeout_s)
        except asyncio.TimeoutError:
            if not (final or urgent):
                return None
            raise TimeoutError(f"STT worker at {self.socket_path} gave no transcript in "
                               f"{time.monotonic() - t0:.0f} s") from None
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error") or "STT worker failed")
        r = reply.get("result")
        return None if r is None else STTResult(**{k: r[k] for k in _RESULT_FIELDS})

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._loop is asyncio.get_running_loop():
            await conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.alive = False
            with contextlib.suppress(Exception):
                conn.writer.close()
            with contextlib.suppress(Exception):
                conn.reader_task.cancel()
