"""Transport latency: one way, mouth -> pipeline and pipeline -> ear, through aiortc on loopback.

    python bench/transport.py [--seconds 40] [--smoke]        (or: parley bench transport ...)

One aiortc client talks to a Parley server in a child process (bench/_harness.py ``serve --probe``);
both run on this host, so ``time.monotonic()`` is one clock for both.

- mouth -> pipeline: the client's microphone sends a 100 ms 1 kHz tone burst every 0.6 s (+-0.1 s)
  through aiortc's own Opus encoder, like a browser sends a microphone. "Mouth" is when the track
  hands the burst's first frame to aiortc; the server notes when the frame holding the onset
  reaches the pipeline (``Conversation.push_audio``)
  and when the RTP packet that carried it arrived at its receiver. A real microphone adds its own
  framing before "mouth" (a 20 ms frame exists only once its last sample is captured).
- pipeline -> ear: the server's player emits the same burst on its own schedule (and silence
  otherwise); "pipeline" is when the burst's first frame leaves ``Conversation.read_frame``. The client
  notes when the RTP packet arrives (the "wire" figure: everything on the server's side) and when
  aiortc's receiver hands it the decoded frame. That last hop is aiortc's client-side jitter buffer
  (it holds each packet until 4 more have arrived); a browser's NetEQ replaces it in production.

Each direction is reported as p50/p95/max over all bursts, split at the packet's arrival, for the
server as shipped ("parley") and with aiortc's own audio paths (``serve --aiortc-defaults``: its
receive jitter buffer, decoder thread and encoder thread; agent/peer.py ``FAST_PATHS``); each
also with ``--loss`` (1 %) of the client's RTP packets dropped before they leave (loopback loses
nothing by itself; real networks do), and Parley once more while ``--load`` other rooms talk
(bench/rooms.py's clients; that run's server has the instant stand-in STT, so that the figure is
the transport's and not the tiny Whisper's CPU). Results go to bench/results/transport.json.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import FRAME, ONSET, ROOT, MicClock, Server, patch_loopback_ice, save_result, tone_frame  # noqa: E402

TIME_BASE = fractions.Fraction(1, 48000)
PERIOD_S, BURST_FRAMES = 0.6, 5
MATCH_S = 0.5  # an onset belongs to the latest burst sent less than this long before it
TARGET_MS = 60
PROBE_ROOM = "transport-probe"


class RtpArrivals:
    """When each RTP packet of this process's (one) audio receiver arrived, by RTP timestamp."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.arrival: dict[int, float] = {}

    def install(self) -> None:
        from aiortc.rtcrtpreceiver import RTCRtpReceiver

        handle, arrivals = RTCRtpReceiver._handle_rtp_packet, self

        async def handle_rtp_packet(self, packet, arrival_time_ms):
            if arrivals.first is None:
                arrivals.first = packet.timestamp
            arrivals.arrival[packet.timestamp] = time.monotonic()
            return await handle(self, packet, arrival_time_ms)

        RTCRtpReceiver._handle_rtp_packet = handle_rtp_packet

    def of_pts(self, pts: int) -> float | None:
        """aiortc's decoded frames count ``pts`` from the first packet's RTP timestamp."""
        return None if self.first is None else self.arrival.get((self.first + pts) % (1 << 32))


def make_burst_mic():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError
    import av

    class BurstMic(MediaStreamTrack):
        """A microphone on the real-time clock: silence, and a tone burst every ~0.6 s."""

        kind = "audio"

        def __init__(self):
            super().__init__()
            self.silence = np.zeros(FRAME * 2, np.int16)
            self.tone = tone_frame(FRAME, channels=2)
            self.clock = MicClock()
            self.left = 0
            self.next = 0.0
            self.sent: list[float] = []
            self.sent_pts: list[int] = []
            self.rng = random.Random(2)

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            pts = await self.clock.tick()
            now = time.monotonic()
            if pts == 0:
                self.next = now + 1.0  # the first burst a second in
            if self.left:
                self.left -= 1
                pcm = self.tone
            elif now >= self.next:
                self.left = BURST_FRAMES - 1
                self.next = now + PERIOD_S + self.rng.uniform(-0.1, 0.1)
                pcm = self.tone
                self.sent.append(now)  # the instant the onset frame is handed to aiortc
                self.sent_pts.append(pts)
            else:
                pcm = self.silence
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, pts, TIME_BASE
            return frame

    return BurstMic()


class ProbeClient:
    def __init__(self, url: str, arrivals: RtpArrivals, room: str = "transport"):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url, self.room, self.arrivals = url, room, arrivals
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = make_burst_mic()
        self.heard: list[dict] = []  # onsets in the agent's audio
        self.measuring = False
        self._quiet = 0
        self._reader: asyncio.Task | None = None
        self.ready = asyncio.Event()

    async def connect(self) -> None:
        import httpx
        from aiortc import RTCSessionDescription

        self.pc.addTrack(self.mic)
        channel = self.pc.createDataChannel("chat", ordered=True)
        channel.on("open", lambda: channel.send(json.dumps(
            {"label": "rtvi-ai", "type": "client-ready", "id": "1", "data": {"version": "2.1.0", "about": {}}})))
        channel.on("message", lambda m: self.ready.set() if '"bot-ready"' in m else None)
        self.pc.on("track", lambda t: setattr(self, "_reader", asyncio.get_running_loop().create_task(self._read(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=20) as http:
            r = await http.post(f"{self.url}/api/offer", json={
                "sdp": self.pc.localDescription.sdp, "type": "offer", "requestData": {"room": self.room}})
        r.raise_for_status()
        await self.pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
        await asyncio.wait_for(self.ready.wait(), 30)

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                t = time.monotonic()
                loud = int(np.abs(frame.to_ndarray()).max()) > ONSET
                if loud and self._quiet >= 3 and self.measuring:
                    self.heard.append({"t": t, "rtp_arrival": self.arrivals.of_pts(frame.pts)})
                self._quiet = 0 if loud else self._quiet + 1
        except MediaStreamError:
            pass

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def match(starts: list[float], onsets: list[dict]) -> list[dict]:
    """Each onset with the latest start before it (within MATCH_S); starts matched once."""
    out, used = [], set()
    for o in onsets:
        i = int(np.searchsorted(starts, o["t"])) - 1
        if i >= 0 and i not in used and o["t"] - starts[i] < MATCH_S:
            used.add(i)
            total = (o["t"] - starts[i]) * 1000
            wire = (o["rtp_arrival"] - starts[i]) * 1000 if o.get("rtp_arrival") else None
            out.append({"total": total, "wire": wire, "after_arrival": None if wire is None else total - wire})
    return out


def stats(rows: list[dict], key: str) -> dict:
    v = [r[key] for r in rows if r[key] is not None]
    if not v:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    return {"p50": round(float(np.percentile(v, 50)), 1), "p95": round(float(np.percentile(v, 95)), 1),
            "max": round(float(np.max(v)), 1), "n": len(v)}


class Sender:
    """This process's outgoing RTP media packets (RTCP and data untouched): when each one went to
    the socket, by RTP timestamp, and a share of them dropped on purpose (``rate``)."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.dropped = 0
        self.first: int | None = None
        self.sent: dict[int, float] = {}
        self._rng = random.Random(3)

    def install(self) -> None:
        from aiortc.rtcdtlstransport import RTCDtlsTransport

        send, sender = RTCDtlsTransport._send_rtp, self

        async def send_rtp(self, data: bytes) -> None:
            if len(data) >= 12 and 96 <= data[1] & 0x7F <= 127:  # dynamic payload type: media (RTCP: 200-204)
                if sender.rate and sender._rng.random() < sender.rate:
                    sender.dropped += 1
                    return
                ts = int.from_bytes(data[4:8], "big")
                if sender.first is None:
                    sender.first = ts
                sender.sent[ts] = time.monotonic()
            await send(self, data)

        RTCDtlsTransport._send_rtp = send_rtp

    def of_pts(self, pts: int) -> float | None:
        """aiortc's sender stamps packets with the track's pts from a random origin (the first packet)."""
        return None if self.first is None else self.sent.get((self.first + pts) % (1 << 32))


async def run_variant(name: str, llm_url: str, seconds: float, aiortc_defaults: bool = False, loss: float = 0.0,
                      load: int = 0, stt: str = "tiny") -> dict:
    import httpx

    from rooms import Worker

    with tempfile.TemporaryDirectory(prefix="parley-transport-") as tmp:
        server = Server(llm_url, Path(tmp), probe=PROBE_ROOM, aiortc_defaults=aiortc_defaults, stt=stt)
        workers = []
        try:
            await server.start()
            if load:  # other rooms talking meanwhile, from client processes of their own
                rooms = [f"load-{i}" for i in range(load)]
                workers = [await Worker.start(server.url, rooms[i:i + 10], i) for i in range(0, load, 10)]
                for w in workers:
                    await w.read(timeout=60 + 2 * load)
                now = time.monotonic()
                for w in workers:
                    w.send({"talk": now, "t0": now + 3, "t1": now + 3 + seconds + 10})
            client = ProbeClient(server.url, ARRIVALS, PROBE_ROOM)
            ARRIVALS.first, ARRIVALS.arrival = None, {}
            SENDER.rate, SENDER.dropped, SENDER.first, SENDER.sent = loss, 0, None, {}
            try:
                await client.connect()
                await asyncio.sleep(1.0)  # past the connection's first second
                t0 = time.monotonic()
                client.measuring = True
                await asyncio.sleep(seconds)  # bursts flow both ways meanwhile: the measurement itself
                client.measuring = False
                async with httpx.AsyncClient(timeout=10) as http:
                    probe = (await http.get(f"{server.url}/bench/probe")).json()
            finally:
                SENDER.rate = 0.0
                await client.close()
            for w in workers:
                w.send({"stop": True})
                await w.read(timeout=30)
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
            await server.stop()
    sent = [t for t in client.mic.sent if t >= t0]
    up = match(sent, [o for o in probe["onsets"] if o["t"] >= t0])
    on_wire = [(SENDER.of_pts(p), t) for t, p in zip(client.mic.sent, client.mic.sent_pts) if t >= t0]
    encode = [(w - t) * 1000 for w, t in on_wire if w is not None]
    down = match([t for t in probe["bursts"] if t >= t0 - MATCH_S], client.heard)
    return {
        "variant": name, "aiortc_defaults": aiortc_defaults, "upstream_loss": loss, "rtp_dropped": SENDER.dropped,
        "background_rooms": load, "stt": stt, "seconds": seconds,
        "bursts_sent": len(sent), "bursts_heard_by_pipeline": len(up),
        "bursts_played": sum(1 for t in probe["bursts"] if t >= t0), "bursts_heard_by_client": len(down),
        "mouth_to_pipeline_ms": stats(up, "total"),
        "mouth_to_server_socket_ms": stats(up, "wire"),
        "of_which_client_encode_and_send_ms": stats([{"v": v} for v in encode], "v"),
        "server_socket_to_pipeline_ms": stats(up, "after_arrival"),
        "pipeline_to_ear_ms": stats(down, "total"),
        "pipeline_to_client_socket_ms": stats(down, "wire"),
        "client_socket_to_decoded_ms": stats(down, "after_arrival"),
    }


ARRIVALS = RtpArrivals()
SENDER = Sender()


async def run(seconds: float, load: int, variants: list[str], loss: float) -> dict:
    from fake_llm import FakeLLM

    patch_loopback_ice()
    ARRIVALS.install()
    SENDER.install()
    llm = await FakeLLM().start()
    runs = []
    try:
        for v in variants:
            aiortc = v == "aiortc"
            label = "aiortc defaults" if aiortc else "parley"
            runs.append(await run_variant(label, llm.url, seconds, aiortc_defaults=aiortc))
            if loss:
                runs.append(await run_variant(f"{label}, {loss:.0%} upstream loss", llm.url, seconds,
                                              aiortc_defaults=aiortc, loss=loss))
        if load:
            # Instant STT: 20 rooms of the tiny Whisper alone would take this 2-core machine's second
            # core (bench/rooms.py), and the figure would be about CPU starvation, not the transport.
            runs.append(await run_variant(f"parley, {load} other rooms talking", llm.url, seconds, load=load,
                                          stt="instant"))
    finally:
        await llm.stop()
    return {
        "benchmark": "one-way transport latency through aiortc on loopback (tone bursts, monotonic clock "
                     "shared by client and server processes)",
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "target_one_way_ms": TARGET_MS, "runs": runs,
    }


def table(result: dict) -> str:
    def cell(d: dict) -> str:
        return f"{str(d['p50']):>5} / {str(d['p95']):<5}"

    head = (f"{'server':<36} {'n':>3} | {'mouth->pipeline':^13} = {'->socket':^13} ({'client':^5}) + "
            f"{'->pipeline':^13} | {'pipeline->ear':^13} = {'->socket':^13} + {'->decoded':^13}")
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        lines.append(
            f"{r['variant']:<36} {r['mouth_to_pipeline_ms']['n']:>3} | {cell(r['mouth_to_pipeline_ms'])} = "
            f"{cell(r['mouth_to_server_socket_ms'])} ({str(r['of_which_client_encode_and_send_ms']['p50']):>5}) + "
            f"{cell(r['server_socket_to_pipeline_ms'])} | {cell(r['pipeline_to_ear_ms'])} = "
            f"{cell(r['pipeline_to_client_socket_ms'])} + {cell(r['client_socket_to_decoded_ms'])}")
    lines.append("ms, p50 / p95. ->socket: until the other process's receiver handles the RTP packet (client: "
                 "p50 of the test client's own encode and send, included); ->decoded: the aiortc test "
                 "client's jitter buffer and decoder (a browser has its own)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per server configuration")
    ap.add_argument("--load", type=int, default=20, help="rooms talking in the background for the third run "
                                                         "(0: skip it)")
    ap.add_argument("--variants", nargs="*", default=["parley", "aiortc"], choices=["parley", "aiortc"])
    ap.add_argument("--loss", type=float, default=0.01, help="share of the client's RTP packets dropped in "
                                                              "the extra lossy runs (0: none)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds, Parley's configuration only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.load, args.variants, args.loss = 4.0, 0, ["parley"], 0.0
    out = args.out or ROOT / "bench" / "results" / ("transport-smoke.json" if args.smoke else "transport.json")
    result = asyncio.run(run(args.seconds, args.load, args.variants, args.loss))
    result["smoke"] = args.smoke
    print(table(result))
    save_result(out, result)


if __name__ == "__main__":
    main()
