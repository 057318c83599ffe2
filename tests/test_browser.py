"""End to end in a real headless Chromium: a fake microphone speaks a recording, Parley answers.

Two pages against the real ``parley serve`` (uvicorn + FastAPI + aiortc) over loopback:

* our own web page (``/``: signaling/static), which sends its offer after ICE gathering;
* ``tests/web/pipecat_page.html``, the unchanged Pipecat client SDK (client-js +
  small-webrtc-transport), which offers at once and trickles its ICE candidates with PATCH.

Chromium is Debian's ``/usr/bin/chromium`` driven by the ``playwright`` package (never
``playwright install``). ``--use-file-for-fake-audio-capture`` loops a WAV as the microphone, so the
person says the sentence again every loop; every LLM request gets the same scripted reply.
Screenshots go to ``test-artifacts/``.
"""
from __future__ import annotations

import json
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest

from fake_llm import last_user
from fastapi.staticfiles import StaticFiles

from pipeline.audio import float_to_int16, resample_once

try:
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
WEB_DIR = Path(__file__).parent / "web"
REPLY = "Good answer. Tell me about a recent project."
SILENCE_S = 4.0  # after the sentence, so each loop of the fake microphone is one utterance
AUDIBLE_RMS = 0.01  # espeak speech measures about 0.05-0.2; decoded Opus silence 0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(120),
    pytest.mark.skipif(async_playwright is None, reason="the playwright Python package is not installed"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


def chromium_args(wav: Path) -> list[str]:
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        # Loopback is the only network here: let WebRTC gather 127.0.0.1 and show it, not an mDNS name.
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest.fixture
def fake_mic_wav(tmp_path, speech) -> Path:
    """tests/data/en_birch_canoe.wav then silence, as the 16-bit PCM WAV Chromium's fake microphone loops."""
    rate = 48000
    voice = resample_once(speech("en_birch_canoe.wav"), 16000, rate)
    pcm = float_to_int16(np.concatenate([voice, np.zeros(int(SILENCE_S * rate), np.float32)]))
    path = tmp_path / "mic.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


class BrowserPage:
    """A Playwright page plus what it logged, with DOM waits that fail with a useful message."""

    def __init__(self, page, artifacts: Path, name: str):
        self.page, self.artifacts, self.name = page, artifacts, name
        self.logs: list[str] = []
        page.on("console", lambda m: self.logs.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.logs.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.logs.append(f"requestfailed: {r.method} {r.url} {r.failure}"))

    async def wait(self, expression: str, what: str, timeout_s: float, arg=None, diagnostics: str = "null"):
        try:
            # Not wait_for_function: it compiles the predicate with `new Function` inside the page,
            # which the page's content policy (script-src 'self') rightly forbids. A function
            # handed to evaluate is compiled by DevTools, outside the policy.
            found = await self.page.evaluate(f"""async (arg) => {{
                const check = () => {{ const v = ({expression}); return typeof v === "function" ? v(arg) : v; }};
                const deadline = performance.now() + {timeout_s * 1000};
                while (performance.now() < deadline) {{
                    const v = check();
                    if (v) return v;
                    await new Promise((resolve) => setTimeout(resolve, 50));
                }}
                return null;
            }}""", arg)
            if found is None:
                raise PlaywrightTimeout(f"{what}: {timeout_s} s")
            return found
        except PlaywrightTimeout:
            try:
                state = await self.page.evaluate(diagnostics)
                await self.page.screenshot(path=str(self.artifacts / f"{self.name}-failure.png"), full_page=True)
            except PlaywrightError as e:
                state = f"(page unreadable: {e})"
            logs = "\n".join(self.logs[-30:])
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\npage state: "
                                 f"{json.dumps(state, indent=1, default=str)}\nbrowser log:\n{logs}") from None


@pytest.fixture
async def browser_page(fake_mic_wav, artifacts, request):
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(fake_mic_wav))
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = BrowserPage(await context.new_page(), artifacts, request.node.name)
            yield page
            # Our pages run under script-src/style-src 'self': anything they do that the policy
            # blocks is a bug users would meet as a silently broken page.
            assert not [line for line in page.logs if "Content Security Policy" in line], page.logs
        finally:
            await browser.close()


# What our page shows, for failure messages.
PARLEY_DIAGNOSTICS = """() => ({
    status: document.getElementById('status').textContent,
    error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    agentState: document.getElementById('agent-state').textContent,
    botReady: document.body.dataset.botReady || null,
    transcript: [...document.querySelectorAll('#transcript .line')].map(e => e.className + ': ' + e.textContent),
    botAudioLevel: window.parley && window.parley.botAudioLevel,
    connection: window.parley && window.parley.pc && window.parley.pc.connectionState,
    events: window.parley ? window.parley.events.map(e => e.type) : null,
})"""

PIPECAT_DIAGNOSTICS = """() => {
    const t = (id) => document.getElementById(id).innerText;
    return {state: t('state'), connected: t('connected'), botReady: t('bot-ready'), errors: t('errors'),
            userTranscript: t('user-transcript'), userPartial: t('user-partial'), botOutput: t('bot-output'),
            botLevel: t('bot-level'), events: (window.pipecatEvents || []).map(e => e.type),
            http: (window.pipecatHttp || []).map(h => h.method + ' ' + h.status),
            connection: window.parley && window.parley.transport.pc && window.parley.transport.pc.connectionState};
}"""


async def test_parley_page_in_chromium_transcribes_answers_and_plays_the_reply(parley_server, browser_page, artifacts):
    parley_server.llm.reply_for = lambda req: REPLY
    bp, page = browser_page, browser_page.page
    room = f"browser-{uuid.uuid4().hex[:8]}"

    await page.goto(f"{parley_server.url}/?room={room}")
    await bp.wait("!document.getElementById('start').disabled", "the personas to load", 10, diagnostics=PARLEY_DIAGNOSTICS)
    await page.click("#start")
    await bp.wait("document.body.dataset.botReady === 'yes'", "bot-ready", 15, diagnostics=PARLEY_DIAGNOSTICS)

    # The person's words, transcribed (a tiny random Whisper: the text is garbage, but it is text).
    await bp.wait("[...document.querySelectorAll('#transcript .line.user:not(.interim)')].some(e => e.textContent.trim())",
                  "a final user transcript", 25, diagnostics=PARLEY_DIAGNOSTICS)
    # The agent's reply, exactly what the OpenAI-compatible test server streamed.
    await bp.wait("(reply) => [...document.querySelectorAll('#transcript .line.agent')].some(e => e.textContent === reply)",
                  "the LLM's reply in the transcript", 20, arg=REPLY, diagnostics=PARLEY_DIAGNOSTICS)
    # Its second sentence has just started playing: the agent's audio is audible now.
    await bp.wait("(min) => window.parley.botAudioLevelNow > min", "audible agent audio", 10, arg=AUDIBLE_RMS,
                  diagnostics=PARLEY_DIAGNOSTICS)

    page_state = await page.evaluate("""() => {
        const audio = document.getElementById('bot-audio');
        return {
            users: [...document.querySelectorAll('#transcript .line.user:not(.interim)')].map(e => e.textContent),
            agents: [...document.querySelectorAll('#transcript .line.agent')].map(e => e.textContent),
            error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
            muted: audio.muted, paused: audio.paused, hasStream: audio.srcObject !== null,
            botAudioLevel: window.parley.botAudioLevel,
            transcriptions: window.parley.events.filter(e => e.type === 'user-transcription' && e.data.final)
                .map(e => e.data.text),
        };
    }""")
    assert page_state["error"] is None, page_state
    assert page_state["hasStream"] and not page_state["muted"] and not page_state["paused"], page_state
    assert page_state["botAudioLevel"] > AUDIBLE_RMS, page_state
    # The persona's greeting is not the LLM's. It may be cut off unheard when the fake microphone's
    # speech starts before its first frame (a real barge-in), so it is not required on screen.
    greeting = [a for a in page_state["agents"] if a.startswith("Hello, thanks for coming in.")]
    assert greeting in ([], page_state["agents"][:1]), page_state["agents"]
    assert REPLY in page_state["agents"], page_state["agents"]
    # The page shows every final transcription as the person's line, and the LLM was asked about one.
    finals = [t.strip() for t in page_state["transcriptions"] if t.strip()]
    assert page_state["users"] == finals, page_state
    asked = [last_user(r) for r in parley_server.llm.requests]
    assert asked and asked[0] in page_state["transcriptions"], (asked, page_state["transcriptions"])

    await page.screenshot(path=str(artifacts / "page.png"), full_page=True)


async def test_unchanged_pipecat_client_sdk_talks_to_parley(parley_server, browser_page, artifacts):
    parley_server.llm.reply_for = lambda req: REPLY
    bp, page = browser_page, browser_page.page
    # The SDK page is served same-origin, so its default endpoint "/api/offer" is Parley's.
    # uvicorn keeps the FastAPI app as ``config.app``; a route added before the request is served.
    parley_server.config.app.mount("/test-web", StaticFiles(directory=str(WEB_DIR)), name="test-web")
    room = f"pipecat-{uuid.uuid4().hex[:8]}"

    await page.goto(f"{parley_server.url}/test-web/pipecat_page.html?room={room}&persona=interviewer")
    await bp.wait("document.getElementById('connected').textContent === 'yes'", "connect() to resolve (bot-ready)", 20,
                  diagnostics=PIPECAT_DIAGNOSTICS)
    await bp.wait("[...document.querySelectorAll('#user-transcript div')].some(e => e.textContent.trim())",
                  "a final user transcript", 25, diagnostics=PIPECAT_DIAGNOSTICS)
    sentences = [s.strip() + "." for s in REPLY.split(".") if s.strip()]
    await bp.wait("""(wanted) => {
        const got = [...document.querySelectorAll('#bot-output div')].map(e => e.textContent);
        return wanted.every(s => got.includes(s));
    }""", "the LLM's reply as bot-output", 20, arg=sentences, diagnostics=PIPECAT_DIAGNOSTICS)
    await bp.wait("(min) => parseFloat(document.getElementById('bot-level-now').textContent) > min",
                  "audible bot audio", 10, arg=AUDIBLE_RMS, diagnostics=PIPECAT_DIAGNOSTICS)

    state = await page.evaluate("""() => {
        const audio = document.getElementById('bot-audio');
        return {
            botReady: document.getElementById('bot-ready').textContent,
            version: document.getElementById('bot-ready').dataset.version,
            errors: document.getElementById('errors').innerText.trim(),
            botLevel: parseFloat(document.getElementById('bot-level').textContent),
            muted: audio.muted, hasStream: audio.srcObject !== null,
            http: window.pipecatHttp.map(h => ({method: h.method, status: h.status,
                                                 candidates: h.body && h.body.candidates ? h.body.candidates.length : null,
                                                 restart: h.body && h.body.restart_pc})),
            trickled: window.pipecatHttp.filter(h => h.method === 'PATCH').flatMap(h => h.body.candidates),
            offerHasCandidates: window.pipecatHttp[0].body.sdp.includes('a=candidate'),
            directions: window.parley.transport.pc.getTransceivers().map(t => t.mid + ':' + t.currentDirection),
            connection: window.parley.transport.pc.connectionState,
            events: window.pipecatEvents.map(e => e.type),
        };
    }""")
    assert state["botReady"] == "yes" and state["version"] == "2.1.0", state
    assert state["errors"] == "", state
    assert state["botLevel"] > AUDIBLE_RMS and state["hasStream"] and not state["muted"], state
    assert state["connection"] == "connected", state
    # The agent's voice on mid 0; the (camera-off) video m-line accepted, not sent to.
    assert state["directions"][:2] == ["0:sendrecv", "1:sendonly"], state["directions"]
    # One offer, answered at once: no retry, no restart.
    posts = [h for h in state["http"] if h["method"] == "POST"]
    assert posts == [{"method": "POST", "status": 200, "candidates": None, "restart": False}], state["http"]
    # The SDK offers before gathering and trickles every candidate with PATCH, all accepted.
    assert not state["offerHasCandidates"], state
    patches = [h for h in state["http"] if h["method"] == "PATCH"]
    assert patches and all(h["status"] == 200 for h in patches), state["http"]
    # ... and they reached the server's ICE agent for the bundled transport (mid 0).
    peer = parley_server.app_state.rooms.rooms[room].peer
    ice = peer.pc.getTransceivers()[0].receiver.transport.transport
    remote = {(c.ip, c.port) for c in ice.getRemoteCandidates()}
    trickled = {(f[4], int(f[5])) for c in state["trickled"] if c["sdp_mid"] == "0"
                for f in [c["candidate"].split()] if f[2].lower() == "udp" and f[7] == "host"}
    assert trickled and trickled <= remote, (trickled, remote)
    assert {"user-started-speaking", "user-stopped-speaking", "bot-started-speaking", "bot-stopped-speaking",
            "bot-tts-text", "metrics"} <= set(state["events"]), state["events"]

    await page.screenshot(path=str(artifacts / "pipecat.png"), full_page=True)


async def test_page_shows_feedback_and_the_scorecard(parley_server, browser_page, artifacts):
    def reply(body):
        name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if name == "answer_feedback":
            return json.dumps({"score": 8, "good": ["A concrete example."], "missing": ["The measured result."],
                               "better_answer": "Situation, task, action, then the result in numbers.",
                               "star": {"situation": True, "task": True, "action": True, "result": False}})
        if name == "scorecard":
            return json.dumps({"strengths": ["Clear examples."], "improvements": ["Quantify results."]})
        return "Thank you."
    parley_server.llm.reply_for = reply
    bp, page = browser_page, browser_page.page
    await page.goto(f"{parley_server.url}/?room=report-{uuid.uuid4().hex[:8]}")
    await bp.wait("!document.getElementById('start').disabled", "the personas to load", 10, diagnostics=PARLEY_DIAGNOSTICS)
    await page.fill("#option-questions", "1")
    await page.click("#start")
    await bp.wait("document.body.dataset.botReady === 'yes'", "bot-ready", 15, diagnostics=PARLEY_DIAGNOSTICS)
    await page.fill("#text-input", "In my last team I led the migration to PostgreSQL and we finished early.")
    await page.click("#send")
    await bp.wait("document.querySelector('#transcript .delivery') !== null", "delivery chips under the answer", 15,
                  diagnostics=PARLEY_DIAGNOSTICS)
    await bp.wait("!document.getElementById('end-session').disabled", "End session enabled", 10,
                  diagnostics=PARLEY_DIAGNOSTICS)
    await page.click("#end-session")
    await bp.wait("document.querySelector('#scorecard .overall-score')?.textContent.trim() === '8'",
                  "the scorecard with the overall score", 20, diagnostics=PARLEY_DIAGNOSTICS)
    users = await page.evaluate("[...document.querySelectorAll('#transcript .line.user')].map(e => e.textContent)")
    assert users == ["In my last team I led the migration to PostgreSQL and we finished early."], users  # no echo twice
    card = await page.evaluate("""() => ({
        feedback: [...document.querySelectorAll('#feedback-panel .feedback-card')].map(e => e.innerText),
        scorecard: document.getElementById('scorecard').innerText,
    })""")
    assert any("A concrete example." in f and "The measured result." in f for f in card["feedback"]), card
    assert "Clear examples." in card["scorecard"] and "Quantify results." in card["scorecard"], card
    await page.screenshot(path=str(artifacts / "scorecard.png"), full_page=True)


async def test_report_and_history_pages_draw_their_charts_for_stored_sessions(parley_server, browser_page, artifacts):
    store = parley_server.app_state.store
    token = "browser-report-token-0123456789abcdef"
    user = await store.user(token)
    ids = []
    for n, scores in enumerate(([4, 5, 6], [6, 7, 7], [8, 8, 9])):
        sid = await store.start_session(user, f"r{n}", "interviewer", "interviewer", {"role": "data-scientist"})
        for i, score in enumerate(scores):
            q = f"Question {i + 1} about models?"
            await store.add_turn(sid, 2 * i + 1, "user", f"My answer {i}.", speech_s=20.0)
            await store.add_turn(sid, 2 * i + 2, "agent", "Thanks.", metrics={"voice_to_voice_ms": 900 - 100 * n})
            wpm = 120 + 10 * n + 2 * i
            await store.add_evaluation(sid, "delivery", {"question_index": i, "words": wpm // 2, "speech_s": 30.0,
                                                         "wpm": wpm, "pace": "ok", "healthy_wpm": [120, 160],
                                                         "fillers": {"count": 3 - n, "per_minute": 9 - 3 * n, "words": {}},
                                                         "long_pauses": 0, "longest_pause_s": 0.3})
            await store.add_evaluation(sid, "feedback", {"question_index": i, "question": q, "answer": f"My answer {i}.",
                                                         "score": score, "good": ["Clear."], "missing": ["Numbers."],
                                                         "better_answer": "Add numbers.", "star": None, "source": "llm"})
        await store.end_session(sid, "completed", {"overall_score": sum(scores) / 3, "questions": [
            {"question": f"Question {i + 1} about models?", "score": s} for i, s in enumerate(scores)],
            "strengths": ["Clear."], "improvements": ["Numbers."], "delivery": {"wpm": 130, "fillers_per_minute": 3},
            "source": "llm", "note": None})
        ids.append(sid)
    bp, page = browser_page, browser_page.page
    await page.add_init_script(f"localStorage.setItem('parley.userToken', {json.dumps(token)})")

    await page.goto(f"{parley_server.url}/sessions/{ids[-1]}")
    await bp.wait("document.body.dataset.ready === 'yes'", "the report to render", 20)
    charts = await page.evaluate("""() => ['chart-answers', 'chart-answer-pace'].map(id => {
        const canvas = document.querySelector('#' + id + ' canvas');
        const chart = canvas && window.Chart && window.Chart.getChart(canvas);
        return chart ? {id, points: chart.data.datasets[0].data.map(Number), w: canvas.width} : {id};
    })""")
    assert charts[0]["points"] == [8, 8, 9] and charts[0]["w"] > 100, charts
    assert charts[1]["points"] == [140, 142, 144], charts
    await page.screenshot(path=str(artifacts / "report.png"), full_page=True)

    await page.goto(f"{parley_server.url}/history?persona=interviewer&role=data-scientist")
    await bp.wait("document.body.dataset.ready === 'yes'", "the history page to render", 20)
    trend = await page.evaluate("""() => {
        const c = window.Chart.getChart(document.querySelector('#chart-score canvas'));
        return {scores: c.data.datasets[0].data.map(Number), statements: document.body.innerText};
    }""")
    assert trend["scores"] == [5, pytest.approx(6.67, abs=0.01), pytest.approx(8.33, abs=0.01)], trend["scores"]
    assert "improved from 5 to 8.33" in trend["statements"]
    await page.screenshot(path=str(artifacts / "history.png"), full_page=True)


async def test_with_access_control_the_page_joins_its_room_with_the_signed_token(
        tiny_whisper_path, fake_llm, loopback_ice, tmp_path, browser_page):
    """An embedding application opens /?room=R#token=<signed token>: the page connects to R with
    it, takes it out of the address bar, and the history page shows that user's session."""
    from conftest import running_server
    from signaling.auth import mint

    secret = "browser-test-secret-0123456789abcdef"
    fake_llm.reply_for = lambda body: "Thank you." if body.get("stream") else "{}"
    async with running_server(tiny_whisper_path, fake_llm, tmp_path, auth_secret=secret) as server:
        bp, page = browser_page, browser_page.page
        token = mint(secret, "ada", "signed-room")
        await page.goto(f"{server.url}/#token={token}")  # the room comes from the token
        await bp.wait("!document.getElementById('start').disabled", "the personas to load", 10,
                      diagnostics=PARLEY_DIAGNOSTICS)
        assert await page.evaluate("location.hash") == ""  # the token left the address bar
        assert await page.evaluate("document.getElementById('room').value") == "signed-room"
        await page.click("#start")
        await bp.wait("document.body.dataset.botReady === 'yes'", "bot-ready", 15, diagnostics=PARLEY_DIAGNOSTICS)
        assert server.app_state.rooms.rooms["signed-room"].owner == "jwt:ada"
        await page.fill("#text-input", "I answered with a signed token.")
        await page.click("#send")
        await bp.wait("[...document.querySelectorAll('#transcript .line.agent')].some(e => e.textContent === 'Thank you.')",
                      "the agent's reply", 15, diagnostics=PARLEY_DIAGNOSTICS)
        await page.goto(f"{server.url}/history")
        await bp.wait("document.body.dataset.ready === 'yes'", "the history page to render", 20)
        rows = await page.evaluate("document.querySelectorAll('#sessions-body tr').length")
        assert rows == 1, await page.evaluate("document.body.innerText")
