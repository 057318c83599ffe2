"""Voice-to-voice latency: from the true end of a person's speech to the first sound of the reply.

    python bench/latency.py [--turns 20] [--ttft-ms 150] [--tts espeak|tone] [--stt-model tiny]
                            [--endpoint-ms N] [--semantic on|off] [--preemptive on|off] [--smoke]
    (or: parley bench latency ...)

Real recordings (../shared/speech, English, up to 8 s; tests/data where that folder is missing) are
said, one per turn, into a real aiortc connection on loopback to a real Parley server (a child
process running what ``parley serve`` runs: bench/_harness.py), with the interviewer persona. Stand-ins
only for paid services: the LLM is a local OpenAI-compatible server (tests/fake_llm.py, real HTTP
and SSE) that waits ``--ttft-ms`` before its first token and ``--token-ms`` between words; the TTS is
espeak-ng (pipeline/tts.py, ~10 ms a sentence here) or the harness's instant tone. The STT is the real
faster-whisper with a random-weight model of whisper-tiny's size (``--stt-model tiny``, built
offline; its decoding time is real, its text noise) or any faster-whisper model you have
(``--stt-model small`` or a path). A semantic end of turn reads the words, so with a random-weight
model the server hands on the recording's reference transcript instead of the model's noise (the
share of it spoken so far for interim decodes; ``--text model`` turns that off).

What is measured, per turn, on ``time.monotonic()`` (shared by the client and server processes):
- the true end of speech: found in the recording before sending (Silero VAD for the last speech,
  refined to 10 ms by energy), stamped when the 20 ms frame holding that sample is handed to the
  client's aiortc encoder, plus the sample's offset in the frame (a live microphone also holds a
  sample up to one frame before its frame is complete; that is not counted);
- the first audible reply sample (> -40 dBFS): the client decodes each RTP packet as it arrives (the
  agent's own in-order receive path, agent/peer.py, in place of aiortc's 80 ms jitter buffer; a
  browser adds its own playout buffer after that), at the packet's arrival plus the sample's offset.
The breakdown comes from the server (bench/_harness.py Timeline: the pipeline's events and
TurnMetrics, the same ones the data channel carries as RTVI ``metrics`` / ``server-message``), as
the critical path from one timestamp to the next, so the stages add up to each turn's total:
- endpointing: true end -> end of turn decided (UserStoppedSpeaking): uplink, VAD, the silence wait;
- STT final: decided -> final transcript (TurnMetrics.stt_ms);
- LLM: final transcript -> first clause queued for the TTS (persona, HTTP, time to first token,
  the words of the first clause); the LLM's own time to first token (TurnMetrics.llm_ttft_ms) is
  shown beside it. Preemptive generation starts the LLM during the endpointing: then this stage
  is only what is left of the LLM's work after the final transcript;
- TTS first audio: first clause -> first audio from the engine (TurnMetrics.tts_ttfb_ms);
- output: -> the first audible sample handed to the voice track (the wait for its next 20 ms slot,
  the TTS's own leading silence);
- transport: -> that sample decoded by the client (Opus, RTP, SRTP, loopback UDP).
Turns the server cut in two (a decision before the person finished) are counted as cut-offs and
left out of the latency figures.
Results go to bench/results/latency.json (``--smoke``: latency-smoke.json).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fractions
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (ROOT, MicClock, Server, patch_loopback_ice, save_result, tiny_whisper,  # noqa: E402
                      wait_for_change)

FRAME = 960  # 20 ms at 48 kHz
AUDIBLE = 328  # int16, -40 dBFS (bench/_harness.py Timeline uses the same)
ROOM = "latency"
TARGET = {"median_ms": 500, "p90_ms": 700, "ttft_ms": 150}
# The interviewer's LLM reply: a first sentence of ordinary length (the first clause is what the
# TTS starts on), and short enough that the next turn is not long in coming.
REPLY = "That sounds like a solid approach. Tell me more."
STAGES = ["endpointing", "stt_final", "llm", "tts_first_audio", "output", "transport"]


# ---------------------------------------------------------------------------------- recordings


@dataclass
class Recording:
    name: str
    text: str  # the reference transcript, written as Whisper writes it
    pcm48: np.ndarray  # int16 mono 48 kHz, as sent
    onset_s: float
    end_s: float  # the true end of speech
    vad_end_s: float  # Silero's end of the last speech window (before the energy refinement)

    @property
    def end48(self) -> int:
        return int(round(self.end_s * 48000))


def speech_dir() -> Path:
    shared = ROOT.parent / "shared" / "speech"
    return shared if (shared / "manifest.tsv").exists() else ROOT / "tests" / "data"


def whisper_style(text: str) -> str:
    """Reference transcripts come upper-case or bare; Whisper writes a capital and a full stop."""
    text = " ".join(text.split())
    if text.isupper():
        text = text.lower()
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ".!?" else text + "."


def speech_bounds(x: np.ndarray) -> tuple[float, float, float]:
    """(onset, end, Silero's end) of the speech in 16 kHz audio, in seconds. Silero finds the
    speech (32 ms windows: noise and breaths do not count, but its probability lags the sound by a
    window or two); both bounds are then refined to 10 ms by energy (bench/_harness.py ``sound_db``:
    within 35 dB of the speech's loud part and 6 dB over the noise floor): the onset looked for
    from 150 ms before Silero's first window, the end from the start of the last stretch of speech
    to 150 ms after Silero's end (a soft final consonant)."""
    from _harness import sound_db
    from pipeline.vad import WINDOW, SileroVAD

    vad = SileroVAD()
    probs = np.array([vad(x[i:i + WINDOW]) for i in range(0, len(x) - WINDOW + 1, WINDOW)])
    voiced = np.flatnonzero(probs >= 0.5)
    if not len(voiced):
        raise ValueError("no speech")
    first_of_last, voiced_set = voiced[-1], set(voiced.tolist())
    while first_of_last - 1 in voiced_set:
        first_of_last -= 1
    vad_onset, vad_end = voiced[0] * WINDOW / 16000, (voiced[-1] + 1) * WINDOW / 16000
    # The level from the speech's own loud part (not the whole file's, mostly silence here).
    db, threshold = sound_db(x, slice(int(vad_onset * 100), int(vad_end * 100)))
    lo = max(int(vad_onset * 100) - 15, 0)
    first = np.flatnonzero(db[lo:int(vad_end * 100)] >= threshold)
    onset = (lo + first[0]) / 100 if len(first) else vad_onset
    lo, hi = int(first_of_last * WINDOW / 160), min(len(db), int((vad_end + 0.15) * 100))
    loud = np.flatnonzero(db[lo:hi] >= threshold)
    end = (lo + loud[-1] + 1) / 100 if len(loud) else vad_end
    return onset, end, vad_end


def load_recordings(folder: Path, max_s: float = 8.0) -> list[Recording]:
    from pipeline.audio import float_to_int16, load_audio, resample_once

    out = []
    for line in (folder / "manifest.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        name, duration, language, transcript = cols[:4]
        channels = int(cols[7]) if len(cols) > 7 and cols[7].isdigit() else 1
        # One English speaker per file (the stereo ones are two people, or a long speech).
        if language != "en" or float(duration) > max_s or channels != 1:
            continue
        x = load_audio(str(folder / name))
        onset, end, vad_end = speech_bounds(x)
        out.append(Recording(name, whisper_style(transcript), float_to_int16(resample_once(x, 16000, 48000)),
                             onset, end, vad_end))
    if not out:
        raise SystemExit(f"no English recordings under {max_s:.0f} s in {folder}")
    return out


# ---------------------------------------------------------------------------------- client


@dataclass
class Turn:
    rec: Recording
    t_start: float | None = None  # first frame of the recording handed to aiortc
    t_end: float | None = None  # the true end of speech, stamped as it is sent
    t_onset: float | None = None  # the first audible reply sample, decoded
    sent: asyncio.Event = field(default_factory=asyncio.Event)


def make_mic():
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class Mic(MediaStreamTrack):
        """A microphone on the real-time audio clock: silence, and a recording when told to say one."""

        kind = "audio"

        def __init__(self):
            super().__init__()
            self.clock = MicClock()
            self.turn: Turn | None = None
            self.pos = 0

        def say(self, turn: Turn) -> None:
            self.turn, self.pos = turn, 0

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            pts = await self.clock.tick()
            chunk = np.zeros(FRAME, np.int16)
            turn = self.turn
            if turn is not None:
                pcm = turn.rec.pcm48[self.pos:self.pos + FRAME]
                chunk[:len(pcm)] = pcm
                now = time.monotonic()
                if self.pos == 0:
                    turn.t_start = now
                if self.pos <= turn.rec.end48 < self.pos + FRAME:
                    turn.t_end = now + (turn.rec.end48 - self.pos) / 48000
                self.pos += FRAME
                if self.pos >= len(turn.rec.pcm48):
                    self.turn = None
                    turn.sent.set()
            frame = av.AudioFrame.from_ndarray(np.repeat(chunk, 2).reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, pts, fractions.Fraction(1, 48000)
            return frame

    return Mic()


class Client:
    """One person: connects like the Pipecat client, says recordings, listens for the reply."""

    def __init__(self, url: str, persona: str):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.url, self.persona = url, persona
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = make_mic()
        self.channel = None
        self.turn: Turn | None = None
        self.bot_stops = 0
        self.ready = False
        self.errors: list[str] = []
        self.receive_path = "aiortc jitter buffer (+80 ms)"
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> None:
        import httpx
        from aiortc import RTCSessionDescription

        from agent.peer import _DecodeInLoop, _tune_receiver

        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("chat", ordered=True)
        self.channel.on("open", lambda: self.send("client-ready", {"version": "2.1.0", "about": {"library": "bench"}}))
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{self.url}/api/offer", json={
                "sdp": self.pc.localDescription.sdp, "type": "offer", "pc_id": None, "restart_pc": False,
                "requestData": {"room": ROOM, "persona": self.persona, "options": {}}})
        r.raise_for_status()
        await self.pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
        # Now the receiver has its track, and has not started (the connection is set up in a task
        # that has not run yet). Decoded as each packet arrives: aiortc's own jitter buffer would
        # hold every packet until four more came (80 ms), the test client's delay, not Parley's.
        receiver = next(t.receiver for t in self.pc.getTransceivers() if t.kind == "audio")
        _tune_receiver(receiver, self._on_frame)
        if isinstance(getattr(receiver, "_RTCRtpReceiver__decoder_queue", None), _DecodeInLoop):
            self.receive_path = "decoded on arrival, in order"

    def _on_track(self, track) -> None:
        if track.kind == "audio" and self.receive_path.startswith("aiortc"):
            self._tasks.append(asyncio.get_running_loop().create_task(self._read(track)))

    def send(self, type_: str, data: dict) -> None:
        self.channel.send(json.dumps({"label": "rtvi-ai", "type": type_, "id": uuid.uuid4().hex[:8], "data": data}))

    def _on_message(self, raw) -> None:
        msg = json.loads(raw)
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "bot-ready":
            self.ready = True
        elif kind == "bot-stopped-speaking":
            self.bot_stops += 1
        elif kind == "error":
            self.errors.append(str(data.get("error"))[:200])
        self._changed.set()

    def _on_frame(self, frame) -> None:
        """A decoded frame of the agent's voice (mono from the in-order path, stereo from aiortc's)."""
        t = time.monotonic()
        turn = self.turn
        if turn is None or turn.t_end is None or turn.t_onset is not None:
            return
        pcm = frame.to_ndarray().reshape(-1)
        loud = np.flatnonzero(np.abs(pcm) > AUDIBLE)
        if len(loud):
            channels = len(pcm) // frame.samples
            onset = t + loud[0] // channels / 48000
            if onset >= turn.t_end:
                turn.t_onset = onset
                self._changed.set()

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                self._on_frame(await track.recv())
        except MediaStreamError:
            pass

    async def wait(self, predicate, timeout: float) -> bool:
        return await wait_for_change(self._changed, predicate, timeout)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


# ---------------------------------------------------------------------------------- one run


def stt_model(name: str) -> tuple[str, bool]:
    """(what the server loads, whether its weights are random)."""
    if name == "tiny-test":
        return str(tiny_whisper()), True  # the test suite's toy model: builds in seconds
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from platformdirs import user_cache_dir

        from tiny_whisper import ARCHS, build_random

        cache = Path(os.environ.get("PARLEY_TEST_CACHE", user_cache_dir("parley"))) / "test-models"
        return str(build_random(cache / "random-tiny-int8", **ARCHS["tiny"])), True  # as bench/stt.py
    return name, False


def turn_fields() -> set[str]:
    """The turn-taking options this tree has (semantic end of turn and preemptive generation are
    recent): dotted paths into TurnOptions."""
    from pipeline.turns import TurnOptions

    out = set()
    for f in dataclasses.fields(TurnOptions):
        out.add(f.name)
        default = getattr(TurnOptions(), f.name)
        if dataclasses.is_dataclass(default):
            out |= {f"{f.name}.{g.name}" for g in dataclasses.fields(default)}
    return out


def overrides(args: argparse.Namespace) -> list[str]:
    have = turn_fields()
    out = list(args.turn)
    for flag, path in ((args.semantic, "endpointing.enabled"), (args.preemptive, "preemptive_generation")):
        if flag is None:
            continue
        if path not in have:
            raise SystemExit(f"this tree has no TurnOptions.{path}: drop --{path.split('.')[0].split('_')[0]}")
        out.append(f"{path}={'true' if flag == 'on' else 'false'}")
    return out


def endpointing_mode(config: dict) -> str:
    """In words, from the options the server reported for the room."""
    opts, vad = config.get("options", {}), config.get("vad_options", {})
    base = vad.get("endpoint_silence_ms")
    ep = opts.get("endpointing")
    if isinstance(ep, dict) and ep.get("enabled"):
        ms = {k.removesuffix("_silence_ms"): v for k, v in ep.items() if k.endswith("_silence_ms")}
        text = f"semantic ({', '.join(f'{k} {v}' for k, v in ms.items())} ms; VAD base {base} ms)"
    else:
        text = f"VAD silence {base} ms"
    if "preemptive_generation" in opts:
        text += f", preemptive generation {'on' if opts['preemptive_generation'] else 'off'}"
    return text


async def run(args: argparse.Namespace, recs: list[Recording]) -> dict:
    import httpx

    from fake_llm import Behaviour, FakeLLM

    patch_loopback_ice()
    model, random_weights = stt_model(args.stt_model)
    text = args.text or ("reference" if random_weights else "model")
    llm = await FakeLLM(Behaviour(reply=REPLY, first_token_delay_s=args.ttft_ms / 1000,
                                  token_delay_s=args.token_ms / 1000)).start()
    extra = ["--timeline", "--text", text, "--stt-max-new-tokens", "12" if random_weights else "0",
             "--setting", f"stt_encoder_window={args.stt_window}", "--setting", f"stt_cpu_threads={args.stt_threads}"]
    if args.endpoint_ms:
        extra += ["--endpoint-ms", str(args.endpoint_ms)]
    for kv in overrides(args):
        extra += ["--turn", kv]
    turns: list[Turn] = []
    with tempfile.TemporaryDirectory(prefix="parley-latency-") as tmp:
        server = Server(llm.url, Path(tmp), tts=args.tts, stt=model, extra=extra)
        client = None
        try:
            await server.start(timeout=180)
            client = Client(server.url, args.persona)
            await client.connect()
            if not await client.wait(lambda: client.ready, 30):
                raise RuntimeError("no bot-ready from the server")
            if not await client.wait(lambda: client.bot_stops >= 1, 90):  # the greeting, heard out
                raise RuntimeError("the greeting never finished")
            async with httpx.AsyncClient(timeout=10) as http:
                for i in range(args.turns):
                    rec = recs[i % len(recs)]
                    if text == "reference":
                        (await http.post(f"{server.url}/bench/say", json={
                            "text": rec.text, "speech_s": rec.end_s - rec.onset_s})).raise_for_status()
                    turn = Turn(rec)
                    turns.append(turn)
                    stops = client.bot_stops
                    client.turn = turn
                    client.mic.say(turn)
                    await asyncio.wait_for(turn.sent.wait(), len(rec.pcm48) / 48000 + 5)
                    if not await client.wait(lambda: turn.t_onset is not None, 20):
                        continue  # no reply: counted below
                    if i + 1 < args.turns:
                        await client.wait(lambda: client.bot_stops > stops, 60)  # the reply, heard out
                        await asyncio.sleep(args.pause_s)  # the person's own pause before speaking again
                timeline = (await http.get(f"{server.url}/bench/timeline/{ROOM}")).json()
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            if client is not None:
                await client.close()
            await server.stop()
            await llm.stop()
    rows = [analyse(i, t, turns[i + 1].t_start if i + 1 < len(turns) else None, timeline)
            for i, t in enumerate(turns)]
    return {"config": timeline["config"], "endpointing": endpointing_mode(timeline["config"]),
            "stt_model": args.stt_model, "stt_random_weights": random_weights, "stt_text": text,
            "stt_encoder_window": args.stt_window, "stt_cpu_threads": args.stt_threads,
            "tts": args.tts, "ttft_ms": args.ttft_ms, "token_ms": args.token_ms, "persona": args.persona,
            "overrides": overrides(args), "client_receive": client.receive_path if client else None,
            "client_errors": client.errors[:5] if client else [], "turns": rows, "summary": summarise(rows)}


def analyse(i: int, turn: Turn, next_start: float | None, timeline: dict) -> dict:
    """One turn's figures, from the client's stamps and the server's events in the turn's window
    (from the first frame of the recording to the first frame of the next one)."""
    row: dict = {"turn": i + 1, "recording": turn.rec.name, "speech_s": round(turn.rec.end_s - turn.rec.onset_s, 2)}
    if turn.t_end is None or turn.t_start is None:
        return {**row, "status": "not sent"}
    hi = next_start or float("inf")
    events = [e for e in timeline["events"] if turn.t_start <= e["at"] < hi]

    def of(kind: str, after: float = -1.0, **match) -> list[dict]:
        return [e for e in events if e["type"] == kind and e["at"] >= after
                and all(e.get(k) == v for k, v in match.items())]

    decisions = of("UserStoppedSpeaking")
    interrupted = of("BotInterrupted")
    if turn.t_onset is None:
        return {**row, "status": "no reply", "decisions": len(decisions)}
    total = (turn.t_onset - turn.t_end) * 1000
    row["total_ms"] = round(total, 1)
    before = [e for e in decisions if e["at"] <= turn.t_onset]
    if len(decisions) > 1 or interrupted or not before:
        # The server ended the turn while the person was still talking (or heard no end at all).
        return {**row, "status": "cut off", "decisions": len(decisions),
                "decided_before_end_ms": [round((e["at"] - turn.t_end) * 1000, 1) for e in decisions]}
    decided = before[-1]["at"]
    metrics = next(iter(of("TurnMetrics", decided)), None)
    clause = next(iter(of("BotText", turn.t_start, spoken=False)), None)
    final = next(iter(of("Transcript", turn.t_start, final=True)), None)
    # Opus's pre-echo can put a little sound a few ms before the onset it encodes: hence the slack.
    onsets = [t for t in timeline["onsets"] if decided <= t <= turn.t_onset + 0.03]
    row.update(status="ok", transcript=final and final.get("text"))
    row["server_audio_onsets_ms"] = [round((t - turn.t_end) * 1000, 1) for t in timeline["onsets"]
                                     if turn.t_start <= t < hi]
    # The stages are the critical path, one after the other: each ends at a timestamp no earlier
    # than the last one's end, so they add up to the total. Work done ahead (preemptive generation:
    # the LLM, even the TTS, running on the interim transcript before the decision) shows as a
    # shorter stage, not a negative one; the engines' own times are kept beside them.
    st: dict[str, float | None] = dict.fromkeys(STAGES)
    t = decided
    st["endpointing"] = (decided - turn.t_end) * 1000
    if metrics is not None:
        row["engine_ms"] = {"stt": metrics.get("stt_ms"), "llm_ttft": metrics.get("llm_ttft_ms"),
                            "tts": metrics.get("tts_ttfb_ms")}
        row["server_voice_to_voice_ms"] = metrics.get("voice_to_voice_ms")
        # How far the server's own idea of the end of speech is from the true one (uplink, VAD).
        if metrics.get("voice_to_voice_ms") is not None:
            row["server_end_vs_true_end_ms"] = round(
                (metrics["at"] - metrics["voice_to_voice_ms"] / 1000 - turn.t_end) * 1000, 1)
        row.update({k: v for k, v in metrics.items() if k not in (
            "type", "at", "turn", "stt_ms", "llm_ttft_ms", "tts_ttfb_ms", "voice_to_voice_ms", "pipeline_ms")})
        if clause is not None and onsets and None not in (metrics.get("stt_ms"), metrics.get("tts_ttfb_ms")):
            chain = [decided + metrics["stt_ms"] / 1000, clause["at"], clause["at"] + metrics["tts_ttfb_ms"] / 1000,
                     onsets[0], turn.t_onset]
            for name, end in zip(["stt_final", "llm", "tts_first_audio", "output", "transport"], chain):
                end = max(end, t)
                st[name], t = (end - t) * 1000, end
            row["llm_ahead_of_final_ms"] = round(max(decided + metrics["stt_ms"] / 1000 - clause["at"], 0) * 1000, 1)
    row["stages_ms"] = {k: (round(v, 1) if v is not None else None) for k, v in st.items()}
    return row


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    totals = [r["total_ms"] for r in ok]
    out = {"turns": len(rows), "measured": len(ok), "no_reply": sum(r.get("status") == "no reply" for r in rows),
           "cut_off": sum(r.get("status") == "cut off" for r in rows),
           "total_ms": {"median": pct(totals, 50), "p90": pct(totals, 90), "min": pct(totals, 0),
                        "max": pct(totals, 100)},
           "stages_ms": {}}
    for s in STAGES:
        v = [r["stages_ms"][s] for r in ok if r["stages_ms"].get(s) is not None]
        out["stages_ms"][s] = {"median": pct(v, 50), "p90": pct(v, 90), "n": len(v)}
    out["engine_ms"] = {}
    for s in ("stt", "llm_ttft", "tts"):
        v = [r["engine_ms"][s] for r in ok if r.get("engine_ms", {}).get(s) is not None]
        out["engine_ms"][s] = {"median": pct(v, 50), "p90": pct(v, 90), "n": len(v)}
    out["target_met"] = bool(totals) and out["total_ms"]["median"] < TARGET["median_ms"] \
        and out["total_ms"]["p90"] < TARGET["p90_ms"] and out["no_reply"] == 0
    return out


# ---------------------------------------------------------------------------------- report


LABELS = {"endpointing": "endpointing (true end -> turn decided)", "stt_final": "STT final (-> transcript)",
          "llm": "LLM (-> first clause)", "tts_first_audio": "TTS first audio",
          "output": "output (next 20 ms slot, TTS leading silence)",
          "transport": "transport (Opus, RTP, loopback, decode)"}


def table(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        s = run["summary"]
        lines.append(f"{run['label']}: {s['measured']} of {s['turns']} turns measured"
                     f" ({s['no_reply']} without reply, {s['cut_off']} cut off mid-utterance)")
        lines.append(f"  endpointing: {run['endpointing']}")
        window = ", speech-length encoder window" if run.get("stt_encoder_window") == "audio" else ""
        window += f", {run['stt_cpu_threads']} CTranslate2 thread(s)" if run.get("stt_cpu_threads") else ""
        lines.append(f"  STT {run['stt_model']}{' (random weights, reference text)' if run['stt_text'] == 'reference' else ''}{window}"
                     f", TTS {run['tts']}, LLM TTFT {run['ttft_ms']:.0f} ms + {run['token_ms']:.0f} ms/word,"
                     f" client: {run['client_receive']}")
        head = f"  {'ms':<48} {'median':>7} {'p90':>7}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        t = s["total_ms"]
        lines.append(f"  {'true end of speech -> first reply audio':<48} {str(t['median']):>7} {str(t['p90']):>7}")
        for k in STAGES:
            v = s["stages_ms"][k]
            lines.append(f"    {LABELS[k]:<46} {str(v['median']):>7} {str(v['p90']):>7}")
            if k == "llm":
                e = s["engine_ms"]["llm_ttft"]
                lines.append(f"      {'the LLM engine own time to first token':<44} {str(e['median']):>7} "
                             f"{str(e['p90']):>7}")
        verdict = "met" if s["target_met"] else "NOT met"
        lines.append(f"  target (TTFT {TARGET['ttft_ms']} ms): median < {TARGET['median_ms']}, "
                     f"p90 < {TARGET['p90_ms']}: {verdict}")
        lines.append("  per turn: " + ", ".join(
            f"{r['recording'].split('.')[0]} {r.get('total_ms', r['status'])}"
            + ("" if r.get("status") == "ok" else f" ({r['status']})") for r in run["turns"]))
        lines.append("")
    lines.append("Stages are the critical path, one after another (they add up to each turn's total; "
                 "their medians need not add up to the total's); work done ahead of the decision "
                 "(preemptive generation) shortens a stage. The TTFT line is the LLM's own time, "
                 "which preemptive generation may have spent during the endpointing.")
    return "\n".join(lines)


MODES = {  # --modes: named sets of --turn overrides, each run against a fresh server
    "default": [],
    "vad": ["endpointing.enabled=false", "preemptive_generation=false"],
    "semantic": ["endpointing.enabled=true", "preemptive_generation=false"],
    "preemptive": ["endpointing.enabled=false", "preemptive_generation=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=20, help="turns per run (the recordings in turn, repeated)")
    ap.add_argument("--ttft-ms", type=float, default=150.0, help="the LLM's time to first token")
    ap.add_argument("--token-ms", type=float, default=15.0,
                    help="the LLM's time per word after the first (15: ~85 tokens/s)")
    ap.add_argument("--tts", choices=["espeak", "tone"], default="espeak")
    ap.add_argument("--stt-model", default="tiny",
                    help="tiny: whisper-tiny's size, random weights (built offline); tiny-test: the test "
                         "suite's toy model; or a faster-whisper model name or path")
    ap.add_argument("--stt-window", choices=["full", "audio"], default="full",
                    help="the encoder's input (stt_encoder_window): full: Whisper's 30 s window; audio: the "
                         "speech only, for models fine-tuned to read short windows")
    ap.add_argument("--stt-threads", type=int, default=0, help="stt_cpu_threads (0: one per core)")
    ap.add_argument("--text", choices=["reference", "model"],
                    help="what the STT hands on (default: reference for random weights, else model)")
    ap.add_argument("--persona", default="interviewer")
    ap.add_argument("--endpoint-ms", type=int, help="the VAD endpoint silence (default: the persona's)")
    ap.add_argument("--semantic", choices=["on", "off"], help="semantic end of turn (default: as configured)")
    ap.add_argument("--preemptive", choices=["on", "off"], help="preemptive LLM generation (default: as configured)")
    ap.add_argument("--turn", action="append", default=[], metavar="PATH=VALUE",
                    help="any TurnOptions / ConversationConfig / VADOptions field, e.g. endpointing.complete_silence_ms=200")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["default"],
                    help="runs to compare, each with a fresh server: default (as configured), vad (fixed "
                         "silence only), semantic, preemptive")
    ap.add_argument("--pause-s", type=float, default=0.6, help="the person's pause after each reply")
    ap.add_argument("--max-s", type=float, default=8.0, help="longest recording used")
    ap.add_argument("--smoke", action="store_true", help="2 turns, the test suite's toy Whisper")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.turns, args.pause_s = min(args.turns, 2), 0.3
        if args.stt_model == "tiny":
            args.stt_model = "tiny-test"
    if args.tts == "espeak" and not (shutil.which("espeak-ng") or shutil.which("espeak")):
        raise SystemExit("espeak-ng is not installed: install it, or use --tts tone")
    out = args.out or ROOT / "bench" / "results" / ("latency-smoke.json" if args.smoke else "latency.json")
    recs = load_recordings(speech_dir(), args.max_s)
    print(f"{len(recs)} recordings from {speech_dir().relative_to(ROOT.parent)}: true end of speech "
          f"(Silero end -> energy end, s): " + ", ".join(
              f"{r.name.split('.')[0]} {r.vad_end_s:.2f}->{r.end_s:.2f}" for r in recs), flush=True)
    runs = []
    base_turn = list(args.turn)
    for mode in args.modes:
        args.turn = base_turn + MODES[mode]
        run_ = asyncio.run(run(args, recs))
        run_["label"] = mode
        runs.append(run_)
    result = {
        "benchmark": "voice-to-voice latency: true end of speech in the sent audio -> first audible reply "
                     "sample decoded by an aiortc client on loopback",
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "target": TARGET, "smoke": args.smoke,
        "recordings": [{"name": r.name, "text": r.text, "onset_s": round(r.onset_s, 3), "end_s": round(r.end_s, 3),
                        "silero_end_s": round(r.vad_end_s, 3)} for r in recs],
        "runs": runs,
    }
    print(table(result))
    save_result(out, result)


if __name__ == "__main__":
    main()
