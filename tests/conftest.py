from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
ARTIFACTS = ROOT / "test-artifacts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from pipeline.audio import load_audio  # noqa: E402
from pg import postgres_url  # noqa: E402,F401  (session fixture: a throwaway PostgreSQL server)


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("PARLEY_TEST_CACHE", user_cache_dir("parley"))) / "test-models"


@pytest.fixture(scope="session")
def tiny_whisper_path() -> Path:
    from tiny_whisper import build

    return build(cache_dir() / "tiny-whisper-v1")


@pytest.fixture
def speech() -> Callable[[str], np.ndarray]:
    """A real recording from tests/data as 16 kHz mono float32."""
    return lambda name: load_audio(str(DATA / name))


@pytest.fixture
async def fake_llm():
    from fake_llm import FakeLLM

    server = await FakeLLM().start()
    yield server
    await server.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class EventLog:
    """Collects pipeline events and lets a test wait for one, with a timeout, without polling."""

    def __init__(self) -> None:
        self.events: list = []
        self.frames: list[int | None] = []  # the audio clock (a Driver's frame index) at each event
        self.clock: Callable[[], int] | None = None  # set by the Driver
        self._changed = asyncio.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        self.frames.append(self.clock() if self.clock else None)
        self._changed.set()

    def notify(self) -> None:
        self._changed.set()

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def frame_of(self, event) -> int | None:
        """The audio-clock frame during which ``event`` was emitted."""
        return next(f for e, f in zip(self.events, self.frames) if e is event)

    async def wait_for(self, predicate: Callable[[list], object], timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while not (result := predicate(self.events)):
                self._changed.clear()
                await self._changed.wait()
        return result


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()


@pytest.fixture
def loopback_ice(monkeypatch):
    """aioice finds no candidates on a loopback-only host unless 127.0.0.1 is a host address."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@contextlib.asynccontextmanager
async def running_server(tiny_whisper_path: Path, fake_llm, tmp_path: Path, **overrides):
    """A real ``parley serve`` (uvicorn + FastAPI) on a free loopback port, in this event loop;
    ``overrides`` are Settings fields."""
    import socket

    import uvicorn

    from agent.config import Settings
    from signaling.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fields = dict(host="127.0.0.1", port=port, stt_model=str(tiny_whisper_path), stt_device="cpu",
                  stt_max_new_tokens=12, llm_base_url=fake_llm.url, llm_api_key="test", llm_model="test-model",
                  tts="espeak", room_grace_s=2.0, database_url=f"sqlite+aiosqlite:///{tmp_path}/parley.db",
                  audio_dir=str(tmp_path / "audio"))
    settings = Settings(**{**fields, **overrides}, _env_file=None)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.get_running_loop().create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:  # uvicorn exposes no start event; this yields until it listens
            await asyncio.sleep(0.02)
    server.app_state = app.state
    server.url = f"http://127.0.0.1:{port}"
    server.llm = fake_llm
    server.settings = settings
    try:
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def parley_server(tiny_whisper_path, fake_llm, loopback_ice, tmp_path):
    async with running_server(tiny_whisper_path, fake_llm, tmp_path) as server:
        yield server
