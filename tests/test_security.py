"""Access control, CORS, security headers and the signaling limits, against a real server."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import jwt
import pytest

from conftest import running_server
from signaling.auth import AUDIENCE, mint
from webrtc_client import Client

SECRET = "test-secret-0123456789abcdef0123456789"


def expired(user: str, room: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "room": room, "aud": AUDIENCE, "iat": now - 7200, "exp": now - 3600},
                      SECRET, algorithm="HS256")


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture
async def auth_server(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, auth_secret=SECRET,
                              livekit_url="ws://127.0.0.1:7880", livekit_api_key="devkey",
                              livekit_api_secret="devsecret-devsecret-devsecret-0123") as server:
        yield server


async def test_every_protected_route_refuses_no_token_a_wrong_rooms_token_and_an_expired_one(auth_server, speech):
    audio = speech("en_birch_canoe.wav")
    alice = mint(SECRET, "alice", "room-a")
    client = Client(auth_server.url, audio, room="room-a", user_token=alice)
    await client.connect()
    try:
        await client.wait_for(lambda c: c.of("bot-ready"))
        client.send("send-text", {"content": "I led the migration to the new billing system."})
        await client.wait_for(lambda c: c.bot_text())
        other_room = mint(SECRET, "alice", "room-b")
        someone_else = mint(SECRET, "mallory", "room-b")
        bad_signature = jwt.encode(jwt.decode(alice, options={"verify_signature": False}), "not-the-secret-but-as-long-as-one-0123",
                                   algorithm="HS256")
        offer = {"sdp": client.pc.localDescription.sdp, "type": "offer", "requestData": {"room": "room-a"}}
        patch = {"pc_id": client.pc_id, "candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host",
                                                        "sdp_mid": "0", "sdp_mline_index": 0}]}
        room_scoped = [("POST", "/api/offer", offer), ("PATCH", "/api/offer", patch), ("GET", "/api/rooms/room-a", None),
                       ("POST", "/api/livekit/token", {"room": "room-a"})]
        data_api = [("GET", "/api/sessions", None), ("GET", "/api/progress?persona=interviewer&role=software-engineer", None)]
        async with httpx.AsyncClient(base_url=auth_server.url, timeout=20) as http:
            for method, path, body in room_scoped + data_api:
                for token, status in ((None, 401), (expired("alice", "room-a"), 401), (bad_signature, 401)):
                    r = await http.request(method, path, json=body, headers=bearer(token))
                    assert r.status_code == status, (method, path, token, r.text)
                    assert r.headers.get("www-authenticate") == "Bearer"
                    assert r.json()["detail"]
            for method, path, body in room_scoped:
                r = await http.request(method, path, json=body, headers=bearer(other_room))
                assert r.status_code == 403, (method, path, r.text)
                assert "another room" in r.json()["detail"]

            # The valid token gets into LiveKit's copy of its room, with its history user...
            r = await http.post("/api/livekit/token", json={}, headers=bearer(alice))
            assert r.status_code == 200 and r.json()["room"] == "room-a"
            from livekit import api
            claims = api.TokenVerifier("devkey", "devsecret-devsecret-devsecret-0123").verify(r.json()["token"])
            dispatch = claims.room_config.agents[0]
            assert json.loads(dispatch.metadata)["user_token"] == "jwt:alice"
            # ... reads its own room and history...
            r = await http.get("/api/rooms/room-a", headers=bearer(alice))
            assert r.status_code == 200 and r.json()["history"]
            sessions = (await http.get("/api/sessions", headers=bearer(alice))).json()["items"]
            assert len(sessions) == 1
            sid = sessions[0]["id"]
            assert (await http.get(f"/api/sessions/{sid}", headers=bearer(alice))).status_code == 200
            # ... and someone else's valid token sees none of it.
            assert (await http.get("/api/sessions", headers=bearer(someone_else))).json()["items"] == []
            for path in (f"/api/sessions/{sid}", f"/api/sessions/{sid}/export?format=markdown"):
                assert (await http.get(path, headers=bearer(someone_else))).status_code == 404
                assert (await http.get(path, headers=bearer(expired("alice", "room-a")))).status_code == 401
            # The page, its assets and the health check stay public.
            for path in ("/", "/healthz", "/api/personas", "/static/app.js"):
                assert (await http.get(path)).status_code == 200, path
    finally:
        await client.close()


async def test_a_token_opens_its_room_only_for_its_user(auth_server, speech):
    audio = speech("en_birch_canoe.wav")
    owner = Client(auth_server.url, audio, room="shared-name", user_token=mint(SECRET, "alice", "shared-name"))
    await owner.connect()
    try:
        await owner.wait_for(lambda c: c.of("bot-ready"))
        intruder = Client(auth_server.url, audio, room="shared-name", user_token=mint(SECRET, "bob", "shared-name"))
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await intruder.connect()
        assert refused.value.response.status_code == 409
        await intruder.close()
        # The owner's conversation was not touched.
        assert auth_server.app_state.rooms.rooms["shared-name"].peer is not None
    finally:
        await owner.close()


async def test_an_open_server_keeps_rooms_to_whoever_opened_them(parley_server, speech):
    audio = speech("en_birch_canoe.wav")
    owner = Client(parley_server.url, audio, room="mine", user_token="a" * 43)
    await owner.connect()
    try:
        await owner.wait_for(lambda c: c.of("bot-ready"))
        intruder = Client(parley_server.url, audio, room="mine", user_token="b" * 43)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await intruder.connect()
        assert refused.value.response.status_code == 409
        assert "choose another room name" in refused.value.response.json()["detail"]
        await intruder.close()
        async with httpx.AsyncClient(base_url=parley_server.url) as http:
            assert (await http.get("/api/rooms/mine")).status_code == 404
            assert (await http.get("/api/rooms/mine", headers=bearer("b" * 43))).status_code == 404
            assert (await http.get("/api/rooms/mine", headers=bearer("a" * 43))).status_code == 200
    finally:
        await owner.close()


async def test_security_headers_and_no_cross_origin_access_by_default(parley_server):
    async with httpx.AsyncClient(base_url=parley_server.url) as http:
        page = await http.get("/")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'self'" in csp and "object-src 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "microphone=(self)" in page.headers["permissions-policy"]
        api = await http.get("/api/personas", headers={"Origin": "https://evil.example"})
        assert api.headers["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in api.headers
        pre = await http.options("/api/offer", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers


async def test_cors_allows_exactly_the_configured_origins(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path,
                              cors_origins="https://calls.example, https://app.example",
                              frame_ancestors="https://calls.example") as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            ok = await http.options("/api/offer", headers={
                "Origin": "https://calls.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://calls.example"
            no = await http.options("/api/offer", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
            assert no.status_code == 400 and "access-control-allow-origin" not in no.headers
            got = await http.get("/api/personas", headers={"Origin": "https://app.example"})
            assert got.headers["access-control-allow-origin"] == "https://app.example"
            assert "frame-ancestors https://calls.example" in (await http.get("/")).headers["content-security-policy"]


async def test_a_full_server_answers_503_with_retry_after(tiny_whisper_path, fake_llm, loopback_ice, tmp_path, speech):
    audio = speech("en_birch_canoe.wav")
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, max_rooms=1) as server:
        first = Client(server.url, audio)
        await first.connect()
        second = Client(server.url, audio)
        try:
            with pytest.raises(httpx.HTTPStatusError) as full:
                await second.connect()
            assert full.value.response.status_code == 503
            assert int(full.value.response.headers["retry-after"]) > 0
            assert "full" in full.value.response.json()["detail"]
            # The room already there keeps working.
            await first.wait_for(lambda c: c.of("bot-ready"))
            first.send("send-text", {"content": "Hello there."})
            await first.wait_for(lambda c: c.bot_text())
        finally:
            await second.close()
            await first.close()


async def test_signaling_is_rate_limited_per_address(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, signaling_burst=3,
                              signaling_rate_per_min=1) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            statuses = [(await http.post("/api/offer", json={"sdp": "junk", "type": "offer"})).status_code
                        for _ in range(5)]
            assert statuses[:3] == [400, 400, 400]  # through to the handler, which refuses the SDP
            assert statuses[3:] == [429, 429]
            r = await http.patch("/api/offer", json={"pc_id": "x", "candidates": []})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            # Reading is not signaling: the page and API keep answering.
            assert (await http.get("/api/personas")).status_code == 200


async def test_a_flood_of_data_channel_messages_is_dropped_with_one_error_and_the_room_keeps_working(
        tiny_whisper_path, fake_llm, loopback_ice, tmp_path, speech):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, max_messages_per_s=5) as server:
        client = Client(server.url, speech("en_birch_canoe.wav"))
        await client.connect()
        try:
            await client.wait_for(lambda c: c.of("bot-ready"))
            for i in range(200):
                client.send("client-message", {"t": "no-such-thing", "d": i})
            errors = await client.wait_for(
                lambda c: [m for m in c.of("error") if "too many messages" in m["data"]["error"]])
            assert len(errors) == 1
            # Some were answered (the burst), most were dropped without a reply each.
            answered = await client.wait_for(lambda c: c.of("error-response"))
            assert 1 <= len(answered) <= 20
            # A second later the bucket has refilled and messages are served again (the second is
            # taken off the bucket's clock rather than waited for).
            server.app_state.rooms.rooms[client.room]._messages.stamp -= 1.0
            client.send("send-text", {"content": "Are you still there?"})
            await client.wait_for(lambda c: c.bot_text())
        finally:
            await client.close()


async def test_a_session_past_its_time_limit_is_told_closed_and_kept(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    import numpy as np

    async with running_server(tiny_whisper_path, fake_llm, tmp_path, max_session_s=3) as server:
        client = Client(server.url, np.zeros(1600, np.float32), user_token="t" * 43)
        await client.connect()
        try:
            await client.wait_for(lambda c: c.of("bot-ready"))
            room = server.app_state.rooms.rooms[client.room]
            client.send("send-text", {"content": "A quick answer before time runs out."})
            fatal = await client.wait_for(lambda c: [m for m in c.of("error") if m["data"]["fatal"]], timeout=15)
            assert "time limit" in fatal[0]["data"]["error"]
            await asyncio.wait_for(room.closed.wait(), 10)
        finally:
            await client.close()
        async with httpx.AsyncClient(base_url=server.url, headers=bearer("t" * 43)) as http:
            (item,) = (await http.get("/api/sessions")).json()["items"]
            session = (await http.get(f"/api/sessions/{item['id']}")).json()
        assert "A quick answer before time runs out." in [t["text"] for t in session["transcript"]]


def test_the_content_policy_lets_the_page_reach_the_configured_livekit_server():
    from signaling.headers import content_security_policy

    assert "connect-src 'self';" in content_security_policy("'self'", None) + ";"
    own = content_security_policy("'self'", "ws://10.0.0.5:7880")
    assert "connect-src 'self' ws://10.0.0.5:7880 http://10.0.0.5:7880;" in own
    cloud = content_security_policy("'self'", "wss://demo-abc.livekit.cloud")
    assert "wss://demo-abc.livekit.cloud" in cloud and "wss://*.livekit.cloud" in cloud
