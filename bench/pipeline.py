"""The pipeline's own cost under load: N live conversations in one process, in real time.

    python bench/pipeline.py --conversations N [N ...] --seconds S

Each conversation is driven like a transport drives it: one task pushes a 20 ms input frame (48 kHz
stereo s16, as aiortc delivers) every 20 ms of the event loop's clock, another pulls a 20 ms output
frame every 20 ms; each clock has its own random phase (peers' packets arrive independently, and a
WebRTC sender runs on its own clock). The input is a
real recording from tests/data, then silence, repeated; each conversation starts at a random point
of that cycle. The engines are instant stand-ins (fixed transcript, fixed reply, a fixed tone), so
everything measured is Parley's own work: VAD, resampling, turn-taking, sentence splitting, the
player and the asyncio hops between them.

Reported per run:
- added latency, end-of-turn decision (end of speech + endpoint silence, decided inside
  ``push_audio``) -> first reply frame leaving ``read_frame()``, in three views:
  ``pipeline_ms`` from the TurnMetrics events (voice-to-voice minus the engines' time);
  ``decision_to_frame_ms`` from event timestamps (UserStoppedSpeaking -> BotStartedSpeaking; with
  instant engines this is the whole added latency); ``decision_to_queued_ms`` (decision -> first
  reply audio handed to the player), i.e. the same minus the wait for the next 20 ms output tick,
  which is uniform in [0, 20) ms for any paced transport;
- CPU: ``time.process_time()`` over the run / (N x seconds), as % of one core per live conversation;
  plus the share of it spent inside ``push_audio`` / ``read_frame`` (thread CPU time);
- player underruns (frames partly filled inside a reply), turns, unexpected barge-ins, and how late
  the pacing tasks woke up (event-loop lag).

Results go to bench/results/pipeline.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.audio import float_to_int16, load_audio, resample_once  # noqa: E402
from pipeline.conversation import Conversation  # noqa: E402
from pipeline.frames import (  # noqa: E402
    AudioFrame, BotInterrupted, BotStartedSpeaking, Event, TurnMetrics, UserStoppedSpeaking,
)
from pipeline.stt import STTResult  # noqa: E402
from pipeline.turns import ConversationConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _harness import ToneTTS  # noqa: E402  (the stand-in TTS every benchmark shares)

FRAME_S = 0.02
RECORDING = ROOT / "tests" / "data" / "en_goforward.wav"  # 2.8 s: speech from 0.5 s to 2.4 s
GAP_S = 2.2  # silence after it: room for the endpoint (0.5 s) and the whole reply (1.2 s)
TRANSCRIPT = "go forward ten meters"
REPLY = "Right, ten meters forward. What do you see now?"


# ---------------------------------------------------------------------- instant engines


class InstantSTT:
    """A fixed transcript, at once (pipeline.stt.STT)."""

    async def transcribe(self, audio: np.ndarray, *, final: bool, language: str | None = None,
                         prompt: str | None = None, urgent: bool = False) -> STTResult:
        return STTResult(TRANSCRIPT, language, 0.0, 0.0, len(audio) / 16000, 0.0)


class InstantLLM:
    """A fixed reply in one delta, at once (pipeline.llm.LLM)."""

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        yield REPLY


# ---------------------------------------------------------------------- one conversation


def input_frames() -> list[AudioFrame]:
    """One cycle of the input: the recording then silence, as 20 ms 48 kHz stereo frames."""
    x = np.concatenate([load_audio(str(RECORDING)), np.zeros(int(GAP_S * 16000), np.float32)])
    x48 = float_to_int16(resample_once(x, 16000, 48000))
    x48 = np.concatenate([x48, np.zeros((-len(x48)) % 960, np.int16)])
    return [AudioFrame(np.repeat(x48[i : i + 960], 2), 48000, 2) for i in range(0, len(x48), 960)]


@dataclass
class Probe:
    """What one conversation measured."""

    decided: list[float] = field(default_factory=list)  # UserStoppedSpeaking.at
    first_frame: list[float] = field(default_factory=list)  # BotStartedSpeaking.at
    queued: list[float] = field(default_factory=list)  # first reply audio pushed to the player
    metrics: list[TurnMetrics] = field(default_factory=list)
    interruptions: int = 0
    lateness: list[float] = field(default_factory=list)  # pacing task wake-up lateness, s
    push_cpu: float = 0.0
    read_cpu: float = 0.0
    waiting_for_audio: bool = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, UserStoppedSpeaking):
            self.decided.append(event.at)
            self.waiting_for_audio = True
        elif isinstance(event, BotStartedSpeaking):
            self.first_frame.append(event.at)
        elif isinstance(event, TurnMetrics):
            self.metrics.append(event)
        elif isinstance(event, BotInterrupted):
            self.interruptions += 1


def make_conversation(i: int, probe: Probe) -> Conversation:
    conv = Conversation(stt=InstantSTT(), llm=InstantLLM(), tts=ToneTTS(), emit=probe,
                        config=ConversationConfig(language="en"), name=f"bench-{i}")
    push = conv.player.push

    def push_and_time(segment) -> None:  # instrumentation only: when reply audio is ready to play
        if probe.waiting_for_audio and len(segment.pcm):
            probe.waiting_for_audio = False
            probe.queued.append(time.monotonic())
        push(segment)

    conv.player.push = push_and_time
    return conv


async def feed(conv: Conversation, probe: Probe, frames: list[AudioFrame], offset: int, t0: float, n: int) -> None:
    loop = asyncio.get_running_loop()
    for k in range(n):
        target = t0 + k * FRAME_S
        if (delay := target - loop.time()) > 0:
            await asyncio.sleep(delay)
        probe.lateness.append(loop.time() - target)
        c = time.thread_time()
        conv.push_audio(frames[(offset + k) % len(frames)])
        probe.push_cpu += time.thread_time() - c


async def play(conv: Conversation, probe: Probe, t0: float, n: int) -> None:
    loop = asyncio.get_running_loop()
    for k in range(n):
        target = t0 + k * FRAME_S
        if (delay := target - loop.time()) > 0:
            await asyncio.sleep(delay)
        c = time.thread_time()
        conv.read_frame()
        probe.read_cpu += time.thread_time() - c


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def pairs(starts: list[float], ends: list[float]) -> list[float]:
    """Milliseconds from each start to the first end after it (turns still in flight at the end dropped)."""
    out, j = [], 0
    for s in starts:
        while j < len(ends) and ends[j] < s:
            j += 1
        if j < len(ends):
            out.append((ends[j] - s) * 1000)
            j += 1
    return out


async def run(n_conv: int, seconds: float, seed: int = 0, start_s: float | None = None) -> dict:
    """``start_s``: where in the input cycle every conversation starts (default: a random point each)."""
    rng = random.Random(seed)
    frames = input_frames()
    probes = [Probe() for _ in range(n_conv)]
    convs = [make_conversation(i, p) for i, p in enumerate(probes)]
    n = int(seconds / FRAME_S)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tasks = []
    for conv, probe in zip(convs, probes):
        # Conversations are not in step with each other: each starts at its own point of the input
        # cycle, and its input and output clocks tick at their own phase within the 20 ms frame.
        offset = rng.randrange(len(frames)) if start_s is None else int(start_s / FRAME_S)
        tasks.append(asyncio.create_task(feed(conv, probe, frames, offset, t0 + rng.random() * FRAME_S, n)))
        tasks.append(asyncio.create_task(play(conv, probe, t0 + rng.random() * FRAME_S, n)))
    await asyncio.gather(*tasks)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    interruptions = sum(p.interruptions for p in probes)  # before aclose, which cuts replies in flight
    for conv in convs:
        await conv.aclose()

    pipeline_ms = [m.pipeline_ms for p in probes for m in p.metrics if m.pipeline_ms is not None]
    to_frame = [d for p in probes for d in pairs(p.decided, p.first_frame)]
    to_queued = [d for p in probes for d in pairs(p.decided, p.queued)]
    lateness_ms = [x * 1000 for p in probes for x in p.lateness]
    conv_seconds = n_conv * seconds
    return {
        "conversations": n_conv,
        "seconds": seconds,
        "turns": len(pipeline_ms),
        "pipeline_ms": {"p50": pct(pipeline_ms, 50), "p95": pct(pipeline_ms, 95), "max": pct(pipeline_ms, 100)},
        "decision_to_frame_ms": {"p50": pct(to_frame, 50), "p95": pct(to_frame, 95), "max": pct(to_frame, 100)},
        "decision_to_queued_ms": {"p50": pct(to_queued, 50), "p95": pct(to_queued, 95), "max": pct(to_queued, 100)},
        "cpu_pct_per_conversation": round(cpu / conv_seconds * 100, 3),
        "cpu_in_push_audio_pct": round(sum(p.push_cpu for p in probes) / conv_seconds * 100, 3),
        "cpu_in_read_frame_pct": round(sum(p.read_cpu for p in probes) / conv_seconds * 100, 3),
        "process_cpu_pct_of_one_core": round(cpu / wall * 100, 1),
        "underruns": sum(c.player.underruns for c in convs),
        "unexpected_interruptions": interruptions,
        "pacing_lateness_ms": {"p50": pct(lateness_ms, 50), "p95": pct(lateness_ms, 95), "max": pct(lateness_ms, 100)},
    }


def table(results: list[dict]) -> str:
    def pair(d: dict, width: int) -> str:
        return f"{str(d['p50']):>{width}} / {str(d['p95']):<{width}}"

    head = (f"{'N':>4} {'turns':>5} | {'pipeline_ms':^17} | {'decision->frame':^17} | "
            f"{'decision->queued':^17} | {'CPU %/conv':>10} {'push':>6} {'read':>6} | {'underruns':>9} | "
            f"{'loop lag p95/max':^17}")
    lines = [head, "-" * len(head)]
    for r in results:
        lag = {"p50": r["pacing_lateness_ms"]["p95"], "p95": r["pacing_lateness_ms"]["max"]}
        lines.append(
            f"{r['conversations']:>4} {r['turns']:>5} | {pair(r['pipeline_ms'], 7)} | "
            f"{pair(r['decision_to_frame_ms'], 7)} | {pair(r['decision_to_queued_ms'], 7)} | "
            f"{r['cpu_pct_per_conversation']:>10} {r['cpu_in_push_audio_pct']:>6} {r['cpu_in_read_frame_pct']:>6} | "
            f"{r['underruns']:>9} | {pair(lag, 7)}")
    lines.append("latencies in ms as p50 / p95; loop lag (pacing tasks waking late) as p95 / max ms; "
                 "CPU as % of one core per conversation")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = ap.parse_args()
    results = [asyncio.run(run(n, args.seconds, args.seed)) for n in args.conversations]
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "pipeline overhead, instant engines, real-time paced 20 ms frames",
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "targets": {"added_latency_p95_ms": 20, "cpu_pct_per_conversation": 2},
        "runs": results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
