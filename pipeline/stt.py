"""Speech-to-text: faster-whisper behind a small protocol.

One model per process, shared by every conversation (``shared_whisper``). Decodes run in one
dedicated thread per model; a small scheduler in front of it serves finals before partials and drops
partials that waited too long, so a busy engine sheds the work nobody will look at first.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .audio import rms_dbfs
from .frames import PIPELINE_RATE

log = logging.getLogger(__name__)

# Phrases Whisper is known to invent on silence and noise (its training data's subtitle credits).
_HALLUCINATIONS = {
    "thank you.", "thank you", "thanks for watching!", "thanks for watching.", "you", "bye.",
    "subtitles by the amara.org community", "please subscribe.", "sous-titrage st' 501",
    "untertitel im auftrag des zdf, 2017", "untertitel der amara.org-community",
}


@dataclass(slots=True)
class STTResult:
    text: str
    language: str | None
    no_speech_prob: float
    avg_logprob: float
    duration: float  # seconds of audio decoded
    decode_ms: float


class STT(Protocol):
    async def transcribe(
        self, audio: np.ndarray, *, final: bool, language: str | None = None, prompt: str | None = None
    ) -> STTResult | None:
        """Transcribe 16 kHz mono float32. Returns None for a partial dropped as stale."""


@dataclass(frozen=True)
class WhisperOptions:
    model: str = "small"  # a faster-whisper size name (fetched to the cache once) or a local path
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str = "auto"
    cpu_threads: int = 0  # 0: ctranslate2's default
    download_root: str | None = None
    beam_size: int = 1  # greedy: a turn-taking agent wants the first answer fast
    max_new_tokens: int | None = None
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    min_audio_s: float = 0.25
    silence_dbfs: float = -55.0
    partial_deadline_s: float = 1.0  # a partial still queued after this is dropped


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # a broken CUDA install must not stop a CPU host
        return "cpu"


class _Scheduler:
    """Grants the single decode slot: finals first (oldest first), then the newest partials."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, final: bool, deadline: float | None) -> bool:
        if not self._busy and not self._waiting:
            self._busy = True
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Partials are served newest-first: an old partial is superseded by a newer one anyway.
        key = next(self._seq)
        heapq.heappush(self._waiting, (0 if final else 1, key if final else -key, fut))
        try:
            if deadline is None:
                await fut
            else:
                await asyncio.wait_for(asyncio.shield(fut), max(deadline - time.monotonic(), 0))
            return True
        except asyncio.TimeoutError:
            if fut.done():
                return True  # granted just as the deadline passed: use it
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted to a caller that is gone: pass it on
            fut.cancel()
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)
                return
        self._busy = False

    @property
    def queued(self) -> int:
        return sum(1 for *_, f in self._waiting if not f.done())


class WhisperSTT:
    """faster-whisper, loaded once, decoding in its own thread."""

    def __init__(self, options: WhisperOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self._model = None
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")
        self._scheduler = _Scheduler()
        self._scheduler_loop: weakref.ref | None = None

    def load(self):
        """Load the model (blocking; idempotent). Raises with a clear message when it cannot."""
        with self._load_lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                o = self.options
                compute = o.compute_type
                if compute == "auto":
                    compute = "int8_float16" if self.device == "cuda" else "int8"
                t0 = time.perf_counter()
                try:
                    self._model = WhisperModel(
                        o.model, device=self.device, compute_type=compute, cpu_threads=o.cpu_threads,
                        download_root=o.download_root,
                    )
                except Exception as e:
                    raise RuntimeError(f"cannot load Whisper model {o.model!r} on {self.device}: {e}") from e
                log.info("whisper %s loaded on %s/%s in %.1fs", o.model, self.device, compute, time.perf_counter() - t0)
        return self._model

    async def warm_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queued

    async def transcribe(
        self, audio: np.ndarray, *, final: bool, language: str | None = None, prompt: str | None = None
    ) -> STTResult | None:
        o = self.options
        duration = len(audio) / PIPELINE_RATE
        if duration < o.min_audio_s or rms_dbfs(audio) < o.silence_dbfs:
            return STTResult("", language, 1.0, 0.0, duration, 0.0)
        deadline = None if final else time.monotonic() + o.partial_deadline_s
        scheduler = self._scheduler_for_loop()
        if not await scheduler.acquire(final, deadline):
            return None
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._decode, audio, language, prompt, final)
        try:
            return await asyncio.shield(job)
        finally:
            if job.done():
                scheduler.release()
            else:
                # The caller gave up (a partial superseded by the final, a barge-in) but the thread
                # still decodes: hold the slot until it is really free, or the next job would queue
                # unseen in the executor and a final could wait behind a partial.
                job.add_done_callback(lambda job: _release_after(job, scheduler))

    def _scheduler_for_loop(self) -> _Scheduler:
        # The slot lives on one event loop. A new loop (each test has its own; a restarted server)
        # gets a fresh scheduler, so a decode left running by a closed loop cannot hold it forever.
        loop = asyncio.get_running_loop()
        if self._scheduler_loop is None or self._scheduler_loop() is not loop:
            self._scheduler, self._scheduler_loop = _Scheduler(), weakref.ref(loop)
        return self._scheduler

    def _decode(self, audio: np.ndarray, language: str | None, prompt: str | None, final: bool) -> STTResult:
        o = self.options
        model = self.load()
        t0 = time.perf_counter()
        segments, info = model.transcribe(
            audio.astype(np.float32, copy=False),
            language=language,
            initial_prompt=prompt or None,
            beam_size=o.beam_size,
            temperature=0.0,  # no fallback ladder: a second decode would double a turn's latency
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,  # our own VAD already cut the segment
            max_new_tokens=o.max_new_tokens,
        )
        segs = list(segments)
        texts, no_speech, logprob = [], 1.0, 0.0
        for s in segs:
            # Whisper's own rule: a segment that is probably silence *and* decoded with low
            # confidence is a hallucination.
            if s.no_speech_prob > o.no_speech_threshold and s.avg_logprob < o.logprob_threshold:
                continue
            texts.append(s.text.strip())
        if segs:
            no_speech = min(s.no_speech_prob for s in segs)
            logprob = sum(s.avg_logprob for s in segs) / len(segs)
        text = " ".join(t for t in texts if t).strip()
        if text.lower() in _HALLUCINATIONS and no_speech > 0.2:
            text = ""
        return STTResult(text, info.language, no_speech, logprob, len(audio) / PIPELINE_RATE,
                         (time.perf_counter() - t0) * 1000)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _release_after(job: asyncio.Future, scheduler: _Scheduler) -> None:
    if not job.cancelled():
        job.exception()  # retrieved: nobody is left to see it
    scheduler.release()


_shared: dict[WhisperOptions, WhisperSTT] = {}
_shared_lock = threading.Lock()


def shared_whisper(options: WhisperOptions) -> WhisperSTT:
    """The process-wide engine for these options: never one model per room."""
    with _shared_lock:
        engine = _shared.get(options)
        if engine is None:
            engine = _shared[options] = WhisperSTT(options)
        return engine
