"""Soak: concurrent rooms for a long while, with churn, and nothing may leak or fail.

    python bench/soak.py [--rooms 10] [--duration-s 120] [--warmup-s 30]     (or: parley bench soak ...)

A real Parley server in its own process (bench/_harness.py's server: ``create_app`` under uvicorn,
the real VAD, turn-taking, persona, store and aiortc peers, the tests' tiny Whisper through the real
faster-whisper, espeak-ng as the local TTS, a local OpenAI-compatible stand-in LLM) serves ``--rooms``
room slots of aiortc clients on loopback. Each client says real recordings (``../shared/speech``
when present, else the copies in tests/data) into its microphone, waits for the reply, pauses, and
says the next; after a session of 8-25 s it leaves in one of three ways, and its slot goes on:
- ``leave``: the client closes; the room closes after its grace period; the slot opens a new room;
- ``reconnect``: the client closes and a new one joins the same room within the grace period
  (a page reload: the conversation goes on with a new peer);
- ``disconnect-bot``: the client asks the agent to hang up (RTVI), then closes.

The server process reports its own state on a route only this script installs (``/soak/state``):
RSS, asyncio tasks, threads, open file descriptors, rooms, and every exception that reached the
event loop's handler or was logged at ERROR (a task that failed, a 500). The verdict:
- zero unhandled exceptions (and no traceback in the server's output);
- RSS at the end of the load under 110 % of RSS at the end of the warm-up;
- once every client has left and every room has closed: the same asyncio tasks as before the
  first room, no thread beyond the process-wide pools (the loop's executor, SQLAlchemy's SQLite
  connections, the Whisper batcher), no file descriptor beyond the database's;
- every room slot kept talking (turns answered) and every session connected.
Results go to bench/results/soak.json.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import platform
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (ROOT, SERVER_ENV, Server, install_counting_decoder, opus_payloads,  # noqa: E402
                      patch_loopback_ice, save_result, sleep_until, speech_payloads)

SPEECH_DIRS = [Path(os.environ["PARLEY_SPEECH_DIR"])] if os.environ.get("PARLEY_SPEECH_DIR") else []
SPEECH_DIRS += [ROOT.parent / "shared" / "speech", ROOT / "tests" / "data"]
RECORDINGS = ["en_librivox_sense_0880.wav", "en_harvard_spk1_snt1.wav", "en_harvard_spk1_snt3.wav",
              "en_birch_canoe.wav", "en_goforward.wav", "en_LDC93S1_timit.wav", "fr_picovoice_cv.wav",
              "en_picovoice_cv.wav"]
RSS_GROWTH_LIMIT = 0.10
SAMPLE_S = 5.0
# Process-wide pools, bounded: the loop's default executor ("asyncio_", "uvloop_" under uvloop:
# asyncio.to_thread, the turn model), Whisper's workers, other executors.
POOL_THREADS = ("asyncio_", "uvloop_", "whisper-", "ThreadPoolExecutor")
DB_FILES = ("parley.db", "parley.db-wal", "parley.db-shm")
# Process-wide, opened once on first use and kept: onnxruntime's telemetry database (the first VAD
# model), the pools of connections to the LLM and from HTTP clients (this script's own polling), the
# pipes of espeak-ng's spare processes (one per recent voice, bounded by EspeakTTS.max_spares).
PROCESS_WIDE = (".onnxruntime/", "tcp:llm-pool", "tcp:http-in", "pipe:tts-spare")
# The soak is about lifetimes, not abuse limits: the server's per-address signaling limit would
# refuse a churning client process that is all on 127.0.0.1.
SOAK_ENV = {**SERVER_ENV, "PARLEY_SIGNALING_RATE_PER_MIN": "100000", "PARLEY_SIGNALING_BURST": "100000",
            "PARLEY_MAX_MESSAGES_PER_S": "1000"}


# ---------------------------------------------------------------------------------------- server


def serve(args: argparse.Namespace) -> None:
    """The server child: what ``parley serve`` runs, plus ``/soak/state``."""
    import gc
    import socket
    import threading

    import psutil
    import uvicorn

    from _harness import ToneTTS, tiny_whisper
    from agent.config import Settings
    from agent.engines import build_engines
    from signaling.app import create_app

    patch_loopback_ice()
    tmp = Path(args.workdir)
    settings = Settings(host="127.0.0.1", port=args.port, stt_model=args.stt or str(tiny_whisper()), stt_device="cpu",
                        # The engine's peak memory is reserved at start: growth after the warm-up
                        # is then a leak, not the first full batch reaching the allocator's high mark.
                        stt_max_new_tokens=12, stt_warm_peak=True,
                        llm_base_url=args.llm, llm_api_key="soak", llm_model="soak",
                        tts="espeak", room_grace_s=args.grace_s, max_rooms=1000,
                        database_url=f"sqlite+aiosqlite:///{tmp}/parley.db", audio_dir=str(tmp / "audio"),
                        log_level="warning", _env_file=None)
    engines = build_engines(settings)
    if args.tts == "tone":
        engines.tts = ToneTTS()
    app = create_app(settings, engines)
    errors: list[str] = []
    counted = collections.Counter()

    def record(what: str) -> None:
        counted[what.splitlines()[0][:200]] += 1
        if len(errors) < 200:
            errors.append(what if len(what) <= 4000 else what[:600] + "\n...\n" + what[-3000:])

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            if rec.levelno >= logging.ERROR:
                exc = f"\n{logging.Formatter().formatException(rec.exc_info)}" if rec.exc_info else ""
                record(f"{rec.name}: {rec.getMessage()}{exc}")

    def on_loop_exception(loop, context: dict) -> None:
        exc = context.get("exception")
        record(f"event loop: {context.get('message')}: {exc!r}")
        loop.default_exception_handler(context)

    installed = []
    proc = psutil.Process()
    llm_port = int(args.llm.rsplit(":", 1)[1].split("/")[0])

    async def state() -> dict:
        if not installed:  # the first call comes before any room: from then on, nothing is missed
            asyncio.get_running_loop().set_exception_handler(on_loop_exception)
            installed.append(True)
        gc.collect()
        me = asyncio.current_task()
        sockets = {c.fd: c for c in proc.net_connections(kind="inet")}
        fds = []
        spares = getattr(engines.tts, "spare_fds", set)()
        for fd in os.listdir("/proc/self/fd"):
            if int(fd) in spares:
                fds.append("pipe:tts-spare")
                continue
            c = sockets.get(int(fd))
            if c is not None and c.raddr:
                # Connections by role: to the LLM (its client's keep-alive pool), from HTTP clients
                # (this very request among them), and the rest (ICE, DTLS: per room).
                role = ("llm-pool" if c.raddr.port == llm_port else "http-in" if c.laddr.port == args.port
                        else "peer")
                fds.append(f"tcp:{role}" if c.type == socket.SOCK_STREAM else f"udp:{role}")
                continue
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass  # the listing's own descriptor
        return {"rss": proc.memory_info().rss, "rooms": len(app.state.rooms.rooms),
                "peers": len(app.state.rooms.peers),
                # by what runs (an async generator's finalizer has no qualname), not by name
                "tasks": sorted(getattr(t.get_coro(), "__qualname__", None) or t.get_name()
                                for t in asyncio.all_tasks() if t is not me),
                "threads": sorted(t.name for t in threading.enumerate()), "fds": sorted(fds),
                "errors": errors[-20:], "error_count": sum(counted.values()), "error_kinds": dict(counted)}

    app.add_api_route("/soak/state", state, methods=["GET"])
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    handler = Collect()
    for name in ("", "uvicorn", "uvicorn.error"):  # uvicorn's loggers do not propagate to the root
        logging.getLogger(name).addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    uvicorn.Server(config).run()


class SoakServer(Server):
    def __init__(self, llm_url: str, workdir: Path, tts: str, grace_s: float):
        super().__init__(llm_url, workdir, tts=tts)
        self.cmd = [sys.executable, str(Path(__file__)), "serve", "--port", str(self.port), "--llm", llm_url,
                    "--tts", tts, "--workdir", str(workdir), "--grace-s", str(grace_s)]

    async def start(self, timeout: float = 90.0) -> "SoakServer":
        import _harness

        env = _harness.SERVER_ENV
        _harness.SERVER_ENV = SOAK_ENV  # Server.start launches the child with this environment
        try:
            return await super().start(timeout)
        finally:
            _harness.SERVER_ENV = env


# ---------------------------------------------------------------------------------------- clients


def recordings() -> tuple[list[list[bytes]], list[str], str]:
    """The recordings as Opus payloads (the clients' microphones send them as they are)."""
    from pipeline.audio import float_to_int16, load_audio, resample_once

    for folder in SPEECH_DIRS:
        found = [folder / n for n in RECORDINGS if (folder / n).exists()]
        if len(found) >= 3:
            break
    else:
        raise SystemExit(f"no recordings found in {', '.join(map(str, SPEECH_DIRS))}")
    out = [opus_payloads(float_to_int16(resample_once(load_audio(str(p)), 16000, 48000))) for p in found]
    return out, [p.name for p in found], str(found[0].parent.relative_to(ROOT.parent)
                                              if found[0].is_relative_to(ROOT.parent) else found[0].parent)


class Tally:
    def __init__(self) -> None:
        self.sessions = self.connect_failures = self.turns_said = self.no_reply = 0
        self.bot_replies = 0
        self.ways = collections.Counter()
        self.client_errors: collections.Counter = collections.Counter()
        self.slot_turns: collections.Counter = collections.Counter()


async def slot(i: int, url: str, http, speech: list[list[bytes]], silence: bytes, end: float,
               tally: Tally, rng: random.Random) -> None:
    """One room slot: sessions one after another until ``end``, each left one of three ways."""
    from _harness import RoomClient

    room, gen = f"soak-{i}-0", 0
    while time.monotonic() < end - 5:
        client = RoomClient(url, room, [p for s in rng.sample(speech, 2) for p in s], silence,
                            seed=zlib.crc32(f"{room}:{gen}".encode()))
        way = rng.choice(["leave", "reconnect", "disconnect-bot"])
        try:
            await client.connect(http)
            async with asyncio.timeout(30):
                await client.ready.wait()
        except Exception as e:
            tally.connect_failures += 1
            tally.client_errors[f"connect: {type(e).__name__}: {e}"[:200]] += 1
            await client.close()
            await asyncio.sleep(1.0)  # before trying again: a pause, not a wait for an event
            continue
        tally.sessions += 1
        now = time.monotonic()
        t1 = min(end, now + rng.uniform(8, 25))
        client.start(now, now, t1)
        await sleep_until(t1)  # the session's length: a wall-clock instant
        if way == "disconnect-bot":
            hung_up = asyncio.Event()
            client.pc.on("connectionstatechange", lambda: client.pc.connectionState in ("closed", "failed")
                         and hung_up.set())
            client.send("disconnect-bot", {})
            try:
                await asyncio.wait_for(hung_up.wait(), 10)
            except TimeoutError:
                tally.client_errors["disconnect-bot: the agent did not hang up within 10 s"] += 1
        await client.close()
        tally.ways[way] += 1
        tally.turns_said += client.turns_said
        tally.no_reply += client.no_reply
        tally.bot_replies += client.bot_stops
        tally.slot_turns[i] += client.bot_stops
        for e in client.errors:
            tally.client_errors[e[:200]] += 1
        gen += 1
        if way != "reconnect":
            room = f"soak-{i}-{gen}"  # a new conversation; the old room closes after its grace period


async def get_state(http, server: Server) -> dict:
    import httpx

    try:
        return (await http.get(f"{server.url}/soak/state", timeout=30)).json()
    except httpx.TransportError as e:  # the server died: say how, not only that it is unreachable
        code = server.proc.returncode if server.proc else None
        raise RuntimeError(f"the server is unreachable ({e!r}; exit code {code}):\n{server.log_tail()}") from e


def leftovers(before: list[str], after: list[str], ignore=lambda x: False) -> list[str]:
    extra = collections.Counter(x for x in after if not ignore(x)) - collections.Counter(
        x for x in before if not ignore(x))
    return sorted(extra.elements())


async def run(rooms: int, duration_s: float, warmup_s: float, tts: str, grace_s: float, seed: int,
              log=print) -> dict:
    import httpx

    from fake_llm import FakeLLM

    patch_loopback_ice()
    install_counting_decoder()
    speech, names, speech_dir = recordings()
    _, silence = speech_payloads()
    llm = await FakeLLM().start()
    llm.behaviour.reply = "Thank you. That is a clear answer. Could you tell me more about the result?"
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="parley-soak-") as tmp:
        server = SoakServer(llm.url, Path(tmp), tts, grace_s)
        samples: list[dict] = []
        try:
            await server.start()
            # Idle connections dropped before uvicorn's 5 s keep-alive ends them: reusing one the
            # server is closing at that instant fails the request (ReadError), a race of the test
            # client's pool, not of Parley (it failed one connect in ~70 in CI).
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(keepalive_expiry=2.0)) as http:
                first = await get_state(http, server)
                t_start = time.monotonic()
                end = t_start + duration_s
                tally = Tally()

                async def sampler() -> None:
                    while True:
                        s = await get_state(http, server)
                        samples.append({"t": round(time.monotonic() - t_start, 1), "rss_mb": round(s["rss"] / 2**20, 1),
                                        "rooms": s["rooms"], "tasks": len(s["tasks"]), "threads": len(s["threads"]),
                                        "fds": len(s["fds"]), "errors": s["error_count"]})
                        log(f"  t={samples[-1]['t']:>6}s rooms={s['rooms']:>3} rss={samples[-1]['rss_mb']:>7} MB "
                            f"tasks={len(s['tasks']):>4} threads={len(s['threads']):>3} fds={len(s['fds']):>4} "
                            f"errors={s['error_count']}")
                        await asyncio.sleep(SAMPLE_S)  # the sampling period, not a wait for an event

                sampling = asyncio.get_running_loop().create_task(sampler())
                slots = [asyncio.get_running_loop().create_task(
                    slot(i, server.url, http, speech, silence, end, tally, random.Random(rng.random())))
                    for i in range(rooms)]
                try:
                    await asyncio.gather(*slots)
                finally:
                    for t in slots:
                        t.cancel()
                    await asyncio.gather(*slots, return_exceptions=True)
                    sampling.cancel()
                    await asyncio.gather(sampling, return_exceptions=True)
                loaded = await get_state(http, server)
                samples.append({"t": round(time.monotonic() - t_start, 1), "rss_mb": round(loaded["rss"] / 2**20, 1),
                                "rooms": loaded["rooms"], "tasks": len(loaded["tasks"]),
                                "threads": len(loaded["threads"]), "fds": len(loaded["fds"]),
                                "errors": loaded["error_count"]})
                drained = False
                deadline = time.monotonic() + grace_s + 30
                while time.monotonic() < deadline:
                    last = await get_state(http, server)
                    if last["rooms"] == 0 and last["peers"] == 0:
                        drained = True
                        break
                    await asyncio.sleep(0.25)  # rooms close after their grace period; polled across processes
                # Tasks a close started (a recorder's last write) end a few loop turns later: take the
                # final count when two readings a moment apart agree.
                for _ in range(20):
                    await asyncio.sleep(0.25)  # polled across processes
                    again = await get_state(http, server)
                    if again["tasks"] == last["tasks"]:
                        break
                    last = again
        except BaseException:
            log(server.log_tail())
            raise
        finally:
            await server.stop()
            await llm.stop()
        server_log = server.log.read_text(errors="replace") if server.log.exists() else ""

    warm = next((s for s in samples if s["t"] >= warmup_s), samples[0] if samples else None)
    loaded_rss = samples[-1]["rss_mb"] if samples else None
    growth = (loaded_rss - warm["rss_mb"]) / warm["rss_mb"] if warm and loaded_rss else None
    pooled = lambda name: name.startswith(POOL_THREADS) or "_connection_worker_thread" in name  # noqa: E731
    extra_tasks = leftovers(first["tasks"], last["tasks"])
    extra_threads = leftovers(first["threads"], last["threads"], pooled)
    extra_fds = leftovers(first["fds"], last["fds"], lambda f: f.endswith(DB_FILES) or any(
        p in f for p in PROCESS_WIDE))
    tracebacks = server_log.count("Traceback (most recent call last)")
    quiet_slots = [i for i in range(rooms) if tally.slot_turns[i] == 0]
    result = {
        "benchmark": f"soak: {rooms} concurrent room slots for {duration_s:.0f} s with churn (aiortc clients on "
                     "loopback saying real recordings; a real server process; stand-in LLM, "
                     f"{'espeak-ng' if tts == 'espeak' else 'tone'} TTS, tiny Whisper STT)",
        "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "rooms": rooms, "duration_s": duration_s, "warmup_s": warmup_s, "grace_s": grace_s, "tts": tts,
        "recordings": names, "speech_dir": speech_dir,
        "sessions": tally.sessions, "ways_left": dict(tally.ways), "connect_failures": tally.connect_failures,
        "turns_said": tally.turns_said, "bot_replies": tally.bot_replies, "no_reply": tally.no_reply,
        "client_errors": dict(tally.client_errors.most_common(10)),
        "unhandled_exceptions": last["error_count"], "exception_kinds": last["error_kinds"],
        "exceptions": last["errors"][:5], "server_log_tracebacks": tracebacks,
        "rss_mb_after_warmup": warm["rss_mb"] if warm else None, "rss_mb_end_of_load": loaded_rss,
        "rss_growth_pct": round(growth * 100, 2) if growth is not None else None,
        "rss_mb_after_drain": round(last["rss"] / 2**20, 1),
        "rooms_drained": drained,
        "tasks_before": len(first["tasks"]), "tasks_after": len(last["tasks"]), "leaked_tasks": extra_tasks,
        "threads_before": len(first["threads"]), "threads_after": len(last["threads"]), "leaked_threads": extra_threads,
        "fds_before": len(first["fds"]), "fds_after": len(last["fds"]), "leaked_fds": extra_fds,
        "samples": samples,
    }
    failed = []
    if last["error_count"] or tracebacks:
        failed.append(f"{last['error_count']} unhandled exception(s), {tracebacks} traceback(s) in the server log")
    if growth is None or growth >= RSS_GROWTH_LIMIT:
        failed.append(f"RSS grew {result['rss_growth_pct']} % after warm-up (limit {RSS_GROWTH_LIMIT * 100:.0f} %)")
    if not drained:
        failed.append("rooms did not all close")
    for key in ("leaked_tasks", "leaked_threads", "leaked_fds"):
        if result[key]:
            failed.append(f"{key}: {result[key][:10]}")
    if tally.connect_failures:
        failed.append(f"{tally.connect_failures} session(s) failed to connect")
    if quiet_slots:
        failed.append(f"room slots {quiet_slots} got no reply in the whole run")
    result["failed"] = failed
    result["ok"] = not failed
    return result


def summary(r: dict) -> str:
    return "\n".join([
        f"{r['rooms']} room slots, {r['duration_s']:.0f} s: {r['sessions']} sessions ({r['ways_left']}), "
        f"{r['turns_said']} utterances, {r['bot_replies']} replies, {r['no_reply']} without a reply in 10 s",
        f"unhandled exceptions: {r['unhandled_exceptions']} (tracebacks in the server log: {r['server_log_tracebacks']})",
        f"RSS: {r['rss_mb_after_warmup']} MB after the {r['warmup_s']:.0f} s warm-up, {r['rss_mb_end_of_load']} MB at the "
        f"end of the load ({r['rss_growth_pct']:+} %), {r['rss_mb_after_drain']} MB once every room closed",
        f"after every room closed: tasks {r['tasks_before']} -> {r['tasks_after']}, threads {r['threads_before']} -> "
        f"{r['threads_after']} (pools grow on demand), fds {r['fds_before']} -> {r['fds_after']}; "
        f"leaked: tasks {r['leaked_tasks'] or 'none'}, threads {r['leaked_threads'] or 'none'}, "
        f"fds {r['leaked_fds'] or 'none'}",
        "verdict: " + ("ok" if r["ok"] else "FAILED: " + "; ".join(r["failed"])),
    ])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--llm", required=True)
        ap.add_argument("--stt")
        ap.add_argument("--tts", choices=["tone", "espeak"], default="espeak")
        ap.add_argument("--workdir", required=True)
        ap.add_argument("--grace-s", type=float, default=1.0)
        serve(ap.parse_args())
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", type=int, default=10, help="concurrent room slots")
    ap.add_argument("--duration-s", type=float, default=120.0)
    ap.add_argument("--warmup-s", type=float, help="RSS is compared with its value at this time "
                    "(default: a quarter of the run, at most 60 s)")
    ap.add_argument("--tts", choices=["espeak", "tone"], default="espeak")
    ap.add_argument("--grace-s", type=float, default=1.0, help="the server's room grace period")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = ap.parse_args()
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, args.duration_s / 4)
    result = asyncio.run(run(args.rooms, args.duration_s, warmup, args.tts, args.grace_s, args.seed,
                             log=lambda s: print(s, flush=True)))
    print()
    print(summary(result))
    save_result(args.out, result)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
