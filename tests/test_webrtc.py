"""A real aiortc peer against a running Parley server over loopback."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from fake_llm import last_user
from webrtc_client import Client


async def test_browser_like_client_gets_transcript_reply_text_and_audio(parley_server, speech):
    parley_server.llm.script = ["Good answer. Tell me about a recent project."]
    c = Client(parley_server.url, speech("en_birch_canoe.wav"))
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        assert c.of("bot-ready")[0]["data"]["version"] == "2.1.0"
        # The greeting starts; the person talks over it, is transcribed and answered.
        await c.wait_for(lambda c: any(m["data"]["final"] for m in c.of("user-transcription")))
        await c.wait_for(lambda c: "Good answer." in c.bot_text())
        reply_start = len(c.audio)
        await c.wait_for(lambda c: "Tell me about a recent project." in c.bot_text())
        await c.wait_for(lambda c: len(c.of("bot-stopped-speaking")) >= 2)
        final = [m["data"] for m in c.of("user-transcription") if m["data"]["final"]][0]
        assert final["text"] and final["user_id"] and final["timestamp"]
        spoken = [m["data"]["text"] for m in c.of("bot-output") if m["data"]["spoken"]]
        assert "Good answer." in spoken and "Tell me about a recent project." in spoken
        assert c.of("user-started-speaking") and c.of("user-stopped-speaking") and c.of("metrics")
        audio = np.concatenate(c.audio[reply_start:])
        assert np.abs(audio).max() > 1000, "the agent's reply audio is silent"
        assert c.of("server-message") and any(m["data"].get("type") == "interrupted" for m in c.of("server-message"))
        # The LLM saw the user's words as transcribed.
        assert last_user(parley_server.llm.requests[-1]) == final["text"]
    finally:
        await c.close()


async def test_typed_text_over_data_channel_gets_a_reply(parley_server, speech):
    parley_server.llm.reply_for = lambda req: "You typed: " + last_user(req)
    c = Client(parley_server.url, np.zeros(16000, np.float32))
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        c.send("send-text", {"content": "hello there", "options": {}})
        await c.wait_for(lambda c: "You typed: hello there" in c.bot_text())
    finally:
        await c.close()


async def test_ten_concurrent_rooms_get_their_own_replies(parley_server, speech):
    parley_server.llm.reply_for = lambda req: f"Reply for {req['messages'][0]['content'].split('|')[0][-40:]}"
    rooms = [f"room-{i}" for i in range(10)]
    # Each room's persona differs by role, so the reply text names the room's own system prompt.
    parley_server.llm.reply_for = lambda req: "Room says " + _role(req)
    # Not "consultant": with that role's vocabulary prompt the random-weight test Whisper happens to
    # emit end-of-text at once, so that room would never get a transcript (a fixture quirk).
    roles = ["software-engineer-backend", "data-scientist", "product-manager", "hr", "behavioural",
             "marketing-manager", "customer-service", "call-centre-agent", "project-manager", "software-engineer-frontend"]
    clients = [Client(parley_server.url, speech("en_goforward.wav"), room=r, options={"role": role})
               for r, role in zip(rooms, roles)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        async with asyncio.timeout(90):
            await asyncio.gather(*(c.wait_for(lambda c: any(m["data"]["final"] for m in c.of("user-transcription")), 90)
                                   for c in clients))
            await asyncio.gather(*(c.wait_for(lambda c: "Room says" in c.bot_text(), 90) for c in clients))
        for c, role in zip(clients, roles):
            texts = [m["data"]["text"] for m in c.of("bot-output") if "Room says" in m["data"]["text"]]
            assert texts and all(role in t for t in texts), (role, texts)
        assert len(parley_server.app_state.rooms.rooms) == 10
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def _role(req) -> str:
    system = req["messages"][0]["content"]
    from personas.catalog import get_catalog

    for r in get_catalog().roles.values():
        if f"for a {r.label} position" in system:
            return r.id
    return "unknown"


async def test_bad_signaling_input_is_a_clear_4xx_and_the_server_keeps_serving(parley_server, speech):
    async with httpx.AsyncClient(base_url=parley_server.url, timeout=10) as http:
        cases = [
            ("post", dict(content=b"not json", headers={"content-type": "application/json"})),
            ("post", dict(json={"type": "offer"})),  # missing sdp
            ("post", dict(json={"sdp": "v=0\r\nthis is not sdp", "type": "offer"})),
            ("post", dict(json={"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=garbage", "type": "offer"})),
            ("post", dict(json={"sdp": "x", "type": "answer"})),
            ("post", dict(json={"sdp": "x", "requestData": {"room": "../../etc"}})),
            ("post", dict(json={"sdp": "x", "requestData": {"persona": "pirate"}})),
            ("patch", dict(json={"pc_id": "unknown", "candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}]})),
            ("patch", dict(content=b"{", headers={"content-type": "application/json"})),
            ("post", dict(content=b"{" + b" " * 200_000 + b"}", headers={"content-type": "application/json"})),
        ]
        for method, kw in cases:
            r = await getattr(http, method)("/api/offer", **kw)
            assert 400 <= r.status_code < 500, (kw, r.status_code, r.text)
            assert r.json()["detail"], r.text
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok"
        from pipeline.turn_model import bundled_model  # the end of turn's audio model, when installed

        assert health["turn_model"] == (bundled_model().name if bundled_model() else None)
    # And a real client still gets through.
    c = Client(parley_server.url, np.zeros(16000, np.float32))
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
    finally:
        await c.close()


async def test_room_closes_cleanly_when_the_peer_leaves_and_restart_keeps_the_conversation(parley_server, speech):
    parley_server.llm.reply_for = lambda req: "You typed: " + last_user(req)
    manager = parley_server.app_state.rooms
    c = Client(parley_server.url, np.zeros(16000, np.float32), room="lifecycle")
    await c.connect()
    await c.wait_for(lambda c: c.of("bot-ready"))
    c.send("send-text", {"content": "first"})
    await c.wait_for(lambda c: "You typed: first" in c.bot_text())
    room = manager.rooms["lifecycle"]
    await c.close()
    # A restart (new connection, same pc_id, as the Pipecat client does after ICE failure) within the
    # grace period continues the conversation, even without naming the room.
    c2 = Client(parley_server.url, np.zeros(16000, np.float32), room=None)
    try:
        await c2.connect(pc_id=c.pc_id, restart=True)
        assert c2.pc_id == c.pc_id
        await c2.wait_for(lambda c: c.of("bot-ready"))
        assert manager.rooms["lifecycle"] is room
        c2.send("send-text", {"content": "second"})
        await c2.wait_for(lambda c: "You typed: second" in c.bot_text())
        users = [m["content"] for m in room.conversation.history if m["role"] == "user"]
        assert users == ["first", "second"]
    finally:
        await c2.close()
    # With no peer left, the room closes after its grace period and every task it started ends.
    await asyncio.wait_for(room.closed.wait(), 15)
    assert "lifecycle" not in manager.rooms
    assert not room.conversation._tasks and not room._tasks
    assert not [p for p, (_, r) in manager.peers.items() if r is room]


async def test_rest_api_personas_page_docs_and_room_state(parley_server):
    parley_server.llm.reply_for = lambda req: "Noted."
    async with httpx.AsyncClient(base_url=parley_server.url, timeout=10) as http:
        personas = (await http.get("/api/personas")).json()["personas"]
        assert {p["id"] for p in personas} == {"interviewer", "teacher"}
        teacher = next(p for p in personas if p["id"] == "teacher")
        langs = {c["id"] for o in teacher["options"] if o["name"] == "language" for c in o["choices"]}
        assert {"en", "de", "fr", "es", "it", "pt"} <= langs
        page = await http.get("/")
        assert page.status_code == 200 and "Parley" in page.text
        assert (await http.get("/docs")).status_code == 200
        assert "/api/offer" in (await http.get("/openapi.json")).json()["paths"]
        assert (await http.get("/api/rooms/nope")).status_code == 404
        c = Client(parley_server.url, np.zeros(16000, np.float32), room="api-room",
                   persona="teacher", options={"language": "de", "level": "A2"})
        try:
            await c.connect()
            await c.wait_for(lambda c: c.of("bot-ready"))
            c.send("send-text", {"content": "Ich habe Hunger"})
            await c.wait_for(lambda c: "Noted." in c.bot_text())
            # Typing during the greeting cuts it off; wait for the reply itself to finish playing.
            noted = next(i for i, m in enumerate(c.messages) if m["type"] == "bot-output" and "Noted." in m["data"]["text"])
            await c.wait_for(lambda c: any(m["type"] == "bot-stopped-speaking" for m in c.messages[noted:]))
            state = (await http.get("/api/rooms/api-room")).json()
            assert state["persona"] == "teacher"
            assert state["options"] | {"language": "de", "level": "A2"} == state["options"]
            assert {"role": "user", "content": "Ich habe Hunger"} in state["history"]
            assert state["history"][-1] == {"role": "assistant", "content": "Noted."}
            assert state["metrics_summary"]["llm_ttft_ms"]["count"] >= 1
            # The teacher speaks German: Whisper and the voice follow the persona's language.
            room = parley_server.app_state.rooms.rooms["api-room"]
            assert room.conversation.config.language == "de"
            assert room.conversation.vad_options.endpoint_silence_ms == 1200  # the teacher's, not the default
        finally:
            await c.close()


async def test_unavailable_speech_model_is_announced_and_typing_still_works(parley_server):
    parley_server.llm.reply_for = lambda req: "Typed reply."
    engines = parley_server.app_state.engines
    saved, engines.stt_status = engines.stt_status, "error: cannot load Whisper model 'base' on cpu: offline"
    c = Client(parley_server.url, np.zeros(16000, np.float32))
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        await c.wait_for(lambda c: any(m["data"].get("type") == "notice" for m in c.of("server-message")))
        notice = next(m["data"]["text"] for m in c.of("server-message") if m["data"].get("type") == "notice")
        assert "Speech recognition is unavailable" in notice and "cannot load Whisper model 'base'" in notice
        c.send("send-text", {"content": "hello"})
        await c.wait_for(lambda c: "Typed reply." in c.bot_text())
    finally:
        engines.stt_status = saved
        await c.close()


async def test_teacher_corrections_and_interview_scorecard_travel_over_the_data_channel(parley_server):
    def reply(body):
        name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if name == "corrections":
            return json.dumps({"corrections": [{"original": "je suis allé au le marché", "corrected": "je suis allé au marché",
                                                "explanation": "au already means à + le"}], "vocabulary": []})
        if name == "suggestions":
            return json.dumps({"suggestions": ["Revise contractions: au, aux, du, des."]})
        if name == "answer_feedback":
            return json.dumps({"score": 7, "good": ["Concrete."], "missing": ["Numbers."], "better_answer": "Add results.",
                               "star": None})
        if name == "scorecard":
            return json.dumps({"strengths": ["Clear."], "improvements": ["Quantify."]})
        return "D'accord, et qu'est-ce que tu as acheté ?"
    parley_server.llm.reply_for = reply
    teacher = Client(parley_server.url, np.zeros(16000, np.float32), persona="teacher",
                     options={"language": "fr", "level": "A2"})
    interview = Client(parley_server.url, np.zeros(16000, np.float32), persona="interviewer", options={"questions": 1})
    try:
        await asyncio.gather(teacher.connect(), interview.connect())
        await asyncio.gather(teacher.wait_for(lambda c: c.of("bot-ready")), interview.wait_for(lambda c: c.of("bot-ready")))
        teacher.send("send-text", {"content": "Hier je suis allé au le marché."})
        await teacher.wait_for(lambda c: any(m["data"].get("type") == "correction" for m in c.of("server-message")))
        [correction] = [m["data"] for m in teacher.of("server-message") if m["data"].get("type") == "correction"]
        assert correction["corrected"] == "je suis allé au marché"
        teacher.send("client-message", {"t": "end-session", "d": {}})
        await teacher.wait_for(lambda c: c.of("server-response"))
        summary = teacher.of("server-response")[0]["data"]
        assert summary["t"] == "end-session" and summary["d"]["suggestions"] == ["Revise contractions: au, aux, du, des."]

        interview.send("send-text", {"content": "In my last job I led the migration of our billing service, "
                                                "I planned it, wrote the scripts and we finished two weeks early."})
        await interview.wait_for(lambda c: any(m["data"].get("type") == "delivery" for m in c.of("server-message")))
        interview.send("client-message", {"t": "end-session", "d": {}})
        await interview.wait_for(lambda c: any(m["data"].get("type") == "scorecard" for m in c.of("server-message")))
        card = next(m["data"] for m in interview.of("server-message") if m["data"].get("type") == "scorecard")
        assert card["overall_score"] == 7 and card["strengths"] == ["Clear."]
        feedback = next(m["data"] for m in interview.of("server-message") if m["data"].get("type") == "feedback")
        assert feedback["score"] == 7 and feedback["question_index"] == 0
    finally:
        await asyncio.gather(teacher.close(), interview.close())
