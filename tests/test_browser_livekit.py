"""The web page's LiveKit path in a real headless Chromium, without a LiveKit server.

No LiveKit server can be installed here, so a small local WebSocket server stands in at
``PARLEY_LIVEKIT_URL`` for the one thing these tests check: the signal connection the vendored
``livekit-client`` opens (``<url>/rtc/v1?access_token=...``, or ``/rtc`` on older servers). It
records the request and keeps the socket open without ever answering (it is not a LiveKit server,
so the client never gets a join response and never gets to media). What is asserted:

* the page shows the "Join via LiveKit" choice only when the server has LiveKit, and the direct
  path stays the default;
* joining asks Parley for a token, connects to the configured URL, and the access token it presents
  verifies with livekit-api for the room on the page, with an explicit dispatch of the ``parley``
  agent whose metadata carries the persona, its options, the participant and the history token;
* the page turns LiveKit's agent conventions into its transcript and state badge (fed to the joined
  call directly: with no agent in the room, nothing else would send them);
* Stop leaves: the client closes its signal connection and the page is back to idle, no error;
* an unreachable LiveKit server and one that refuses the token each end in a clear error on the page.

Chromium runs as in ``tests/test_browser.py`` (Debian's ``/usr/bin/chromium`` through playwright).
"""
from __future__ import annotations

import asyncio
import json
import socket
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web
from test_browser import CHROMIUM, BrowserPage, PlaywrightTimeout, async_playwright, chromium_args

api = pytest.importorskip("livekit.api", reason="livekit-api is not installed (pip install 'parley[livekit]')")

API_KEY = "APIbrowsertest"
API_SECRET = "s" * 40
REFUSAL = "invalid token: token is expired"  # what a LiveKit server answers for a stale token

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(120),
    pytest.mark.skipif(async_playwright is None, reason="the playwright Python package is not installed"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the stand-in at PARLEY_LIVEKIT_URL

@dataclass
class SignalStandIn:
    """Accepts livekit-client's signal WebSocket and records it; ``refuse`` answers every request the
    way a LiveKit server answers a bad token (401 on the upgrade, the reason on ``.../validate``)."""

    refuse: str | None = None
    requests: list[web.Request] = field(default_factory=list)
    connections: list[dict] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        if self.refuse is not None:
            # The client reads the validate answer with fetch() from the page's origin.
            return web.Response(status=401, text=self.refuse, headers={"Access-Control-Allow-Origin": "*"})
        if request.path.endswith("/validate"):
            return web.Response(status=200, text="success", headers={"Access-Control-Allow-Origin": "*"})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = {"path": request.path, "query": dict(request.query), "host": request.host, "messages": 0}
        self.connections.append(conn)
        self.connected.set()
        async for msg in ws:
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                conn["messages"] += 1
        conn["close_code"] = ws.close_code
        self.closed.set()
        return ws

    @asynccontextmanager
    async def running(self):
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


# ------------------------------------------------------------------ parley serve with LiveKit settings

@asynccontextmanager
async def parley_serve(tiny_whisper_path, fake_llm, tmp_path, **livekit):
    """A real ``parley serve`` on a free loopback port, like conftest's ``parley_server``, with the
    LiveKit settings given (none: LiveKit off)."""
    import uvicorn

    from agent.config import Settings
    from signaling.app import create_app

    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, stt_model=str(tiny_whisper_path), stt_device="cpu",
                        stt_max_new_tokens=12, llm_base_url=fake_llm.url, llm_api_key="test", llm_model="test-model",
                        tts="espeak", database_url=f"sqlite+aiosqlite:///{tmp_path}/parley.db",
                        audio_dir=str(tmp_path / "audio"), _env_file=None, **livekit)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:  # uvicorn has no start event; this yields until it listens
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def livekit_settings(url: str) -> dict:
    return dict(livekit_url=url, livekit_api_key=API_KEY, livekit_api_secret=API_SECRET)


@pytest.fixture
def mic_wav(tmp_path) -> Path:
    """One second of silence: the microphone only has to exist (nothing listens to it here)."""
    import wave

    path = tmp_path / "mic.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(b"\0\0" * 48000)
    return path


@pytest.fixture
async def browser(mic_wav, artifacts, request):
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(mic_wav))
        try:
            context = await chromium.new_context(viewport={"width": 1280, "height": 900})
            bp = BrowserPage(await context.new_page(), artifacts, request.node.name)
            bp.token_requests = []
            bp.page.on("request", lambda r: bp.token_requests.append(json.loads(r.post_data))
                       if r.url.endswith("/api/livekit/token") and r.method == "POST" else None)
            yield bp
        finally:
            await chromium.close()


DIAGNOSTICS = """() => ({
    status: document.getElementById('status').textContent,
    error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    transportShown: !document.getElementById('transport-field').hidden,
    startDisabled: document.getElementById('start').disabled,
    livekit: window.parley && window.parley.livekit && {url: window.parley.livekit.url,
        room: window.parley.livekit.roomName, connected: window.parley.livekit.connected},
})"""



async def until(bp: BrowserPage, selector: str, what: str, timeout_s: float) -> None:
    """Waits for ``selector`` to be visible. Selector waits rather than ``wait_for_function``: the
    page's Content-Security-Policy (script-src 'self', no 'unsafe-eval') forbids the eval that
    polling a JavaScript predicate needs, and these tests run the page under its real policy."""
    try:
        await bp.page.locator(selector).wait_for(state="visible", timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        state = await bp.page.evaluate(DIAGNOSTICS)
        await bp.page.screenshot(path=str(bp.artifacts / f"{bp.name}-failure.png"), full_page=True)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\npage state: "
                             f"{json.dumps(state, indent=1)}\nbrowser log:\n" + "\n".join(bp.logs[-30:])) from None


async def open_page(bp: BrowserPage, base: str, room: str, *, expect_livekit: bool) -> None:
    await bp.page.goto(f"{base}/?room={room}")
    await until(bp, "#start:enabled", "the personas to load", 15)
    if expect_livekit:
        await until(bp, "#transport-field", "the LiveKit choice", 10)


async def choose_livekit_teacher(page) -> None:
    await page.select_option("#persona", "teacher")
    await page.select_option("#option-language", "de")
    await page.select_option("#option-level", "A2")
    await page.check("input[name=transport][value=livekit]")


# ------------------------------------------------------------------------------------------- tests

async def test_page_offers_livekit_only_when_the_server_has_it(tiny_whisper_path, fake_llm, tmp_path, browser):
    bp, page = browser, browser.page
    async with parley_serve(tiny_whisper_path, fake_llm, tmp_path / "off") as base:
        # The probe's answer settles the choice; wait for it rather than for a time.
        async with page.expect_response(lambda r: r.url.endswith("/api/livekit")) as probe:
            await open_page(bp, base, "no-livekit", expect_livekit=False)
        assert (await probe.value).status == 404
        assert await page.is_hidden("#transport-field")
        assert await page.locator("input[name=transport]").count() == 2  # in the markup, just not offered

    async with SignalStandIn().running() as lk, \
            parley_serve(tiny_whisper_path, fake_llm, tmp_path / "on", **livekit_settings(lk.url)) as base:
        await open_page(bp, base, "with-livekit", expect_livekit=True)
        # The direct path stays the default; the hint names the server the browser would join.
        assert await page.is_checked("input[name=transport][value=webrtc]")
        assert not await page.is_checked("input[name=transport][value=livekit]")
        assert lk.url in await page.text_content("#transport-hint")
        assert not lk.requests, "nothing may touch LiveKit before the person chooses it"


async def test_joining_via_livekit_presents_a_token_for_the_room_with_the_persona(
        tiny_whisper_path, fake_llm, tmp_path, browser, artifacts):
    bp, page = browser, browser.page
    room = f"lk-{uuid.uuid4().hex[:8]}"
    async with SignalStandIn().running() as lk, \
            parley_serve(tiny_whisper_path, fake_llm, tmp_path, **livekit_settings(lk.url)) as base:
        await open_page(bp, base, room, expect_livekit=True)
        await choose_livekit_teacher(page)
        await page.click("#start")
        try:
            async with asyncio.timeout(20):
                await lk.connected.wait()
        except TimeoutError:
            raise AssertionError(f"the page never opened the signal connection: {await page.evaluate(DIAGNOSTICS)}"
                                 f"\n{chr(10).join(bp.logs[-30:])}") from None

        # The page asked Parley for a token with what the form says.
        [asked] = bp.token_requests
        assert asked["room"] == room and asked["persona"] == "teacher"
        assert asked["options"]["language"] == "de" and asked["options"]["level"] == "A2"
        user_token = await page.evaluate("localStorage.getItem('parley.userToken')")
        assert user_token and asked["user_token"] == user_token

        # ...and took it to the configured URL's signal endpoint.
        [conn] = lk.connections
        assert conn["host"] == lk.url.removeprefix("ws://")
        assert conn["path"] in ("/rtc/v1", "/rtc"), conn["path"]
        claims = api.TokenVerifier(API_KEY, API_SECRET).verify(conn["query"]["access_token"])
        assert claims.video.room_join and claims.video.room == room
        assert claims.video.can_publish and claims.video.can_subscribe
        assert claims.identity == asked["identity"]
        [dispatch] = claims.room_config.agents
        assert dispatch.agent_name == "parley"
        meta = json.loads(dispatch.metadata)
        assert meta["persona"] == "teacher" and meta["participant"] == claims.identity
        assert meta["options"]["language"] == "de" and meta["options"]["level"] == "A2"
        assert meta["user_token"] == user_token
        # What the worker reads back from that metadata.
        livekit_worker = pytest.importorskip("agent.livekit_worker", reason="livekit-agents is not installed")
        opts = livekit_worker.job_options("", dispatch.metadata)
        assert (opts.persona, opts.participant, opts.user_token) == ("teacher", claims.identity, user_token)
        assert await page.evaluate("window.parley.livekit.url") == lk.url

        # How the page reads LiveKit's agent conventions, fed to the joined call as the client would
        # hand them over (a stand-in has no agent to send them): the person's segment as interim then
        # final streams on lk.transcription sent on their behalf, a late interim of a finished segment,
        # the agent's reply as a stream of deltas, and its lk.agent.state attribute.
        shown = await page.evaluate("""async ({me, agent}) => {
            const call = window.parley.livekit;
            const stream = (attributes, chunks) => ({info: {attributes}, readAll: async () => chunks.join(''),
                                                     async *[Symbol.asyncIterator]() { yield* chunks; }});
            const seg = (final) => ({'lk.segment_id': 'SG_1', 'lk.transcription_final': String(final)});
            const lines = () => [...document.querySelectorAll('#transcript .line')].map(e => e.className + ': ' + e.textContent);
            await call.onTranscription(stream(seg(false), ['Guten']), me);
            const interim = lines();
            await call.onTranscription(stream(seg(true), ['Guten Tag']), me);
            await call.onTranscription(stream(seg(false), ['Guten']), me);
            call.isAgent = (identity) => identity === agent;
            await call.onTranscription(stream({'lk.transcription_final': 'false'}, ['Hallo!', ' Wie geht', "'s?"]), agent);
            await call.onTranscription(stream(seg(false), ['Not mine']), 'someone-else');
            call.ui.agentState('thinking');
            return {interim, lines: lines(), state: document.getElementById('agent-state').textContent};
        }""", {"me": claims.identity, "agent": "agent-AJ_test"})
        assert shown["interim"] == ["line user interim: Guten"], shown
        assert shown["lines"] == ["line user: Guten Tag", "line agent: Hallo! Wie geht's?"], shown
        assert shown["state"] == "thinking", shown

        await page.screenshot(path=str(artifacts / "livekit-joining.png"), full_page=True)

        # Stop leaves the room: the client closes its signal connection, the page is idle, no error.
        await page.click("#stop")
        try:
            async with asyncio.timeout(10):
                await lk.closed.wait()
        except TimeoutError:
            raise AssertionError("Stop did not close the LiveKit signal connection") from None
        await until(bp, "#status:text-is('Stopped')", "the page to stop", 5)
        state = await page.evaluate(DIAGNOSTICS)
        assert state["error"] is None and state["livekit"] is None and not state["startDisabled"], state
        assert await page.text_content("#agent-state") == "idle"


@pytest.mark.parametrize("server", ["unreachable", "refusing"])
async def test_a_livekit_server_that_cannot_be_joined_is_a_clear_error(
        tiny_whisper_path, fake_llm, tmp_path, browser, artifacts, server):
    bp, page = browser, browser.page
    stand_in = SignalStandIn(refuse=REFUSAL)
    async with stand_in.running():
        # Nothing listens on a port freed just now: connections are refused at once.
        url = f"ws://127.0.0.1:{free_port()}" if server == "unreachable" else stand_in.url
        async with parley_serve(tiny_whisper_path, fake_llm, tmp_path, **livekit_settings(url)) as base:
            await open_page(bp, base, f"lk-{server}", expect_livekit=True)
            await choose_livekit_teacher(page)
            await page.click("#start")
            await until(bp, "#error", "an error on the page", 30)
            state = await page.evaluate(DIAGNOSTICS)
            await page.screenshot(path=str(artifacts / f"livekit-{server}.png"), full_page=True)

    assert len(bp.token_requests) == 1, "the token came from Parley either way"
    error = state["error"]
    assert url in error, error
    if server == "unreachable":
        assert "Could not reach the LiveKit server" in error, error
        assert not stand_in.requests
    else:
        assert "refused" in error and REFUSAL in error, error
        assert any(r.path.endswith("/validate") for r in stand_in.requests), [r.path for r in stand_in.requests]
    # Back to where a person can try again.
    assert state["status"] == "Not connected" and not state["startDisabled"] and state["livekit"] is None, state
