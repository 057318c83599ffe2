"""The ``parley`` command."""
from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import time
from pathlib import Path


class _ContextFilter(logging.Filter):
    """Every record gets a ``room`` so the format can always show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "room"):
            record.room = "-"
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (Loki, CloudWatch, ...): the room is a field, not text."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "room": record.room,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        formatter: logging.Formatter = JSONFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [room=%(room)s] %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from signaling.app import create_app

    from .config import get_settings

    settings = get_settings()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if args.workers is not None:
        settings.workers = args.workers
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("parley")
    if args.uds:  # a worker of a front (agent/workers.py)
        from .workers import serve_worker

        serve_worker(create_app(settings), args.uds, log_level=settings.log_level, log_config=None)
        return
    mode = "offline personas (no LLM configured)" if settings.offline_llm else f"LLM {settings.llm_model}"
    workers = f", {settings.workers} worker processes" if settings.workers > 1 else ""
    log.info("Parley on http://%s:%d  (%s, STT %s, TTS %s%s)", settings.host, settings.port, mode,
             settings.stt_model, settings.tts, workers)
    if settings.workers > 1:
        from signaling.front import create_front

        app = create_front(settings, settings.workers)
    else:
        app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)


def livekit(args: argparse.Namespace) -> None:
    from .config import get_settings
    from .livekit_worker import run

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("parley").info("LiveKit worker %r for %s", settings.livekit_agent_name,
                                     settings.livekit_url or "LIVEKIT_URL")
    run(settings, devmode=args.dev)


def stt_worker(args: argparse.Namespace) -> None:
    import asyncio
    import os

    # One OpenBLAS thread (numpy's log-mel product): its spinning threads slow the decoders.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from pipeline.stt_remote import serve

    from .config import get_settings
    from .engines import whisper_options

    from .workers import die_with_parent

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    die_with_parent()  # started by a front (parley serve --workers): it leaves with it
    asyncio.run(serve(args.socket, whisper_options(settings)))


def token(args: argparse.Namespace) -> None:
    from signaling.auth import mint

    from .config import get_settings

    settings = get_settings()
    if not settings.auth_secret:
        sys.exit("set PARLEY_AUTH_SECRET (the server's secret) to mint tokens")
    signed = mint(settings.auth_secret, args.user, args.room, args.ttl)
    print(signed)
    # The fragment keeps the token out of server logs and Referer headers.
    print(f"page: http://{settings.host}:{settings.port}/?room={args.room}#token={signed}", file=sys.stderr)


def bench(args: argparse.Namespace) -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.what}.py"
    if not script.exists():
        sys.exit(f"no benchmark {args.what!r} (benchmarks run from a source checkout: {script.parent})")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    # Before numpy loads: its OpenBLAS thread pool spins on the mel-feature product and took 40 % of
    # the server's CPU at 5 rooms, competing with the event loop for nothing.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="parley", description="Real-time voice agent for practice conversations.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the web server and the agent")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="agent processes behind this address (default: PARLEY_WORKERS, 1); "
                   "each holds its rooms on its own event loop and core, all share one STT worker")
    p.add_argument("--uds", help=argparse.SUPPRESS)  # a worker of a front: listen on this Unix socket
    p.set_defaults(func=serve)
    p = sub.add_parser("livekit", help="run a LiveKit Agents worker: the agent joins LiveKit rooms it is dispatched to")
    p.add_argument("--dev", action="store_true", help="livekit-agents development mode (its health check on a random port, not 8081)")
    p.set_defaults(func=livekit)
    p = sub.add_parser("stt-worker", help="serve speech recognition to the agent processes of this host "
                       "(they set PARLEY_STT_WORKER to the socket)")
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.set_defaults(func=stt_worker)
    p = sub.add_parser("token", help="mint a signed room token (servers with PARLEY_AUTH_SECRET); "
                       "your application does the same with any JWT library, see SECURITY.md")
    p.add_argument("--room", required=True)
    p.add_argument("--user", required=True, help="the user's id in your application")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds the token is valid (default 3600)")
    p.set_defaults(func=token)
    p = sub.add_parser("bench", help="run a benchmark from bench/ (pipeline, ...)")
    p.add_argument("what")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
