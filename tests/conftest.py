from __future__ import annotations

import asyncio
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
        self._changed = asyncio.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        self._changed.set()

    def notify(self) -> None:
        self._changed.set()

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, predicate: Callable[[list], object], timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while not (result := predicate(self.events)):
                self._changed.clear()
                await self._changed.wait()
        return result


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()
