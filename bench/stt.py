"""The shared STT engine under concurrent streams: batched vs one-at-a-time, side by side.

    parley bench stt [--streams 1 8 32 64 128] [--device cpu|cuda] [--arch tiny-test|large-v3-turbo] [--smoke]

N streams share one ``WhisperSTT`` (one model, one queue), as N rooms of one process do. Each
stream is a person finishing utterance after utterance: it submits the final transcription of a
real recording from tests/data (English and French, 2.7 to 6.7 s; each stream starts at its own
place in the list), waits for the text, and submits the next one at once: a closed loop, so N
streams keep N requests in flight and the figures are the engine's capacity at that concurrency.
With ``--partials`` each utterance also sends a partial of its first 60 % just before the final,
as a conversation's last interim decode is still queued when the person stops.

Both modes run the same engine code: "batched" with ``batch_size`` (default 16) and a
``batch_wait_ms`` window; "one-at-a-time" with ``batch_size=1`` (one decode after
another, finals first, as before batching). Per stream count the two modes alternate (``--rounds``),
so a change of load on the host weighs on both alike.

The model has random weights (none can be downloaded here): on a CPU the test suite's toy Whisper
(``tests/tiny_whisper.py``; ``--arch tiny|base|small`` for real sizes), on a GPU large-v3-turbo's
real dimensions (``--device cuda``). Its text is garbage, so every decode is made to run a fixed
number of tokens (end-of-text suppressed): ``--decode-tokens``, 16 by default, about a 3 s
utterance of real speech.

Reported per (streams, mode): audio seconds transcribed per wall second, final latency p50/p95
(submit -> text), mean batch size, and where the worker's time went per request: log-mel features,
encoder, decoder (thread time, summed over the replicas when there are several).
Results go to bench/results/stt.json (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# numpy's OpenBLAS threads (the log-mel product) would spin against the decoders' threads: one
# thread, as for a server (bench/rooms.py runs its server so too). Before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from pipeline.audio import load_audio  # noqa: E402
from pipeline.stt import WhisperOptions, WhisperSTT, resolve_device  # noqa: E402

DATA = ROOT / "tests" / "data"
EOT = 50257  # <|endoftext|>: suppressed, so every decode runs the same number of tokens


def model_dir(arch: str) -> Path:
    """The random-weight model, built once into the user cache (as tests/conftest.py does)."""
    from platformdirs import user_cache_dir

    from tiny_whisper import ARCHS, build, build_random

    cache = Path(os.environ.get("PARLEY_TEST_CACHE", user_cache_dir("parley"))) / "test-models"
    if arch == "tiny-test":
        return build(cache / "tiny-whisper-v1")  # the test suite's own model
    quantization = "float16" if arch.startswith("large") else "int8"
    return build_random(cache / f"random-{arch}-{quantization}", quantization=quantization, **ARCHS[arch])


def utterances() -> list[tuple[str, np.ndarray, str]]:
    """(name, audio, language) for every speech recording in tests/data."""
    out = []
    for line in (DATA / "manifest.tsv").read_text().splitlines()[1:]:
        name, _dur, lang, *_ = line.split("\t")
        if lang in ("none", ""):
            continue  # noise
        out.append((name, load_audio(str(DATA / name)), lang))
    return out


def max_new_tokens_for(decode_tokens: int) -> int:
    # faster-whisper passes max_length = prompt (4 tokens) + max_new_tokens, and CTranslate2 decodes
    # at most min(max_length // 2, max_length - 3) tokens: ask for what gives decode_tokens.
    return max(2 * decode_tokens - 4, decode_tokens - 1)


@dataclass
class StreamLog:
    latencies_ms: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    partials_sent: int = 0
    partials_dropped: int = 0


async def stream(stt: WhisperSTT, utts: list, start: int, count: int, partials: bool, log: StreamLog) -> None:
    pending: list[asyncio.Task] = []
    for k in range(count):
        _name, audio, lang = utts[(start + k) % len(utts)]
        if partials:
            log.partials_sent += 1
            pending.append(asyncio.create_task(stt.transcribe(audio[: int(len(audio) * 0.6)], final=False,
                                                              language=lang)))
        t0 = time.perf_counter()
        result = await stt.transcribe(audio, final=True, language=lang)
        log.latencies_ms.append((time.perf_counter() - t0) * 1000)
        log.audio_s += result.duration
    for r in await asyncio.gather(*pending):
        log.partials_dropped += r is None


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def run_one(stt: WhisperSTT, utts: list, n_streams: int, per_stream: int, partials: bool,
                  offset: int = 0) -> dict:
    logs = [StreamLog() for _ in range(n_streams)]
    before = (stt.stats.batches, stt.stats.requests, stt.stats.busy_s, dict(stt.stats.stage_s))
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*[stream(stt, utts, i * 3 + offset, per_stream, partials, logs[i])
                           for i in range(n_streams)])
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    batches = stt.stats.batches - before[0]
    requests = stt.stats.requests - before[1]
    busy = stt.stats.busy_s - before[2]
    stages = {k: round(v - before[3].get(k, 0.0), 3) for k, v in stt.stats.stage_s.items()}
    return {
        "streams": n_streams, "latencies_ms": [x for g in logs for x in g.latencies_ms],
        "audio_s": sum(g.audio_s for g in logs), "wall_s": wall, "cpu_s": cpu, "busy_s": busy,
        "batches": batches, "requests": requests, "worker_stage_s": stages,
        "partials_sent": sum(g.partials_sent for g in logs), "partials_dropped": sum(g.partials_dropped for g in logs),
    }


def merge(parts: list[dict]) -> dict:
    """One figure per (streams, mode) from its rounds: totals, and percentiles over every final."""
    lat = [x for p in parts for x in p["latencies_ms"]]
    audio, wall = sum(p["audio_s"] for p in parts), sum(p["wall_s"] for p in parts)
    batches, requests = sum(p["batches"] for p in parts), sum(p["requests"] for p in parts)
    stages: dict[str, float] = {}
    for p in parts:
        for k, v in p["worker_stage_s"].items():
            stages[k] = round(stages.get(k, 0.0) + v, 3)
    return {
        "streams": parts[0]["streams"],
        "finals": len(lat),
        "audio_s": round(audio, 2),
        "wall_s": round(wall, 3),
        "audio_s_per_wall_s": round(audio / wall, 2),
        "final_latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": pct(lat, 100)},
        "mean_batch": round(requests / batches, 2) if batches else None,
        "batches": batches,
        "decoded": requests,  # finals, and partials that were not dropped
        "worker_busy_pct": round(sum(p["busy_s"] for p in parts) / wall * 100, 1),
        "worker_stage_s": stages,
        "process_cpu_pct": round(sum(p["cpu_s"] for p in parts) / wall * 100, 1),
        "audio_s_per_cpu_s": round(audio / max(1e-9, sum(p["cpu_s"] for p in parts)), 2),
        "partials_sent": sum(p["partials_sent"] for p in parts),
        "partials_dropped": sum(p["partials_dropped"] for p in parts),
    }


def per_stream_count(n: int, min_finals: int, min_per_stream: int) -> int:
    return max(min_per_stream, math.ceil(min_finals / n))


async def bench(args) -> dict:
    path = model_dir(args.arch)
    utts = utterances()
    common = dict(model=str(path), device=args.device, compute_type=args.compute_type, cpu_threads=args.cpu_threads,
                  max_new_tokens=max_new_tokens_for(args.decode_tokens), suppress_tokens=(-1, EOT),
                  batch_wait_ms=args.batch_wait_ms, max_queue=max(256, 2 * max(args.streams)),
                  tune_malloc=not args.no_malloc_tuning, encoder_window=args.encoder_window)
    engines = {
        "batched": WhisperSTT(WhisperOptions(batch_size=args.batch_size, replicas=args.replicas, **common)),
        "one-at-a-time": WhisperSTT(WhisperOptions(batch_size=1, **common)),
    }
    runs = []
    try:
        for stt in engines.values():
            await stt.warm_up()
            name, audio, lang = utts[0]
            await asyncio.gather(*[stt.transcribe(audio, final=True, language=lang) for _ in range(stt.batch_size)])
        for n in args.streams:
            per = per_stream_count(n, args.min_finals, args.min_per_stream)
            rounds = max(1, min(args.rounds, per))
            parts: dict[str, list[dict]] = {mode: [] for mode in args.modes}
            for k in range(rounds):  # modes alternate, so a load change on the host hits both alike
                share = per // rounds + (k < per % rounds)
                for mode in args.modes:
                    parts[mode].append(await run_one(engines[mode], utts, n, share, args.partials, offset=k * share))
            for mode in args.modes:
                r = merge(parts[mode])
                r.update(mode=mode, batch_size=engines[mode].batch_size, rounds=rounds)
                runs.append(r)
                print(row(r), flush=True)
    finally:
        for stt in engines.values():
            stt.close()
    dev = engines["batched"].device
    setup = {m: {"replicas": e.replicas, "threads_per_replica": e.cpu_threads, "batch_size": e.batch_size}
             for m, e in engines.items()}
    return {"device": dev, "runs": runs, "model": str(path), "engines": setup}


HEAD = (f"{'streams':>7} {'mode':<13} {'finals':>6} | {'audio s / wall s':>16} {'/ CPU s':>7} | "
        f"{'final latency p50 / p95 ms':^27} | {'mean batch':>10} | {'ms per request: features / encode / decode':^42}")


def row(r: dict) -> str:
    st, n = r["worker_stage_s"], max(1, r["decoded"])
    stages = " / ".join(f"{st.get(k, 0) * 1000 / n:>8.1f}" for k in ("features", "encode", "decode"))
    return (f"{r['streams']:>7} {r['mode']:<13} {r['finals']:>6} | {r['audio_s_per_wall_s']:>16} "
            f"{r['audio_s_per_cpu_s']:>7} | "
            f"{str(r['final_latency_ms']['p50']):>12} / {str(r['final_latency_ms']['p95']):<12} | "
            f"{str(r['mean_batch']):>10} | {stages:^42}")


def speedups(runs: list[dict], key: str = "audio_s_per_wall_s") -> dict[int, float]:
    """batched / one-at-a-time, per stream count."""
    by = {(r["streams"], r["mode"]): r for r in runs}
    out = {}
    for (n, mode), r in by.items():
        single = by.get((n, "one-at-a-time"))
        if mode == "batched" and single and single[key]:
            out[n] = round(r[key] / single[key], 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--modes", nargs="+", default=["batched", "one-at-a-time"], choices=["batched", "one-at-a-time"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--arch", default=None, help="tiny-test (the test suite's toy model; CPU default), tiny, base, "
                    "small, large-v3-turbo (GPU default)")
    ap.add_argument("--compute-type", default="auto")
    ap.add_argument("--cpu-threads", type=int, default=0,
                    help="CTranslate2 threads per replica (0: the cores shared among the replicas)")
    ap.add_argument("--replicas", type=int, default=1, help="batched mode's model replicas, each batching on its own")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's allocator as it is (see "
                    "pipeline.stt._keep_freed_memory)")
    ap.add_argument("--encoder-window", choices=["full", "audio"], default="full",
                    help="both modes' encoder input: Whisper's 30 s window, or the speech only (for models "
                         "fine-tuned to read short windows)")
    ap.add_argument("--batch-size", type=int, default=None, help="batched mode (default: the engine's, 16)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--decode-tokens", type=int, default=16, help="tokens every decode runs (end-of-text suppressed)")
    ap.add_argument("--min-finals", type=int, default=32, help="finals per run at least (spread over the streams)")
    ap.add_argument("--min-per-stream", type=int, default=2, help="finals per stream at least")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the modes this many times per stream count")
    ap.add_argument("--partials", action="store_true", help="also send a partial before each final")
    ap.add_argument("--smoke", action="store_true", help="seconds, for CI: 1 and 4 streams, few utterances")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stt.json")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.arch is None:
        args.arch = "large-v3-turbo" if args.device == "cuda" else "tiny-test"
    if args.smoke:
        args.streams, args.min_finals, args.min_per_stream, args.decode_tokens, args.rounds = [1, 4], 4, 1, 8, 1
    t0 = time.perf_counter()
    print(f"STT engine, {args.arch} on {args.device}, {args.encoder_window} encoder window; "
          f"{args.decode_tokens} tokens per decode\n")
    print(HEAD)
    print("-" * len(HEAD))
    result = asyncio.run(bench(args))
    gains, cpu_gains = speedups(result["runs"]), speedups(result["runs"], "audio_s_per_cpu_s")
    print("\nbatched / one-at-a-time, audio s per wall s: " + ", ".join(f"{n} streams {g}x" for n, g in gains.items()))
    print("batched / one-at-a-time, audio s per CPU s:  "
          + ", ".join(f"{n} streams {g}x" for n, g in cpu_gains.items()))
    out = {
        "benchmark": "STT engine: N concurrent streams of finals (closed loop), batched vs one-at-a-time",
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "device": result["device"], "arch": args.arch, "model": result["model"], "smoke": args.smoke,
        "encoder_window": args.encoder_window, "decode_tokens": args.decode_tokens, "batch_wait_ms": args.batch_wait_ms, "cpu_threads": args.cpu_threads,
        "engines": result["engines"],
        "partials": args.partials, "rounds": args.rounds,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "malloc_tuning": not args.no_malloc_tuning,
        "targets": {"throughput_gain_at_32_streams": {"cuda": 8, "cpu": 2}},
        "throughput_gain": {str(k): v for k, v in gains.items()},
        "cpu_efficiency_gain": {str(k): v for k, v in cpu_gains.items()},
        "runs": result["runs"],
        "total_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"wrote {shown} in {out['total_s']} s")
    return out


if __name__ == "__main__":
    main()
