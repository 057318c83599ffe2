"""The STT engine as a separate process: `parley stt-worker` over a Unix socket, and RemoteSTT."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from pipeline.stt import STTUnavailable
from pipeline.stt_remote import RemoteSTT, _pack
from pipeline_setup import whisper

RECORDINGS = ["en_goforward.wav", "en_LDC93S1_timit.wav", "en_birch_canoe.wav", "fr_picovoice_cv.wav",
              "en_harvard_spk1_snt1.wav", "en_harvard_spk1_snt3.wav"]


@pytest.fixture
def socket_dir():
    d = tempfile.mkdtemp(prefix="parley-stt-", dir="/tmp")  # short: Unix socket paths are limited to ~100 bytes
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


async def start_worker(tiny_whisper_path, socket: Path) -> subprocess.Popen:
    """`parley stt-worker` with the suite's tiny Whisper and the options every test conversation uses."""
    env = {**os.environ, "PARLEY_STT_MODEL": str(tiny_whisper_path), "PARLEY_STT_DEVICE": "cpu",
           "PARLEY_STT_MAX_NEW_TOKENS": "12", "PARLEY_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "stt-worker", "--socket", str(socket)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 60)
    assert "ready" in line, line + (proc.stdout.read() if proc.poll() is not None else "")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_two_clients_share_one_worker_and_get_the_in_process_text(tiny_whisper_path, speech, socket_dir):
    socket = socket_dir / "stt.sock"
    proc = await start_worker(tiny_whisper_path, socket)
    a, b = RemoteSTT(str(socket)), RemoteSTT(str(socket))  # as two agent processes would
    try:
        await asyncio.wait_for(a.warm_up(), 30)
        audios = [speech(name) for name in RECORDINGS]
        langs = ["en", "en", "en", "fr", None, "en"]
        remote = await asyncio.wait_for(asyncio.gather(
            *[a.transcribe(x, final=True, language=lang) for x, lang in zip(audios, langs)],
            *[b.transcribe(x, final=True, language=lang, prompt="Python") for x, lang in zip(audios, langs)],
        ), 60)
        local_stt = whisper(tiny_whisper_path)  # the same options, in this process
        local = [await local_stt.transcribe(x, final=True, language=lang) for x, lang in zip(audios, langs)]
        local += [await local_stt.transcribe(x, final=True, language=lang, prompt="Python")
                  for x, lang in zip(audios, langs)]
        assert [r.text for r in remote] == [r.text for r in local]
        assert [r.language for r in remote] == [r.language for r in local]
        assert [r.no_speech_prob for r in remote] == [r.no_speech_prob for r in local]
        assert all(r.text for r in remote) and all(r.decode_ms > 0 for r in remote)
        assert a.queue_depth == 0 and b.queue_depth == 0

        # Silence is answered locally, like the in-process engine does.
        quiet = await a.transcribe(np.zeros(16000, np.float32), final=True, language="en")
        assert quiet.text == "" and quiet.decode_ms == 0

        # A request the engine rejects fails alone; the connection keeps working.
        with pytest.raises(RuntimeError, match="not a valid language code"):
            await a.transcribe(audios[0], final=True, language="xx")
        assert (await a.transcribe(audios[0], final=True, language="en")).text == remote[0].text

        # A cancelled request is cancelled in the worker too; the client carries on.
        task = asyncio.create_task(b.transcribe(audios[2], final=True, language="en"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await b.transcribe(audios[1], final=False, language="en")).text == remote[1].text
    finally:
        await a.aclose()
        await b.aclose()
        stop(proc)
    assert proc.returncode == 0  # SIGTERM: a clean stop
    assert not socket.exists()


async def test_worker_down_is_a_clear_error_and_the_client_reconnects(tiny_whisper_path, speech, socket_dir):
    socket = socket_dir / "stt.sock"
    client = RemoteSTT(str(socket), connect_timeout_s=2)
    audio = speech("en_goforward.wav")
    with pytest.raises(STTUnavailable, match="not reachable.*parley stt-worker --socket"):
        await client.transcribe(audio, final=True, language="en")

    proc = await start_worker(tiny_whisper_path, socket)
    try:
        first = await asyncio.wait_for(client.transcribe(audio, final=True, language="en"), 30)
        assert first.text
        proc.kill()  # the worker dies: no clean shutdown, the socket file is left behind
        proc.wait(10)
        with pytest.raises(STTUnavailable):
            await asyncio.wait_for(client.transcribe(audio, final=True, language="en"), 10)
        proc = await start_worker(tiny_whisper_path, socket)  # it removes the stale socket file
        again = await asyncio.wait_for(client.transcribe(audio, final=True, language="en"), 30)
        assert again.text == first.text
    finally:
        await client.aclose()
        stop(proc)


async def test_worker_drops_a_client_that_sends_garbage_and_serves_the_others(tiny_whisper_path, speech, socket_dir):
    socket = socket_dir / "stt.sock"
    proc = await start_worker(tiny_whisper_path, socket)
    good = RemoteSTT(str(socket))
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(b"\xff\xff\xff\xffnonsense")  # a 4 GiB header
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # hung up on
        writer.close()
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(_pack({"op": "format-disk", "id": 1}))
        await writer.drain()
        assert b"unknown request" in await asyncio.wait_for(reader.read(200), 10)
        writer.close()
        assert (await asyncio.wait_for(good.transcribe(speech("en_goforward.wav"), final=True, language="en"), 30)).text
    finally:
        await good.aclose()
        stop(proc)


def test_worker_start_removes_only_a_dead_socket(socket_dir):
    import socket as sockets

    from pipeline.stt_remote import _remove_stale_socket

    path = socket_dir / "stt.sock"
    path.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        _remove_stale_socket(str(path))
    assert path.read_text() == "not a socket"  # a mistyped path never deletes a file
    path.unlink()
    live = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(RuntimeError, match="already listening"):
            _remove_stale_socket(str(path))
    finally:
        live.close()
    _remove_stale_socket(str(path))  # bound by nobody now: a dead worker's leftover
    assert not path.exists()


async def test_urgency_travels_to_the_worker_engine(tiny_whisper_path, speech, socket_dir):
    """A pause's transcript asked for through the socket is urgent in the worker's engine too: with
    every partial stale at once, the urgent one is still decoded, the plain one dropped."""
    from pipeline.stt import WhisperOptions, WhisperSTT
    from pipeline.stt_remote import STTWorker

    engine = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12,
                                       partial_deadline_s=0.0))
    worker = STTWorker(engine, str(socket_dir / "stt.sock"))
    await worker.start()
    client = RemoteSTT(str(socket_dir / "stt.sock"))
    try:
        await client.warm_up()
        audio = speech("en_goforward.wav")
        assert await client.transcribe(audio, final=False, language="en") is None
        assert (await client.transcribe(audio, final=False, language="en", urgent=True)).text
    finally:
        await client.aclose()
        await worker.close()
        engine.close()
