"""Writes one room's conversation to the store as it happens.

Events are turned into write operations at once and queued; one owned writer task applies them in
order, each in its own transaction. A turn is on disk a few milliseconds after it completes, so a
killed process loses at most the turn in progress. A database hiccup is retried, never allowed to
break the conversation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import wave
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import frames as F
from pipeline.audio import float_to_int16
from pipeline.frames import PIPELINE_RATE
from pipeline.tasks import TaskSet

from personas.catalog import PersonaSession

from .store import Store
from .store.db import new_session_id

log = logging.getLogger(__name__)
_PERSONA_KINDS = {"feedback", "delivery", "correction", "vocabulary"}


class Recorder:
    def __init__(self, store: Store, user_id: int, room: str, persona: PersonaSession, retries: int = 3,
                 audio_dir: Path | None = None, owner: str | None = None):
        self.owner = owner
        self.store, self.user_id, self.room, self.persona, self.retries = store, user_id, room, persona, retries
        # Only when the person opted in for this session.
        self.audio_dir = audio_dir if persona.options.get("record_audio") else None
        self.session_id = new_session_id()
        self._started = False  # the session row is written with its first turn: no empty sessions
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._seq = 0
        self._metrics: dict[str, Any] | None = None  # the current reply's latencies
        self._result: dict[str, Any] | None = None
        self._tasks = TaskSet(f"{room}:recorder")
        self._writer = self._tasks.spawn(self._write_loop(), "writer")
        self._log = logging.LoggerAdapter(log, {"room": room})

    # ------------------------------------------------------------------ inputs (sync, from the room)

    def on_event(self, ev: F.Event) -> None:
        if isinstance(ev, F.Transcript) and ev.final and ev.text.strip():
            audio = ev.audio if self.audio_dir is not None and ev.audio is not None and len(ev.audio) else None
            self._turn("user", ev.text, typed=ev.typed, speech_s=ev.speech_s, pauses=list(ev.pauses) or None,
                       audio=audio)
        elif isinstance(ev, F.TurnMetrics):
            self._metrics = {k: v for k, v in dataclasses.asdict(ev).items() if k not in ("at", "turn")}
        elif isinstance(ev, F.BotTurnEnded) and ev.text.strip():
            metrics, self._metrics = self._metrics, None
            self._turn("agent", ev.text, interrupted=ev.interrupted, metrics=metrics)

    def on_persona(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind in _PERSONA_KINDS:
            data = {k: v for k, v in payload.items() if k != "type"}
            self._put(lambda: self.store.add_evaluation(self.session_id, kind, data))
        elif kind in ("scorecard", "summary"):
            result = self._result = {k: v for k, v in payload.items() if k != "type"}
            self._put(lambda: self.store.set_result(self.session_id, result))

    def _turn(self, speaker: str, text: str, audio: np.ndarray | None = None, **kw: Any) -> None:
        self._seq += 1
        seq = self._seq

        async def write() -> None:
            if audio is not None:
                path = self.audio_dir / self.session_id / f"{seq:04d}.wav"
                await asyncio.to_thread(write_wav, path, audio)  # file I/O stays off the event loop
                kw["audio_path"] = str(path)
            await self.store.add_turn(self.session_id, seq, speaker, text, **kw)

        self._put(write)

    def _put(self, op: Callable[[], Awaitable[None]]) -> None:
        if not self._started:
            self._started = True
            p = self.persona
            self._queue.put_nowait(lambda: self.store.start_session(
                self.user_id, self.room, p.persona, p.kind, p.options, session_id=self.session_id,
                owner=self.owner))
        self._queue.put_nowait(op)

    # ------------------------------------------------------------------ the writer

    async def _write_loop(self) -> None:
        while (op := await self._queue.get()) is not None:
            for attempt in range(self.retries + 1):
                try:
                    await op()
                    break
                except Exception as e:  # the database is down or locked: wait a little, try again
                    if attempt == self.retries:
                        self._log.error("dropping a write after %d attempts: %s", attempt + 1, e)
                    else:
                        await asyncio.sleep(0.2 * 2 ** attempt)  # back-off before retrying a write

    async def close(self, status: str = "completed", timeout_s: float = 10.0) -> None:
        """Flush what is queued, then mark the session ended."""
        result = self._result
        if self._started:
            self._queue.put_nowait(lambda: self.store.end_session(self.session_id, status, result))
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
        except TimeoutError:
            self._log.error("store writes did not finish within %.0fs", timeout_s)
        await self._tasks.aclose()


def write_wav(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(PIPELINE_RATE)
        w.writeframes(float_to_int16(audio).tobytes())


async def expire_audio(store: Store, retention_days: int, now: datetime | None = None) -> int:
    """Delete recordings older than the retention period; returns how many files went."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=retention_days)
    paths = await store.delete_audio_older_than(cutoff)

    def unlink() -> None:
        for p in paths:
            Path(p).unlink(missing_ok=True)

    await asyncio.to_thread(unlink)
    return len(paths)
