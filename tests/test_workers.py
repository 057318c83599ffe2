"""``parley serve --workers 2``: a real front process, two agent worker processes and one shared STT
worker, driven through the front's one address by real aiortc peers."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from webrtc_client import Client

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="waits on other processes with pidfd (Linux)")


class Front:
    """The ``parley serve --workers 2`` process, its log read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str):
        self.proc, self.url = proc, url
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            async for raw in self.proc.stderr:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._changed.set()
        finally:
            await self.proc.wait()
            self._changed.set()  # the end of the log is news too

    async def wait_log(self, text: str, start: int = 0, timeout: float = 90.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[start:]:
                    if text in line:
                        return line
                if self._reader.done():
                    raise AssertionError(f"the front exited ({self.proc.returncode}):\n" + "\n".join(self.lines[-30:]))
                self._changed.clear()
                await self._changed.wait()

    async def health(self) -> dict:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{self.url}/healthz")
        return r.json()


async def gone(pid: int, timeout: float = 20.0) -> None:
    """Wait until process ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, exited.set)
        try:
            await asyncio.wait_for(exited.wait(), timeout)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def front_process(tiny_whisper_path, fake_llm, tmp_path, **env_overrides):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PARLEY_STT_MODEL": str(tiny_whisper_path), "PARLEY_STT_DEVICE": "cpu",
           "PARLEY_STT_MAX_NEW_TOKENS": "12", "PARLEY_LLM_BASE_URL": fake_llm.url, "PARLEY_LLM_API_KEY": "test",
           "PARLEY_LLM_MODEL": "test-model", "PARLEY_TTS": "espeak", "PARLEY_ROOM_GRACE_S": "1",
           "PARLEY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/parley.db",
           "PARLEY_AUDIO_DIR": str(tmp_path / "audio"), "PARLEY_LOG_LEVEL": "info", **env_overrides}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent.cli", "serve", "--workers", "2",
                                                "--port", str(port), cwd=ROOT, env=env,
                                                stderr=asyncio.subprocess.PIPE)
    front = Front(proc, f"http://127.0.0.1:{port}")
    try:
        await front.wait_log("front ready: 2 agent workers, one shared STT worker")
        await front.wait_log("Uvicorn running on")
        yield front
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(front._reader, return_exceptions=True)


async def test_two_worker_processes_serve_rooms_behind_one_address(tiny_whisper_path, fake_llm, tmp_path, speech):
    fake_llm.script = ["Good answer. Tell me more."] * 4
    async with front_process(tiny_whisper_path, fake_llm, tmp_path) as front:
        health = await front.health()
        assert health["status"] == "ok" and [w["status"] for w in health["workers"]] == ["ok", "ok"]
        pids = [w["pid"] for w in health["workers"]]
        assert len(set(pids)) == 2 and front.proc.pid not in pids

        # Two browsers opening one room at the same moment reach the same worker: one room exists.
        c1, c2 = (Client(front.url, speech("en_goforward.wav"), room="room-c") for _ in range(2))
        await asyncio.gather(c1.connect(), c2.connect(), return_exceptions=True)
        assert sorted(w["rooms"] for w in (await front.health())["workers"]) == [0, 1]

        a = Client(front.url, speech("en_birch_canoe.wav"), room="room-a")
        b = Client(front.url, speech("en_goforward.wav"), room="room-b")
        try:
            await a.connect()
            await b.connect()
            # Placed on the least loaded worker: room-a beside nothing, room-b on either.
            assert sorted(w["rooms"] for w in (await front.health())["workers"]) == [1, 2]
            # A whole turn through the front: media straight to the worker, signaling routed.
            for c in (a, b):
                await c.wait_for(lambda c: any(m["data"]["final"] for m in c.of("user-transcription")), 60)
                await c.wait_for(lambda c: "Tell me more." in c.bot_text(), 60)
            async with httpx.AsyncClient(base_url=front.url, timeout=10) as http:
                for c in (a, b):  # each room answered by the worker that holds it, every time
                    for _ in range(3):
                        r = await http.get(f"/api/rooms/{c.room}")
                        assert r.status_code == 200 and r.json()["room"] == c.room
                        assert "user" in [m["role"] for m in r.json()["history"]]
                    r = await http.patch("/api/offer", json={"pc_id": c.pc_id, "candidates": []})
                    assert r.status_code == 200
                assert (await http.get("/api/rooms/nowhere")).status_code == 404
                metrics = (await http.get("/metrics")).text
                assert 'worker="0"' in metrics and 'worker="1"' in metrics
                assert metrics.count("# TYPE parley_active_rooms ") == 1
                assert (await http.post("/api/offer", content=b"x" * (65 * 1024))).status_code == 413
                assert (await http.get("/")).status_code == 200  # pages come through too
        finally:
            await asyncio.gather(a.close(), b.close(), c1.close(), c2.close())

        # A worker that dies is started again; the other one never stopped serving.
        line_no = len(front.lines)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        await front.wait_log("worker 0 ready", start=line_no, timeout=60)
        health = await front.health()
        assert health["status"] == "ok" and health["workers"][0]["pid"] != victim
        assert health["workers"][1]["pid"] == pids[1]
        async with httpx.AsyncClient(base_url=front.url, timeout=10) as http:
            metrics = (await http.get("/metrics")).text
        assert 'parley_process_restarts_total{process="worker 0"} 1.0' in metrics
        assert 'parley_process_restarts_total{process="worker 1"} 0.0' in metrics

        # Killed outright, the front leaves no process behind.
        children = [w["pid"] for w in health["workers"]]
        front.proc.send_signal(signal.SIGKILL)
        await front.proc.wait()
        for pid in children:
            await gone(pid)


async def test_the_front_stops_its_workers_and_they_save_their_sessions(tiny_whisper_path, fake_llm, tmp_path, speech):
    fake_llm.script = ["Good answer. Tell me more."] * 2
    async with front_process(tiny_whisper_path, fake_llm, tmp_path) as front:
        pids = [w["pid"] for w in (await front.health())["workers"]]
        c = Client(front.url, speech("en_birch_canoe.wav"), room="kept")
        try:
            await c.connect()
            await c.wait_for(lambda c: "Tell me more." in c.bot_text(), 60)
            line_no = len(front.lines)
            front.proc.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down gracefully: -15 is a clean exit.
            assert await asyncio.wait_for(front.proc.wait(), 60) in (0, -signal.SIGTERM)
            await front.wait_log("Application shutdown complete", start=line_no)
        finally:
            await c.close()
        for pid in pids:
            await gone(pid)
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "parley.db")) as db:
        [(session_id, status)] = db.execute("SELECT id, status FROM sessions WHERE room = 'kept'").fetchall()
        speakers = [r[0] for r in db.execute("SELECT speaker FROM turns WHERE session_id = ? ORDER BY seq",
                                             (session_id,))]
    assert status in ("completed", "interrupted")  # closed by its worker, not left active
    assert "user" in speakers and "agent" in speakers


async def test_a_model_that_cannot_load_leaves_the_workers_serving_typed_conversations(fake_llm, tmp_path):
    """As one process does: no speech recognition, but the page works and the STT worker is retried."""
    fake_llm.reply_for = lambda req: "You typed it."
    missing = tmp_path / "no-such-model"
    async with front_process(missing, fake_llm, tmp_path) as front:
        await front.wait_log("stt-worker exited")
        health = await front.health()
        assert health["status"] == "ok" and [w["status"] for w in health["workers"]] == ["ok", "ok"]
        c = Client(front.url, np.zeros(16000, np.float32), room="typed")
        try:
            await c.connect()
            await c.wait_for(lambda c: c.of("bot-ready"), 30)
            c.send("send-text", {"content": "hello there", "options": {}})
            await c.wait_for(lambda c: "You typed it." in c.bot_text(), 30)
        finally:
            await c.close()


def test_merged_metrics_keep_each_family_once_with_its_type_and_a_worker_label():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from signaling.front import merge_metrics

    texts = {}
    for worker in (0, 1):
        registry = CollectorRegistry()
        Counter("parley_errors", "Errors", ["stage"], registry=registry).labels("stt").inc(worker + 1)
        Gauge("parley_active_rooms", "Rooms", registry=registry).set(3 + worker)
        texts[worker] = generate_latest(registry).decode()
    merged = merge_metrics(texts)
    assert merged.count("# TYPE parley_errors_total counter") == 1
    assert merged.count("# TYPE parley_active_rooms gauge") == 1
    samples = {(s.name, s.labels.get("worker")): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    assert samples[("parley_errors_total", "0")] == 1 and samples[("parley_errors_total", "1")] == 2
    assert samples[("parley_active_rooms", "0")] == 3 and samples[("parley_active_rooms", "1")] == 4


def test_the_stt_worker_gets_every_speech_recognition_setting_of_the_front():
    from pydantic import ValidationError

    from agent.config import Settings
    from agent.workers import _stt_env

    from agent.engines import whisper_options

    settings = Settings(_env_file=None, stt_model="tiny", stt_encoder_window="audio", stt_batch_size=4,
                        stt_cpu_threads=1, stt_worker="/run/x.sock")
    options = whisper_options(settings)  # what the worker (or this process) builds its engine from
    assert (options.encoder_window, options.cpu_threads, options.batch_size) == ("audio", 1, 4)
    env = _stt_env(settings)
    assert env["PARLEY_STT_MODEL"] == "tiny" and env["PARLEY_STT_BATCH_SIZE"] == "4"
    assert env["PARLEY_STT_ENCODER_WINDOW"] == "audio" and env["PARLEY_STT_CPU_THREADS"] == "1"
    assert "PARLEY_STT_WORKER" not in env  # the socket is the front's to hand out, not a setting to copy
    # ...and the worker reads them back as the same settings.
    assert Settings(_env_file=None, **{k.removeprefix("PARLEY_").lower(): v for k, v in env.items()}) \
        .stt_encoder_window == "audio"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, stt_encoder_window="short")
