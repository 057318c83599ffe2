"""What bench/rooms.py and bench/transport.py share (not a benchmark: the ``_`` keeps it out of
``parley bench``): a real Parley server in its own process, and light aiortc clients that talk to it
over loopback.

    python bench/_harness.py serve --port P --llm URL --stt PATH|instant [--tts tone|espeak] [--probe ROOM]
    python bench/_harness.py clients --url URL --rooms a,b,c [--seed S]   (a rooms-bench worker)

The server child runs what ``parley serve`` runs (``create_app`` under uvicorn with its default
event loop, uvloop; the real VAD, turn-taking, persona, store and aiortc peers), with stand-ins for
paid services only: the LLM is a local OpenAI-compatible server (tests/fake_llm.py, instant replies),
the TTS an instant tone (or the real espeak-ng), the STT the tiny random-weight Whisper built by
tests/tiny_whisper.py through the real faster-whisper. On a loopback-only host aioice must see
127.0.0.1 as a host address (DESIGN.md).

Clients are real aiortc peers (ICE, DTLS, SRTP, RTP, RTCP, data channel, the Pipecat/RTVI
handshake). To leave the two cores to the server, a rooms-bench client does not run an Opus encoder
per room: its microphone hands aiortc Opus packets encoded once per process from a real recording
(the server receives exactly what a live encoder would send), and its receiver does not decode the
agent's audio (it counts packets and their timestamps, which is what gaps are made of).
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import random
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FRAME = 960  # 20 ms at 48 kHz
TIME_BASE = fractions.Fraction(1, 48000)
RECORDING = ROOT / "tests" / "data" / "en_goforward.wav"  # 2.8 s, speech from 0.5 s to 2.4 s


def patch_loopback_ice() -> None:
    """aioice finds no candidates on a loopback-only host unless 127.0.0.1 is a host address."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]


def pinned(cpus: set[int] | None):
    """A ``preexec_fn`` that confines a child process to ``cpus`` before it starts any thread (every
    thread and process it makes inherits the set); None when unconfined."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def tiny_whisper() -> Path:
    """The tests' tiny random-weight Whisper (built once into the same cache the tests use)."""
    from platformdirs import user_cache_dir

    from tiny_whisper import build

    cache = Path(os.environ.get("PARLEY_TEST_CACHE", user_cache_dir("parley"))) / "test-models"
    return build(cache / "tiny-whisper-v1")


def sleep_until(t: float):
    return asyncio.sleep(max(t - time.monotonic(), 0))  # waiting for a wall-clock instant, not an event


def save_result(out: Path, result: dict) -> None:
    """Write a benchmark's JSON and say where (every bench reports the same way)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


# ---------------------------------------------------------------------------------------- server


class ToneTTS:
    """An instant stand-in TTS: a 0.6 s 220 Hz tone per sentence at 24 kHz (edge-tts's rate)."""

    name = "tone"

    def __init__(self, seconds: float = 0.6, rate: int = 24000):
        t = np.arange(int(seconds * rate)) / rate
        self.pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        self.rate, self.seconds = rate, seconds

    async def synthesize(self, text: str, language: str, voice: str | None = None):
        from pipeline.tts import TTSChunk, Word

        words = text.split()
        yield TTSChunk(self.pcm, self.rate, [Word(w, self.seconds * i / len(words)) for i, w in enumerate(words)])


class InstantSTT:
    """``serve --stt instant``: a fixed transcript at once, so that the server's CPU is Parley's own
    (transport, VAD, pipeline) and none of it a speech model's. Duck-types the engine."""

    queue_depth = 0

    async def warm_up(self) -> None:
        pass

    async def transcribe(self, audio, *, final: bool, language: str | None = None, prompt: str | None = None,
                         urgent: bool = False):
        from pipeline.stt import STTResult

        return STTResult("I led the migration of our billing service to a new database.", language, 0.0, 0.0,
                         len(audio) / 16000, 0.0)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Probe:
    """Server-side timestamps for bench/transport.py (installed only with ``serve --probe``), for the
    one room named ``room`` (other rooms, the background load, run untouched):

    - mouth -> pipeline: when the frame holding the onset of each of the client's tone bursts reaches
      the pipeline (``Conversation.push_audio``), and when the RTP packet that carried it arrived at
      the room's receiver;
    - pipeline -> ear: the room's ``Conversation.read_frame`` emits a tone burst every ``period_s``
      (and silence otherwise, so replies never mix in); the time the burst's first frame left it.
    """

    def __init__(self, app, room: str, period_s: float = 0.6, burst_frames: int = 5):
        self.app, self.room = app, room
        self.period_s, self.burst_frames = period_s, burst_frames
        self.onsets: list[dict] = []
        self.bursts: list[float] = []
        self.rtp_first: int | None = None
        self.rtp_arrival: dict[int, float] = {}
        self._receiver = None
        self._pts: int | None = None
        self._quiet = 0
        self._left = 0
        self._next = 0.0
        self._rng = random.Random(1)

    def install(self) -> None:
        from aiortc.rtcrtpreceiver import RTCRtpReceiver

        import agent.peer as peer_mod
        from pipeline.conversation import Conversation
        from pipeline.frames import OUTPUT_FRAME_SAMPLES

        probe = self
        handle, to_frame = RTCRtpReceiver._handle_rtp_packet, peer_mod.audio_frame
        push, read = Conversation.push_audio, Conversation.read_frame
        burst = tone_frame(OUTPUT_FRAME_SAMPLES, channels=1)
        silence = np.zeros(OUTPUT_FRAME_SAMPLES, np.int16)

        async def handle_rtp_packet(self, packet, arrival_time_ms):
            if self is probe.receiver():
                probe.on_rtp(packet.timestamp)
            return await handle(self, packet, arrival_time_ms)

        def audio_frame(frame):
            probe._pts = frame.pts  # Peer._read passes the result straight to push_audio
            return to_frame(frame)

        def push_audio(self, frame):
            if self.name == probe.room:
                probe.on_input(frame.pcm, probe._pts)
            return push(self, frame)

        def read_frame(self):
            out = read(self)  # the player keeps its own state
            if self.name != probe.room:
                return out
            return burst if probe.next_output() else silence

        RTCRtpReceiver._handle_rtp_packet = handle_rtp_packet
        peer_mod.audio_frame = audio_frame
        Conversation.push_audio, Conversation.read_frame = push_audio, read_frame

    def receiver(self):
        if self._receiver is None:
            room = getattr(self.app.state, "rooms", None) and self.app.state.rooms.rooms.get(self.room)
            if room is not None and room.peer is not None:
                self._receiver = next((t.receiver for t in room.peer.pc.getTransceivers() if t.kind == "audio"), None)
        return self._receiver

    def on_rtp(self, timestamp: int) -> None:
        if self.rtp_first is None:
            self.rtp_first = timestamp
        self.rtp_arrival[timestamp] = time.monotonic()
        if len(self.rtp_arrival) > 4000:
            del self.rtp_arrival[next(iter(self.rtp_arrival))]

    def on_input(self, pcm: np.ndarray, pts: int | None) -> None:
        t = time.monotonic()
        loud = int(np.abs(pcm).max()) > ONSET
        if loud and self._quiet >= 3:
            arrival = None
            if pts is not None and self.rtp_first is not None:
                arrival = self.rtp_arrival.get((self.rtp_first + pts) % (1 << 32))
            self.onsets.append({"t": t, "rtp_arrival": arrival})
        self._quiet = 0 if loud else self._quiet + 1

    def next_output(self) -> bool:
        if self._left:
            self._left -= 1
            return True
        now = time.monotonic()
        if now >= self._next:
            self.bursts.append(now)
            self._left = self.burst_frames - 1
            self._next = now + self.period_s + self._rng.uniform(-0.1, 0.1)
            return True
        return False

    def report(self) -> dict:
        return {"onsets": self.onsets, "bursts": self.bursts}


class Timeline:
    """Server-side clock readings for bench/latency.py (``serve --timeline``), per room: every
    pipeline event as the room emits it (``at`` is ``time.monotonic()``, which all processes on the
    host share, so the client can set them against its own), and the instant the first audible
    sample of each stretch of agent audio left ``Conversation.read_frame`` (the frame's hand-over to
    the voice track, plus the sample's offset in it). Also applies the bench's turn-taking settings
    to every conversation as it is built, and reports the ones in effect."""

    AUDIBLE = 328  # int16, -40 dBFS: what counts as sound (bench/latency.py uses the same)

    def __init__(self, endpoint_ms: int | None, overrides: list[str]):
        self.endpoint_ms, self.overrides = endpoint_ms, overrides
        self.events: dict[str, list[dict]] = {}
        self.onsets: dict[str, list[float]] = {}
        self.config: dict[str, dict] = {}
        self._quiet: dict[str, bool] = {}

    def install(self) -> None:
        import dataclasses

        import agent.room as room_mod
        from pipeline.conversation import Conversation
        from pipeline.player import SILENCE

        timeline, on_event, build, read = self, room_mod.Room._on_event, room_mod.build_conversation, \
            Conversation.read_frame

        def _on_event(room, ev) -> None:
            timeline.record(room.id, ev)
            on_event(room, ev)

        def build_conversation(persona, *args, **kwargs):
            if timeline.endpoint_ms:  # the persona's own endpoint otherwise wins over the server's
                persona = dataclasses.replace(persona, config=dataclasses.replace(
                    persona.config, endpoint_silence_ms=timeline.endpoint_ms))
            conv = build(persona, *args, **kwargs)
            timeline.apply(conv)
            return conv

        def read_frame(conv):
            pcm = read(conv)
            t = time.monotonic()
            if pcm is SILENCE:
                timeline._quiet[conv.name] = True
            else:
                loud = np.flatnonzero(np.abs(pcm) > timeline.AUDIBLE)
                if len(loud) and timeline._quiet.get(conv.name, True):
                    timeline.onsets.setdefault(conv.name, []).append(t + loud[0] / 48000)
                timeline._quiet[conv.name] = not len(loud)
            return pcm

        room_mod.Room._on_event = _on_event
        room_mod.build_conversation = build_conversation
        Conversation.read_frame = read_frame

    def apply(self, conv) -> None:
        """``--turn`` overrides onto whichever of the conversation's option objects has the field."""
        import dataclasses

        from pipeline.vad import Segmenter

        for kv in self.overrides:
            path, value = kv.split("=", 1)
            for attr in ("options", "config", "vad_options"):
                obj = getattr(conv, attr)
                new = _replace_path(obj, path.split("."), value)
                if new is not None:
                    setattr(conv, attr, new)
                    if attr == "vad_options":  # the segmenter keeps its own reference
                        conv.segmenter = Segmenter(new, conv.segmenter.vad)
                    break
            else:
                raise SystemExit(f"--turn {kv}: no such field in TurnOptions, ConversationConfig or VADOptions")
        skip = {"system_prompt", "greeting", "stt_prompt", "llm_fallback_line"}
        self.config[conv.name] = {
            attr: {k: v for k, v in dataclasses.asdict(getattr(conv, attr)).items() if k not in skip}
            for attr in ("options", "vad_options", "config") if dataclasses.is_dataclass(getattr(conv, attr, None))}

    def record(self, room: str, ev) -> None:
        import dataclasses

        row = {"type": type(ev).__name__, "at": ev.at}
        for f in dataclasses.fields(ev):
            v = getattr(ev, f.name)
            if isinstance(v, (int, float, str, bool)) or v is None:
                row[f.name] = v[:80] if isinstance(v, str) else v
        self.events.setdefault(room, []).append(row)

    def report(self, room: str) -> dict:
        return {"events": self.events.get(room, []), "onsets": self.onsets.get(room, []),
                "config": self.config.get(room, {})}


def _replace_path(obj, path: list[str], value: str):
    """``obj`` with the (nested, frozen) dataclass field at ``path`` set to ``value`` converted to
    the field's current type; None if there is no such field."""
    import dataclasses

    if not dataclasses.is_dataclass(obj) or path[0] not in {f.name for f in dataclasses.fields(obj)}:
        return None
    current = getattr(obj, path[0])
    if len(path) > 1:
        inner = _replace_path(current, path[1:], value)
        return None if inner is None else dataclasses.replace(obj, **{path[0]: inner})
    if isinstance(current, bool):
        new = value.lower() in ("1", "true", "on", "yes")
    elif current is None:
        new = None if value.lower() == "none" else _number(value)
    else:
        new = type(current)(value)
    return dataclasses.replace(obj, **{path[0]: new})


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def sound_db(x: np.ndarray, speech: slice = slice(None)) -> tuple[np.ndarray, float]:
    """Energy in dB per 10 ms (smoothed over 30 ms) of 16 kHz audio, and the level that counts as
    the speech's sound: within 35 dB of its loud part (the 10 ms steps in ``speech``, when known)
    and 6 dB over the whole audio's noise floor. The benches' one measure of where speech starts
    and ends (bench/latency.py ``speech_bounds``)."""
    hop = 160
    n = len(x) // hop
    power = np.mean(x[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1) if n else np.zeros(1)
    db = 10 * np.log10(np.convolve(power, np.ones(3) / 3, mode="same") + 1e-12)
    return db, max(float(np.percentile(db, 10)) + 6, float(np.percentile(db[speech], 90)) - 35)


class ReferenceTextSTT:
    """``serve --text reference``: the real engine decodes every request (its time is real), but
    the text handed on is what bench/latency.py says the person is saying (``POST /bench/say``),
    cut to the share of the words whose time has come in the audio, as a model writes what it
    heard. The speech's onset is found in the audio itself (by energy, as the bench found the
    recording's): the segment's pre-roll varies by a window or two with Silero's trigger, and a
    pause transcribed ~60 ms after the last sound must not lose its last word to that error. A
    random-weight Whisper's text is noise, and a semantic end of turn reads the words; a real
    model would write much the same thing (with Whisper's capital and full stop). One room at a time."""

    PRE_ROLL_S = 0.3  # the VAD keeps this much before the onset (pipeline/vad.py): when none is found

    def __init__(self, engine):
        self.engine = engine
        self.text, self.speech_s = "", 1.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def expect(self, said: dict) -> dict:
        self.text, self.speech_s = said["text"], max(float(said["speech_s"]), 0.1)
        return {"ok": True}

    async def transcribe(self, audio, *, final: bool, language: str | None = None, prompt: str | None = None,
                         urgent: bool = False):
        import dataclasses

        result = await self.engine.transcribe(audio, final=final, language=language, prompt=prompt, urgent=urgent)
        if result is None or not self.text:
            return result
        words = self.text.split()
        db, level = sound_db(audio)
        loud = np.flatnonzero(db >= level)
        onset = loud[0] / 100 if len(loud) else self.PRE_ROLL_S
        spoken = (len(audio) / 16000 - onset) / self.speech_s
        # A final cut short by an early end of turn gets only the words said by then, like a model.
        n = len(words) if spoken >= (0.85 if final else 1.0) else max(0, int(len(words) * spoken))
        text = " ".join(words[:n])
        if n < len(words):
            text = text.rstrip(".,!?")
        return dataclasses.replace(result, text=text)


ONSET = 3000  # int16 peak that counts as the burst (the bursts peak at ~16000, silence at 0)


def tone_frame(samples: int, channels: int, amplitude: float = 0.5, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(samples) / 48000
    x = (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    return np.repeat(x, channels) if channels > 1 else x


def serve_front(args: argparse.Namespace) -> None:
    """``serve --workers N``: the product's front, its workers this harness's instrumented servers
    (the same arguments, on the front's Unix sockets); /bench/rooms and /bench/threads answer for all."""
    import uvicorn
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from agent.config import Settings
    from signaling.front import create_front

    tmp = Path(args.workdir)
    settings = Settings(host="127.0.0.1", port=args.port, max_rooms=1000, log_level="warning",
                        database_url=f"sqlite+aiosqlite:///{tmp}/parley.db", _env_file=None)
    rest, skip = [], False
    for a in sys.argv[2:]:  # this command's own arguments, less the front's
        if skip:
            skip = False
        elif a in ("--workers", "--port"):
            skip = True
        elif not a.startswith(("--workers=", "--port=")):
            rest.append(a)
    argv = lambda i, path: [sys.executable, str(Path(__file__).resolve()), "serve", "--port", "0", *rest,  # noqa: E731
                            "--uds", path]
    app = create_front(settings, args.workers, worker_argv=argv, stt_worker=False)

    async def merged(request):
        out = {}
        for r in await request.app.state.front.each(request.url.path):
            if r is not None and r.status_code == 200:
                out.update(r.json())
        if request.url.path == "/bench/threads":
            import threading

            out.update({str(t.native_id): t.name for t in threading.enumerate()})
        return JSONResponse(out)

    app.router.routes[:0] = [Route("/bench/rooms", merged), Route("/bench/threads", merged)]
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    if args.workers > 1:
        return serve_front(args)

    from agent.config import Settings
    from agent.engines import build_engines
    from signaling.app import create_app

    patch_loopback_ice()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tmp = Path(args.workdir)
    fields = dict(host="127.0.0.1", port=args.port, stt_model=args.stt if args.stt != "instant" else "base",
                  stt_device="cpu",
                  stt_max_new_tokens=args.stt_max_new_tokens or None, llm_base_url=args.llm, llm_api_key="bench",
                  llm_model="bench", tts="espeak", room_grace_s=1.0, max_rooms=1000,
                  database_url=f"sqlite+aiosqlite:///{tmp}/parley.db", audio_dir=str(tmp / "audio"),
                  log_level="warning")
    fields.update(kv.split("=", 1) for kv in args.setting)  # pydantic converts the strings
    settings = Settings(**fields, _env_file=None)
    engines = build_engines(settings)
    if args.tts == "tone":
        engines.tts = ToneTTS()
    if args.stt == "instant":
        engines.stt = InstantSTT()
    if args.aiortc_defaults:
        import agent.peer as peer_mod

        peer_mod.FAST_PATHS = False  # aiortc's own receive buffer, decoder thread and encoder
    app = create_app(settings, engines)

    def threads() -> dict[int, str]:
        """Python's names for this process's threads, so the parent can split the CPU it measures."""
        import threading

        return {t.native_id: t.name for t in threading.enumerate()}

    app.add_api_route("/bench/threads", threads, methods=["GET"])

    def rooms() -> dict[str, dict]:
        """Every room's voice-track counters and turn latencies in one small answer: asking
        /api/rooms/{id} for each of 50 rooms at the start of a measurement would itself stall the
        event loop for tens of milliseconds and make the late frames it then counts."""
        out = {}
        for room_id, room in app.state.rooms.rooms.items():
            voice = room.peer.voice if room.peer is not None else None
            out[room_id] = {
                "frames": getattr(voice, "frames", 0), "late_frames": getattr(voice, "late_frames", 0),
                "resyncs": getattr(voice, "resyncs", 0), "player_underruns": room.conversation.player.underruns,
                "turns": [[m.at, m.pipeline_ms] for m in room.conversation.metrics if m.pipeline_ms is not None]}
        return out

    app.add_api_route("/bench/rooms", rooms, methods=["GET"])

    gc_pauses: list[tuple[int, float]] = []  # (generation, milliseconds) of collections over 5 ms
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        elif (d := time.perf_counter() - gc_start[0]) > 0.005:
            gc_pauses.append((info["generation"], round(d * 1000, 1)))

    import gc

    gc.callbacks.append(on_gc)
    app.add_api_route("/bench/gc", lambda: {"pauses_ms": gc_pauses[-200:], "count": gc.get_count(),
                                            "stats": gc.get_stats()}, methods=["GET"])
    if args.timeline:
        timeline = Timeline(args.endpoint_ms, args.turn)
        timeline.install()
        app.add_api_route("/bench/timeline/{room}", timeline.report, methods=["GET"])
        if args.text == "reference":
            engines.stt = ReferenceTextSTT(engines.stt)
            app.add_api_route("/bench/say", engines.stt.expect, methods=["POST"])
    if args.probe:
        probe = Probe(app, args.probe)
        probe.install()
        app.add_api_route("/bench/probe", probe.report, methods=["GET"])
    if args.uds:
        from agent.workers import serve_worker

        serve_worker(app, args.uds, log_level="warning")
        return
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# As docker/Dockerfile sets it: numpy's OpenBLAS otherwise runs a second thread for the STT features'
# matrix product, which then spins for its next job and burns most of a core (py-spy/perf: 40 % of
# the server's CPU at 5 rooms).
SERVER_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}


class Server:
    """The server child process, from the parent's side."""

    def __init__(self, llm_url: str, workdir: Path, tts: str = "tone", probe: str | None = None,
                 aiortc_defaults: bool = False, stt: str = "tiny", extra: list[str] = (),
                 cpus: set[int] | None = None):
        """``aiortc_defaults``: the peer without its own audio paths (agent/peer.py FAST_PATHS);
        ``extra``: more ``serve`` arguments (bench/latency.py's); ``cpus``: the cores the server (its
        threads and worker processes) may run on."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.cmd = [sys.executable, str(Path(__file__)), "serve", "--port", str(self.port), "--llm", llm_url,
                    "--stt", str(tiny_whisper()) if stt == "tiny" else stt, "--tts", tts, "--workdir", str(workdir)]
        if probe:
            self.cmd += ["--probe", probe]
        if aiortc_defaults:
            self.cmd.append("--aiortc-defaults")
        self.cmd += list(extra)
        self.proc: asyncio.subprocess.Process | None = None
        self.log = workdir / "server.log"
        self.cpus = cpus

    async def start(self, timeout: float = 60.0) -> "Server":
        import httpx

        self._log = open(self.log, "wb")
        self.proc = await asyncio.create_subprocess_exec(*self.cmd, stdout=self._log, stderr=self._log, env=SERVER_ENV,
                                                         preexec_fn=pinned(self.cpus))
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    health = (await http.get(f"{self.url}/healthz")).json()
                    # A front (--workers) answers for its workers: ready when every one is.
                    stts = [w.get("stt", "down") for w in health["workers"]] if "workers" in health else [health["stt"]]
                    if all(x == "ready" for x in stts):
                        return self
                    if any(x.startswith("error") for x in stts):
                        raise RuntimeError(f"the server's STT failed: {stts}")
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start in {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.2)  # polling a child process's HTTP port: there is no event to wait on

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


# ---------------------------------------------------------------------------------------- clients


def opus_payloads(pcm48: np.ndarray) -> list[bytes]:
    """Mono int16 48 kHz audio as the Opus payloads aiortc's own encoder sends, one per 20 ms."""
    import av
    from aiortc.codecs.opus import OpusEncoder

    enc = OpusEncoder()
    pcm48 = np.concatenate([pcm48, np.zeros((-len(pcm48)) % FRAME, np.int16)])
    out = []
    for i in range(0, len(pcm48), FRAME):
        frame = av.AudioFrame.from_ndarray(pcm48[i:i + FRAME].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i, TIME_BASE
        payloads, _ = enc.encode(frame)
        out.extend(payloads)
    return out


def speech_payloads() -> tuple[list[bytes], bytes]:
    """(the recording, a silent frame) as Opus payloads."""
    from pipeline.audio import float_to_int16, load_audio, resample_once

    x = float_to_int16(resample_once(load_audio(str(RECORDING)), 16000, 48000))
    silence = opus_payloads(np.zeros(FRAME * 50, np.int16))[-1]  # past the encoder's start-up
    return opus_payloads(x), silence


async def wait_for_change(changed: asyncio.Event, predicate, timeout: float) -> bool:
    """Whether ``predicate()`` came true within ``timeout``, re-checked each time ``changed`` is set."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()
        return True
    except TimeoutError:
        return False


class MicClock:
    """A microphone's real-time clock: ``tick`` returns the next 20 ms frame's pts once it is due
    (the first at once), the way a sound card hands over frames."""

    def __init__(self):
        self.start: float | None = None
        self.pts = 0

    async def tick(self) -> int:
        if self.start is None:
            self.start = time.monotonic()
        else:
            self.pts += FRAME
            due = self.start + self.pts / 48000
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())  # real-time pacing of the microphone
        return self.pts


class PacketMic:
    """A microphone track that sends pre-encoded Opus on the real-time audio clock: silence, and a
    recording whenever ``say`` is called."""

    def __new__(cls, *args, **kwargs):
        from aiortc import MediaStreamTrack

        class _Track(MediaStreamTrack):
            kind = "audio"

            def __init__(self, silence: bytes):
                super().__init__()
                self.silence = silence
                self.queue: list[bytes] = []
                self.pos = 0
                self.clock = MicClock()
                self.done = asyncio.Event()
                self.max_late = 0.0

            def say(self, payloads: list[bytes]) -> asyncio.Event:
                self.queue, self.pos = payloads, 0
                self.done = asyncio.Event()
                return self.done

            async def recv(self):
                import av
                from aiortc.mediastreams import MediaStreamError

                if self.readyState != "live":
                    raise MediaStreamError
                pts = await self.clock.tick()
                if self.pos < len(self.queue):
                    payload = self.queue[self.pos]
                    self.pos += 1
                    if self.pos == len(self.queue):
                        self.done.set()
                else:
                    payload = self.silence
                packet = av.Packet(payload)
                packet.pts, packet.time_base = pts, TIME_BASE
                return packet

        return _Track(*args, **kwargs)


class CountingDecoder:
    """Stands in for the client's Opus decoder: what a gap detector needs is the packet stream (RTP
    timestamps), not PCM."""

    def decode(self, encoded_frame):
        return [_Received(encoded_frame.timestamp, len(encoded_frame.data))]


class _Received:
    __slots__ = ("pts", "size")

    def __init__(self, pts: int, size: int):
        self.pts, self.size = pts, size


def install_counting_decoder() -> None:
    import aiortc.rtcrtpreceiver as receiver

    get = receiver.get_decoder
    receiver.get_decoder = lambda codec: CountingDecoder() if codec.mimeType.lower() == "audio/opus" else get(codec)


class ReceiveStats:
    """The agent's audio as one client receives it, inside a measurement window."""

    STALL_S = 0.06  # three frame periods without audio: a listener's jitter buffer would run dry

    def __init__(self):
        self.t0, self.t1 = float("inf"), float("inf")
        self.frames = self.missing = self.stalls = 0
        self.max_gap = 0.0
        self._last_t: float | None = None
        self._last_pts: int | None = None

    def add(self, pts: int, size: int) -> None:
        t = time.monotonic()
        if self.t0 <= t <= self.t1 and self._last_t is not None:
            self.frames += 1
            gap = t - self._last_t
            self.max_gap = max(self.max_gap, gap)
            self.stalls += gap > self.STALL_S
            if self._last_pts is not None and pts - self._last_pts > FRAME:
                self.missing += (pts - self._last_pts) // FRAME - 1
        self._last_t, self._last_pts = t, pts

    def result(self) -> dict:
        return {"frames": self.frames, "missing_frames": self.missing,
                "stalls": self.stalls, "max_gap_ms": round(self.max_gap * 1000, 1)}


class RoomClient:
    """One person in one room: connects like the Pipecat client, then talks and waits for replies."""

    def __init__(self, url: str, room: str, speech: list[bytes], silence: bytes, seed: int):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url, self.room, self.speech = url, room, speech
        self.rng = random.Random(seed)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = PacketMic(silence)
        self.stats = ReceiveStats()
        self.channel = None
        self.ready = asyncio.Event()
        self.bot_stops = 0
        self._changed = asyncio.Event()
        self.turns_said = self.no_reply = 0
        self.pipeline_ms: list[float] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def connect(self, http) -> None:
        from aiortc import RTCSessionDescription

        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("chat", ordered=True)
        self.channel.on("open", lambda: self.send("client-ready", {"version": "2.1.0", "about": {"library": "bench"}}))
        self.channel.on("message", self._on_message)
        self.pc.on("track", lambda t: self._tasks.append(asyncio.get_running_loop().create_task(self._read(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await http.post(f"{self.url}/api/offer", json={
            "sdp": self.pc.localDescription.sdp, "type": "offer", "pc_id": None, "restart_pc": False,
            "requestData": {"room": self.room, "persona": "interviewer", "options": {}}})
        r.raise_for_status()
        answer = r.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    def send(self, type_: str, data: dict) -> None:
        self.channel.send(json.dumps({"label": "rtvi-ai", "type": type_, "id": uuid.uuid4().hex[:8], "data": data}))

    def _on_message(self, raw) -> None:
        msg = json.loads(raw)
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "bot-ready":
            self.ready.set()
        elif kind == "bot-stopped-speaking":
            self.bot_stops += 1
        elif kind == "server-message" and data.get("type") == "turn-metrics" and data.get("pipeline_ms") is not None:
            if self.stats.t0 <= time.monotonic() <= self.stats.t1:
                self.pipeline_ms.append(data["pipeline_ms"])
        elif kind == "error":
            self.errors.append(str(data.get("error"))[:200])
        self._changed.set()

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                self.stats.add(frame.pts, getattr(frame, "size", 100))
        except MediaStreamError:
            pass

    async def _wait(self, predicate, timeout: float) -> bool:
        return await wait_for_change(self._changed, predicate, timeout)

    def start(self, t_talk: float, t0: float, t1: float) -> None:
        self.stats.t0, self.stats.t1 = t0, t1
        self._tasks.append(asyncio.get_running_loop().create_task(self._converse(t_talk, t1)))

    async def _converse(self, t_talk: float, t1: float) -> None:
        """Say the recording, wait for the agent's reply to end, pause like a person, again."""
        await sleep_until(t_talk + self.rng.uniform(0, 2.0))  # rooms are not in step with each other
        pinger = asyncio.get_running_loop().create_task(self._ping())
        try:
            while time.monotonic() < t1:
                await self.mic.say(self.speech).wait()
                stops = self.bot_stops
                self.turns_said += 1
                if not await self._wait(lambda: self.bot_stops > stops, 10.0):
                    self.no_reply += 1
                await asyncio.sleep(self.rng.uniform(0.3, 1.2))  # the person's own pause before answering
        finally:
            pinger.cancel()

    async def _ping(self) -> None:
        while True:  # the Pipecat client's keep-alive, once a second
            await asyncio.sleep(1.0)
            if self.channel is not None and self.channel.readyState == "open":
                self.channel.send(f"ping: {int(time.time() * 1000)}")

    def result(self) -> dict:
        return {"room": self.room, **self.stats.result(), "turns_said": self.turns_said, "no_reply": self.no_reply,
                "client_pipeline_ms": self.pipeline_ms, "errors": self.errors[:5]}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


class LoopLag:
    """How late a 20 ms ticker wakes up in this process: a starved client measures nothing fairly."""

    def __init__(self):
        self.t0, self.t1 = float("inf"), float("inf")
        self.max_s = 0.0
        self.late = 0

    async def run(self) -> None:
        t = time.monotonic()
        while True:
            t += 0.02
            await sleep_until(t)
            lag = time.monotonic() - t
            if self.t0 <= t <= self.t1:
                self.max_s = max(self.max_s, lag)
                self.late += lag > 0.02
            if lag > 0.1:
                t = time.monotonic()


async def clients_main(args: argparse.Namespace) -> None:
    """A worker of bench/rooms.py. Protocol on stdin/stdout, one JSON object per line:
    -> {"ready": n} once every room answered bot-ready; <- {"talk": t, "t0": t, "t1": t} (monotonic
    instants, shared by every process on the host); <- {"stop": true}; -> {"results": [...], ...}."""
    import httpx

    patch_loopback_ice()
    install_counting_decoder()
    speech, silence = speech_payloads()
    loop = asyncio.get_running_loop()
    rooms = args.rooms.split(",")
    clients = [RoomClient(args.url, r, speech, silence, seed=zlib.crc32(f"{args.seed}:{r}".encode())) for r in rooms]
    lag = LoopLag()
    lag_task = loop.create_task(lag.run())

    def say(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def command() -> dict:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise SystemExit("the parent went away")
        return json.loads(line)

    try:
        # keepalive_expiry under uvicorn's 5 s keep-alive: see bench/soak.py.
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(keepalive_expiry=2.0)) as http:
            for i in range(0, len(clients), 4):  # a few offers at a time, like people arriving
                await asyncio.gather(*(c.connect(http) for c in clients[i:i + 4]))
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.ready.wait() for c in clients))
        say({"ready": len(clients)})
        go = await command()
        lag.t0, lag.t1 = go["t0"], go["t1"]
        for c in clients:
            c.start(go["talk"], go["t0"], go["t1"])
        await command()  # stop
        say({"results": [c.result() for c in clients], "loop_lag_max_ms": round(lag.max_s * 1000, 1),
             "loop_late_ticks": lag.late})
    finally:
        lag_task.cancel()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--llm", required=True)
    s.add_argument("--stt", required=True)
    s.add_argument("--tts", choices=["tone", "espeak"], default="tone")
    s.add_argument("--workdir", required=True)
    s.add_argument("--probe", metavar="ROOM", help="install bench/transport.py's probe for this room")
    s.add_argument("--aiortc-defaults", action="store_true")
    s.add_argument("--workers", type=int, default=1,
                   help="N: a front (signaling/front.py) and N instrumented workers, as parley serve --workers")
    s.add_argument("--uds", help=argparse.SUPPRESS)  # a worker of such a front
    s.add_argument("--stt-max-new-tokens", type=int, default=12, help="0: the model's own limit")
    s.add_argument("--setting", action="append", default=[], metavar="FIELD=VALUE", help="a Settings field")
    s.add_argument("--timeline", action="store_true", help="bench/latency.py's server-side clock readings")
    s.add_argument("--endpoint-ms", type=int, help="(with --timeline) the VAD endpoint silence, over the persona's")
    s.add_argument("--turn", action="append", default=[], metavar="PATH=VALUE",
                   help="(with --timeline) a TurnOptions / ConversationConfig / VADOptions field, dotted for "
                        "nested options: endpointing.enabled=false")
    s.add_argument("--text", choices=["model", "reference"], default="model",
                   help="(with --timeline) reference: the STT runs as usual, but hands on the words the bench "
                        "says it is speaking (POST /bench/say)")
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--rooms", required=True)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args)
    else:
        asyncio.run(clients_main(args))


if __name__ == "__main__":
    main()
