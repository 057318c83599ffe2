"""One room's fault, injected on a real server with two rooms live: the faulty room tells its client
and keeps what was said; the other room does not notice.

Each fault has a defined behaviour:
- LLM error, hang or stalled stream: the client is told (an ``error``, or the interviewer's notice
  that it goes on from its question bank), something is still said, the next turn works.
- TTS failing mid-sentence: an ``error`` message, the reply's text still reaches the page.
- STT failing: an ``error`` message, the room keeps listening (and typing works).
- A peer that vanishes without closing: noticed within ``peer_media_timeout_s``; after the grace
  period the room closes and its session is saved.
- ICE that never completes: the connection is dropped after ``connect_timeout_s``.
- A browser that reconnects: the same conversation continues.
"""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from conftest import running_server
from fake_llm import Behaviour, last_user
from pipeline.tts import TTSChunk
from webrtc_client import Client

VICTIM, BYSTANDER = "v" * 43, "b" * 43
FAULT = "Please trigger the fault now."


@pytest.fixture
async def server(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, llm_first_token_timeout_s=1.5,
                              llm_token_timeout_s=1.0, room_grace_s=1.0, peer_media_timeout_s=2.0,
                              connect_timeout_s=2.0) as s:
        yield s


async def open_room(server, speech, token: str, room: str, greeted: bool = True) -> Client:
    # A quiet microphone until a test speaks into it: typed turns stay the only turns.
    client = Client(server.url, np.zeros(1600, np.float32), room=room, user_token=token)
    await client.connect()
    await client.wait_for(lambda c: c.of("bot-ready"))
    if greeted:
        await client.wait_for(lambda c: c.of("bot-started-speaking"))  # the greeting, cut short by the first turn
    return client


async def turn(client: Client, text: str) -> str:
    """Types ``text`` and returns the agent's reply to it (the scripted replies end in "What else?")."""
    shown = len(client.of("bot-output"))

    def reply(c: Client) -> str | None:
        said = " ".join(m["data"]["text"] for m in c.of("bot-output")[shown:])
        return said if said.endswith("What else?") else None

    client.send("send-text", {"content": text})
    return await client.wait_for(reply, timeout=30)


async def saved_turns(server, token: str, room: str) -> list[str]:
    """The stored transcript of ``room``'s session, read back through the history API."""
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        items = (await http.get("/api/sessions")).json()["items"]
        (sid,) = [s["id"] for s in items if s["room"] == room]
        session = (await http.get(f"/api/sessions/{sid}")).json()
    return [t["text"] for t in session["transcript"]]


async def close_and_wait(server, client: Client) -> None:
    room = server.app_state.rooms.rooms[client.room]
    await client.close()
    await asyncio.wait_for(room.closed.wait(), 20)


def problems(client: Client) -> list[dict]:
    """What the client was told went wrong: RTVI errors, and the persona's notices (an interviewer
    whose LLM fails says so and goes on with its question bank)."""
    return [m for m in client.messages if m.get("type") == "error"
            or (m.get("type") == "server-message" and m.get("data", {}).get("type") == "notice")]


def fault_only_for_victim(behaviour: Behaviour):
    return lambda body: behaviour if FAULT in last_user(body) else None


class FailingTTS:
    """The server's TTS for one room, failing after the first chunk of the sentence that holds ``word``."""

    def __init__(self, inner, word: str):
        self.inner, self.word, self.name = inner, word, "failing"

    async def synthesize(self, text, language, voice=None):
        from pipeline.tts import TTSError

        async for chunk in self.inner.synthesize(text, language, voice):
            yield chunk
            if self.word in text:
                raise TTSError("the speech service dropped the connection")


class FailingSTT:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def transcribe(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("fault", ["llm-500", "llm-hang", "llm-stalls-mid-stream", "tts-mid-sentence", "stt-raises"])
async def test_one_rooms_fault_is_reported_there_and_the_other_room_never_notices(fault, server, speech):
    llm = server.llm
    llm.reply_for = lambda body: f"Noted: {last_user(body)[:40]}. What else?"
    victim = await open_room(server, speech, VICTIM, "victim")
    bystander = await open_room(server, speech, BYSTANDER, "bystander")
    try:
        assert "Noted: My first answer" in await turn(victim, "My first answer is about billing.")
        room = server.app_state.rooms.rooms["victim"]
        match fault:
            case "llm-500":
                llm.behaviour_for = fault_only_for_victim(Behaviour(status=500))
            case "llm-hang":
                llm.behaviour_for = fault_only_for_victim(Behaviour(hang=True))
            case "llm-stalls-mid-stream":
                llm.behaviour_for = fault_only_for_victim(Behaviour(reply="I was saying that the", token_delay_s=30))
            case "tts-mid-sentence":
                room.conversation.tts = FailingTTS(room.conversation.tts, "Noted")
            case "stt-raises":
                room.conversation.stt = FailingSTT(room.conversation.stt)
        errors_before = len(problems(victim))
        if fault == "stt-raises":
            victim.mic.play(speech("en_birch_canoe.wav"))
        else:
            victim.send("send-text", {"content": FAULT})
        # Meanwhile the other room has a whole ordinary turn.
        assert "Noted: How is the bystander" in await turn(bystander, "How is the bystander doing?")
        reported = await victim.wait_for(lambda c: problems(c)[errors_before:], timeout=30)
        assert reported[0]["data"].get("error") or reported[0]["data"].get("text")
        assert reported[0]["data"].get("fatal") is not True
        assert not problems(bystander)

        # The faulty room recovers: the fault is gone and the next turn is answered.
        llm.behaviour_for = None
        room.conversation.tts = server.app_state.engines.tts
        room.conversation.stt = server.app_state.engines.stt
        await victim.wait_for(lambda c: room.conversation.state.value == "listening" and c)
        assert "Noted: Back to normal" in await turn(victim, "Back to normal now?")
    finally:
        await close_and_wait(server, victim)
        await close_and_wait(server, bystander)
    said = await saved_turns(server, VICTIM, "victim")
    assert "My first answer is about billing." in said and "Back to normal now?" in said
    assert any(t.startswith("Noted: My first answer") for t in said)
    assert "How is the bystander doing?" in await saved_turns(server, BYSTANDER, "bystander")
    assert server.app_state.rooms.rooms == {}


async def test_a_peer_that_vanishes_mid_sentence_is_noticed_and_its_session_saved(server, speech):
    server.llm.reply_for = lambda body: f"Noted: {last_user(body)[:40]}. What else?"
    victim = await open_room(server, speech, VICTIM, "victim")
    bystander = await open_room(server, speech, BYSTANDER, "bystander")
    try:
        await turn(victim, "My first answer is about billing.")
        room = server.app_state.rooms.rooms["victim"]
        victim.mic.play(speech("en_birch_canoe.wav")[:16000])  # a second of speech, then gone
        await victim.wait_for(lambda c: c.of("user-started-speaking"))
        # Gone without a word, like a laptop lid closing: its packets stop and nothing is closed
        # (no DTLS alert, no SCTP abort, no ICE consent answers).
        ice = victim.pc.getTransceivers()[0].sender.transport.transport._connection
        for protocol in ice._protocols:
            protocol.transport.sendto = lambda *args, **kwargs: None
        await asyncio.wait_for(room.closed.wait(), 20)
        assert server.app_state.rooms.rooms.keys() == {"bystander"}
        assert await turn(bystander, "Still there?")
    finally:
        await victim.close()
        await close_and_wait(server, bystander)
    said = await saved_turns(server, VICTIM, "victim")
    assert "My first answer is about billing." in said and any(t.startswith("Noted: My first") for t in said)


async def test_ice_that_never_completes_is_dropped_and_a_reconnecting_browser_keeps_its_conversation(server, speech):
    server.llm.reply_for = lambda body: f"Noted: {last_user(body)[:40]}. What else?"
    bystander = await open_room(server, speech, BYSTANDER, "bystander")
    try:
        # An offer whose client then never answers ICE: its own connection is closed at once.
        ghost = Client(server.url, np.zeros(1600, np.float32), room="ghost", user_token=VICTIM)
        await ghost.connect()
        ghost_room = server.app_state.rooms.rooms["ghost"]
        await ghost.pc.close()
        await asyncio.wait_for(ghost_room.closed.wait(), 20)

        # A browser that reloads: a new connection to the same room continues the conversation.
        first = await open_room(server, speech, VICTIM, "again")
        await turn(first, "My first answer is about billing.")
        await first.close()
        second = await open_room(server, speech, VICTIM, "again", greeted=False)
        history = server.app_state.rooms.rooms["again"].conversation.history
        assert history[0]["content"].startswith("Hello,")  # the greeting, cut short
        assert history[1]["content"] == "My first answer is about billing."
        await turn(second, "And my second one.")
        assert [m["content"] for m in history if m["role"] == "user"] == [
            "My first answer is about billing.", "And my second one."]
        await close_and_wait(server, second)
        assert not problems(bystander)
    finally:
        await close_and_wait(server, bystander)
    said = await saved_turns(server, VICTIM, "again")  # one session across both connections
    assert "My first answer is about billing." in said and "And my second one." in said
