"""Manual smoke check of pipecat_page.html + pipecat_bundle.js against a tiny stub bot.

Not a pytest module (needs /usr/bin/chromium): run it by hand after rebuilding the bundle

    /work/venv/bin/python tests/web/pipecat_page_smoke.py            # full WebRTC stub bot
    /work/venv/bin/python tests/web/pipecat_page_smoke.py --reject 400   # offer refused (500: retried)
    /work/venv/bin/python tests/web/pipecat_page_smoke.py --fail-first 1 # one 500, then the retry connects
    /work/venv/bin/python tests/web/pipecat_page_smoke.py --renegotiate  # server asks for a new offer

The stub speaks just enough of the SmallWebRTC + RTVI protocol (aiortc, a 440 Hz tone on the
mid-0 audio transceiver, bot-ready and a few RTVI messages) to show that the unchanged Pipecat
client connects, that the page records what it receives and that the bot audio is audible.
It prints every HTTP request and data-channel message the client sent.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import sys
import time
import uuid
from pathlib import Path

import aioice.ice
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from av import AudioFrame
from playwright.async_api import async_playwright

WEB_DIR = Path(__file__).resolve().parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]

# aioice skips 127.0.0.1 when listing host addresses; loopback is all a sandbox may have.
_orig_host_addresses = aioice.ice.get_host_addresses


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] + _orig_host_addresses(use_ipv4, use_ipv6)


aioice.ice.get_host_addresses = _host_addresses


class Tone(MediaStreamTrack):
    """20 ms frames of a 440 Hz tone at 48 kHz, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        n = 960
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(n) + self._pts) / 48000
        pcm = (0.3 * 32767 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48000)
        self._pts += n
        return frame


def rtvi(type_: str, data: dict | None = None, id_: str | None = None) -> str:
    msg: dict = {"label": "rtvi-ai", "type": type_, "id": id_ or uuid.uuid4().hex[:8]}
    if data is not None:
        msg["data"] = data
    return json.dumps(msg)


class StubBot:
    def __init__(self, reject: int, fail_first: int = 0, renegotiate: bool = False) -> None:
        self.renegotiate = renegotiate
        self.reject = reject
        self.fail_first = fail_first
        self.mic_peak = 0  # loudest sample received from the browser's microphone
        self.http: list[dict] = []
        self.dc_messages: list[str] = []
        self.pcs: dict[str, RTCPeerConnection] = {}

    async def offer(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.http.append({"t": round(time.monotonic(), 2), "method": request.method, "query": dict(request.query), "body": body})
        if request.method == "PATCH":
            pc = self.pcs.get(body["pc_id"])
            if pc is None:
                return web.json_response({"error": "unknown pc_id"}, status=404)
            for c in body["candidates"]:
                cand = candidate_from_sdp(c["candidate"].split(":", 1)[1])
                cand.sdpMid = c["sdp_mid"]
                cand.sdpMLineIndex = c["sdp_mline_index"]
                await pc.addIceCandidate(cand)
            return web.json_response({"status": "ok"})
        if self.reject:
            return web.json_response({"error": "rejected by stub"}, status=self.reject)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "stub: try again"}, status=500)
        if body.get("pc_id") in self.pcs and not body.get("restart_pc"):
            # Renegotiation on the live connection (after a "renegotiate" signalling message).
            pc = self.pcs[body["pc_id"]]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
            await pc.setLocalDescription(await pc.createAnswer())
            return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer", "pc_id": body["pc_id"]})
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc_id = "pc-" + uuid.uuid4().hex[:8]
        self.pcs[pc_id] = pc

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            @channel.on("message")
            def on_message(message) -> None:
                self.dc_messages.append(message)
                if isinstance(message, str) and message.startswith("ping"):
                    return
                msg = json.loads(message)
                if msg.get("type") == "client-ready":
                    channel.send(rtvi("bot-ready", {"version": "2.1.0", "about": {"library": "stub"}}, msg["id"]))
                    channel.send(rtvi("user-started-speaking"))
                    channel.send(rtvi("user-transcription", {"text": "hel", "user_id": "u", "timestamp": "2025-01-01T00:00:00.000Z", "final": False}))
                    channel.send(rtvi("user-transcription", {"text": "hello there", "user_id": "u", "timestamp": "2025-01-01T00:00:01.000Z", "final": True}))
                    channel.send(rtvi("user-stopped-speaking"))
                    channel.send(rtvi("bot-llm-started"))
                    channel.send(rtvi("bot-llm-text", {"text": "Hi, "}))
                    channel.send(rtvi("bot-llm-text", {"text": "welcome."}))
                    channel.send(rtvi("bot-llm-stopped"))
                    channel.send(rtvi("bot-started-speaking"))
                    channel.send(rtvi("bot-output", {"text": "Hi, welcome.", "spoken": True, "aggregated_by": "sentence"}))
                    channel.send(rtvi("bot-tts-text", {"text": "Hi,"}))
                    channel.send(rtvi("metrics", {"ttfb": [{"processor": "stub-llm", "value": 0.12}]}))
                    channel.send(rtvi("error", {"error": "stub non-fatal error", "fatal": False}))
                    if self.renegotiate:
                        channel.send(json.dumps({"type": "signalling", "message": {"type": "renegotiate"}}))

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind != "audio":
                return

            async def consume() -> None:
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    self.mic_peak = max(self.mic_peak, int(np.abs(frame.to_ndarray()).max()))

            asyncio.ensure_future(consume())

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        audio = pc.getTransceivers()[0]
        audio.direction = "sendrecv"
        audio.sender.replaceTrack(Tone())
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer", "pc_id": pc_id})


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reject", type=int, default=0, metavar="STATUS", help="answer every offer with this HTTP status")
    ap.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer the first N offers with 500")
    ap.add_argument("--renegotiate", action="store_true", help="send a renegotiate signalling message")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    bot = StubBot(args.reject, args.fail_first, args.renegotiate)
    app = web.Application()
    app.router.add_route("*", "/api/offer", bot.offer)
    app.router.add_static("/web/", WEB_DIR)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    ok = True
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = await browser.new_page()
            logs: list[str] = []
            page.on("console", lambda m: logs.append(f"console.{m.type}: {m.text}"))
            page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
            await page.goto(f"http://127.0.0.1:{args.port}/web/pipecat_page.html?room=r1&persona=interviewer")
            if args.reject:
                await page.wait_for_function("document.getElementById('connected').textContent === 'failed'", timeout=30000)
            else:
                await page.wait_for_function("document.getElementById('bot-ready').textContent === 'yes'", timeout=30000)
                await page.wait_for_function("parseFloat(document.getElementById('bot-level').textContent) > 0.05", timeout=10000)
                await asyncio.sleep(1.5)  # let a few pings and the trackStatus messages through
            result = await page.evaluate(
                """() => ({
                    state: document.getElementById('state').textContent,
                    connected: document.getElementById('connected').textContent,
                    botReady: document.getElementById('bot-ready').textContent,
                    userTranscript: document.getElementById('user-transcript').innerText,
                    botText: document.getElementById('bot-text').innerText,
                    botLlmText: document.getElementById('bot-llm-text').textContent,
                    botLevel: document.getElementById('bot-level').textContent,
                    errors: document.getElementById('errors').innerText,
                    events: window.pipecatEvents.map(e => e.type),
                    sent: window.pipecatSent,
                    micSender: window.parley.transport.pc
                        ? String(window.parley.transport.pc.getTransceivers()[0].sender.track?.readyState)
                        : null,
                })"""
            )
            await browser.close()
        print(json.dumps(result, indent=1))
        print("mic peak received by the stub:", bot.mic_peak)
        for h in bot.http:
            if h["body"] and "sdp" in h["body"]:
                h = {**h, "body": {**h["body"], "sdp": h["body"]["sdp"][:40] + "..."}}
            print("HTTP", json.dumps(h))
        for m in bot.dc_messages[:6]:
            print("DC", m)
        print("\n".join(logs[-15:]))
        if not args.reject:
            ok = (
                result["botReady"] == "yes"
                and result["connected"] == "yes"
                and "hello there" in result["userTranscript"]
                and "Hi, welcome." in result["botText"]
                and float(result["botLevel"]) > 0.05
                and result["micSender"] == "live"
                and bot.mic_peak > 1000
            )
            if args.renegotiate:
                offers = [h for h in bot.http if h["method"] == "POST"]
                ok = ok and len(offers) == 2 and offers[1]["body"]["pc_id"] in bot.pcs
                ok = ok and offers[1]["body"]["restart_pc"] is False
        else:
            ok = result["connected"] == "failed" and bool(result["errors"])
    finally:
        for pc in bot.pcs.values():
            await pc.close()
        await runner.cleanup()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
