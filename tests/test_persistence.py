"""Conversations are stored turn by turn and survive a killed server; users only see their own."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest

from fake_llm import last_user
from webrtc_client import Client

# A loopback-only test network: the server process must offer 127.0.0.1 candidates, as the test
# client does (the same patch as the loopback_ice fixture, applied in the child process).
LAUNCH = ("import aioice.ice; aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ['127.0.0.1']; "
          "from agent.cli import main; main(['serve'])")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    async with httpx.AsyncClient() as http, asyncio.timeout(60):
        while True:  # until it answers; each failed attempt is a refused connection, not a sleep
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz", timeout=1)).status_code == 200:
                    return proc
            except httpx.TransportError:
                await asyncio.sleep(0.1)  # poll interval while the child process boots


@pytest.fixture
def server_env(tmp_path, tiny_whisper_path, fake_llm, loopback_ice):
    port = free_port()
    env = {**os.environ, "PARLEY_PORT": str(port), "PARLEY_HOST": "127.0.0.1",
           "PARLEY_STT_MODEL": str(tiny_whisper_path), "PARLEY_STT_DEVICE": "cpu", "PARLEY_STT_MAX_NEW_TOKENS": "12",
           "PARLEY_LLM_BASE_URL": fake_llm.url, "PARLEY_LLM_API_KEY": "test", "PARLEY_TTS": "espeak",
           "PARLEY_DATABASE_URL": f"sqlite:///{tmp_path}/parley.db", "PARLEY_LOG_LEVEL": "warning",
           "PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    return env, port


async def test_a_killed_server_keeps_every_completed_turn_and_marks_the_session_interrupted(server_env, fake_llm):
    env, port = server_env
    url = f"http://127.0.0.1:{port}"
    token = "kill-test-user-token-0123456789abcdef"
    fake_llm.reply_for = lambda req: f"Reply to {last_user(req)}."
    proc = await start_server(env, port)
    c = Client(url, np.zeros(16000, np.float32), room="kill-room", options={"questions": 5}, user_token=token)
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        for text in ("first answer", "second answer"):
            mark = len(c.messages)
            c.send("send-text", {"content": text})
            # Until the reply has played out: answering earlier would (rightly) cut it off.
            await c.wait_for(lambda c, t=text: f"Reply to {t}." in c.bot_text())
            await c.wait_for(lambda c, m=mark: any(x["type"] == "bot-stopped-speaking" for x in c.messages[m:])
                             and any("Reply to" in x.get("data", {}).get("text", "") for x in c.messages[m:]))
        # The third reply never comes: the LLM stalls, and the server dies while it waits.
        fake_llm.behaviour.first_token_delay_s = 60
        c.send("send-text", {"content": "third answer"})
        await c.wait_for(lambda c: any(m["data"].get("text") == "third answer" for m in c.of("user-transcription")))
        await fake_llm.wait_requests(3, timeout=10)  # the server has asked for the third reply
        # Written when it completed, not at the end: the live session already shows the third answer.
        session_id = c.of("bot-ready")[0]["data"]["about"]["session_id"]
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http, \
                asyncio.timeout(10):
            while "third answer" not in [t["text"] for t in (await http.get(f"/api/sessions/{session_id}")).json()
                                         .get("transcript", [])]:
                await asyncio.sleep(0.01)  # poll interval: the write lands in another process
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        await c.close()
        if proc.poll() is None:
            proc.kill()
    fake_llm.behaviour.first_token_delay_s = 0
    proc = await start_server(env, port)
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            [item] = (await http.get("/api/sessions")).json()["items"]
            assert item["status"] == "interrupted" and item["room"] == "kill-room"
            session = (await http.get(f"/api/sessions/{item['id']}")).json()
        said = [(t["speaker"], t["text"]) for t in session["transcript"]]
        if said[0][0] == "agent":
            said = said[1:]  # the part of the greeting heard before the first answer cut it off
        assert said == [("user", "first answer"), ("agent", "Reply to first answer."),
                            ("user", "second answer"), ("agent", "Reply to second answer."),
                            ("user", "third answer")]  # only the reply in progress is lost
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def test_history_api_is_scoped_to_the_user_and_exports(parley_server):
    parley_server.llm.reply_for = lambda req: "Noted."
    mine, theirs = "token-of-alice-0123456789abcdef", "token-of-bob-0123456789abcdefgh"
    c = Client(parley_server.url, np.zeros(16000, np.float32), room="alice-room", user_token=mine)
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        session_id = c.of("bot-ready")[0]["data"]["about"]["session_id"]
        c.send("send-text", {"content": "My answer about databases."})
        await c.wait_for(lambda c: "Noted." in c.bot_text())
    finally:
        await c.close()
    room = parley_server.app_state.rooms.rooms["alice-room"]
    await room.recorder.close()  # flush (the room would on its own after the grace period)
    async with httpx.AsyncClient(base_url=parley_server.url) as http:
        assert (await http.get("/api/sessions")).status_code == 401
        alice = {"Authorization": f"Bearer {mine}"}
        bob = {"Authorization": f"Bearer {theirs}"}
        page = (await http.get("/api/sessions?limit=10", headers=alice)).json()
        assert page["total"] == 1 and page["items"][0]["id"] == session_id
        full = (await http.get(f"/api/sessions/{session_id}", headers=alice)).json()
        assert ("user", "My answer about databases.") in [(t["speaker"], t["text"]) for t in full["transcript"]]
        # Bob cannot tell Alice's session exists: the same 404 as for a made-up id.
        for sid in (session_id, "0" * 24):
            r = await http.get(f"/api/sessions/{sid}", headers=bob)
            assert r.status_code == 404 and r.json() == {"detail": f"no session {sid!r}"}
        assert (await http.get(f"/api/sessions/{session_id}/export?format=json", headers=bob)).status_code == 404
        assert (await http.get("/api/sessions", headers=bob)).json()["total"] == 0
        md = await http.get(f"/api/sessions/{session_id}/export?format=markdown", headers=alice)
        assert md.status_code == 200 and "attachment" in md.headers["content-disposition"]
        assert "**You:** My answer about databases." in md.text
        js = await http.get(f"/api/sessions/{session_id}/export?format=json", headers=alice)
        assert json.loads(js.text)["id"] == session_id
        assert (await http.get("/history")).status_code == 200
        assert (await http.get(f"/sessions/{session_id}")).status_code == 200


async def test_past_weaknesses_reach_the_next_interview_prompt(parley_server):
    store = parley_server.app_state.store
    token = "token-weak-0123456789abcdef0123"
    user = await store.user(token)
    sid = await store.start_session(user, "old", "interviewer", "interviewer", {"role": "data-scientist"})
    for missing in (["Quantify the impact."], ["Quantify the impact.", "Explain the baseline."]):
        await store.add_evaluation(sid, "feedback", {"question": "Q", "score": 5, "missing": missing})
    parley_server.llm.reply_for = lambda req: "Okay."
    c = Client(parley_server.url, np.zeros(16000, np.float32), options={"role": "data-scientist"}, user_token=token)
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        c.send("send-text", {"content": "Hello"})
        await c.wait_for(lambda c: "Okay." in c.bot_text())
        system = parley_server.llm.requests[-1]["messages"][0]["content"]
        assert "previous interviews" in system and "Quantify the impact." in system
        assert system.index("Quantify the impact.") < system.index("Explain the baseline.")  # most frequent first
    finally:
        await c.close()


async def test_recordings_are_opt_in_and_expire(parley_server, speech, tmp_path):
    from datetime import datetime, timedelta, timezone

    from agent.recorder import expire_audio

    parley_server.llm.reply_for = lambda req: "Thanks."
    store = parley_server.app_state.store
    results = {}
    for opted in (True, False):
        token = f"token-audio-{opted}-0123456789abcdef"
        c = Client(parley_server.url, speech("en_birch_canoe.wav"), room=f"audio-{opted}",
                   options={"record_audio": opted}, user_token=token)
        try:
            await c.connect()
            await c.wait_for(lambda c: any(m["data"]["final"] for m in c.of("user-transcription")))
        finally:
            await c.close()
        room = parley_server.app_state.rooms.rooms[f"audio-{opted}"]
        await room.recorder.close()
        user = await store.find_user(token)
        [item], _ = await store.list_sessions(user)
        results[opted] = (room.recorder.session_id, item)
    recorded = list((tmp_path / "audio").rglob("*.wav"))
    user = await store.find_user("token-audio-True-0123456789abcdef")
    before = await store.get_session(user, results[True][0])
    assert [t["has_audio"] for t in before["transcript"] if t["speaker"] == "user"] == [True]
    assert len(recorded) == 1 and recorded[0].parent.name == results[True][0]  # only the opted-in session
    assert recorded[0].stat().st_size > 16000  # about a second of 16-bit speech at least
    # Past the retention period the file and its reference go.
    assert await expire_audio(store, retention_days=1) == 0 and recorded[0].exists()
    assert await expire_audio(store, retention_days=1, now=datetime.now(timezone.utc) + timedelta(days=2)) == 1
    assert not recorded[0].exists()
    full = await store.get_session(await store.find_user("token-audio-True-0123456789abcdef"), results[True][0])
    assert not any(t["has_audio"] for t in full["transcript"])
