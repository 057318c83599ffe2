"""Speech-to-text: faster-whisper behind a small protocol, batched across every conversation.

One model per process (``shared_whisper``), owned by one worker thread (one per replica, if asked).
Every room's requests go into one bounded queue; the worker takes them in micro-batches (finals
first, oldest first; then partials, newest first), drops partials that waited past their deadline
without decoding them, and decodes a whole batch at once one level below ``WhisperModel.transcribe``:
log-mel features for the batch (numpy on the CPU, torch on a GPU), the CTranslate2 encoder (the
whole batch on a GPU; window by window on a CPU, where batching it gains nothing), then one
``generate`` per group of requests whose prompts have the same shape. For one request the result is
exactly what ``WhisperModel.transcribe`` gives for a single window with temperature 0, without
timestamps, not conditioned on previous text and without faster-whisper's VAD (``tests/test_stt.py``
compares them). Audio longer than one 30 s window is trimmed to it (the VAD never makes longer).

``pipeline.stt_remote`` serves the same engine to other processes over a Unix socket.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
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

MAX_AUDIO_S = 30.0  # one Whisper window; the VAD caps a segment at this length
_MAX_LENGTH = 448  # Whisper's decoder context, as faster-whisper counts it
_HOP = 160  # samples per mel frame
_WINDOW_FRAMES = 3000  # Whisper's 30 s window
# encoder_window="audio": the audio, half a second more, rounded up to two seconds (few distinct
# shapes, so requests of similar length still share a batch and the allocator reuses buffers).
_WINDOW_MARGIN_FRAMES = 50
_WINDOW_STEP_FRAMES = 200


@dataclass(slots=True)
class STTResult:
    text: str
    language: str | None
    no_speech_prob: float
    avg_logprob: float
    duration: float  # seconds of audio decoded
    decode_ms: float  # time the engine spent on the batch that decoded this request


class STT(Protocol):
    async def transcribe(
        self, audio: np.ndarray, *, final: bool, language: str | None = None, prompt: str | None = None,
        urgent: bool = False,
    ) -> STTResult | None:
        """Transcribe 16 kHz mono float32. Returns None for a partial dropped as stale.

        ``urgent``: a partial that a decision waits on (the transcript of a pause, which ends the turn
        or not and is kept as its final): served with the finals, ahead of every room's captions,
        and never dropped as stale. Engines without a queue may ignore it."""


class STTUnavailable(RuntimeError):
    """The engine cannot take requests: closed, or (remote) its worker is down."""


@dataclass(frozen=True)
class WhisperOptions:
    model: str = "small"  # a faster-whisper size name (fetched to the cache once) or a local path
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str = "auto"
    cpu_threads: int = 0  # CTranslate2 threads per replica; 0: the cores shared among the replicas
    # CTranslate2 model replicas (weights shared), each with its own batching thread taking its own
    # batches from the one queue: for many-core CPUs (e.g. 4 replicas x 4 threads on 16 cores).
    replicas: int = 1
    # On a CPU with glibc: keep freed encoder buffers instead of unmapping them (see
    # _keep_freed_memory; process-wide). Measured: twice the CPU throughput.
    tune_malloc: bool = True
    download_root: str | None = None
    beam_size: int = 1  # greedy: a turn-taking agent wants the first answer fast
    max_new_tokens: int | None = None
    suppress_tokens: tuple[int, ...] = (-1,)  # faster-whisper's meaning: -1 is its default set
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    min_audio_s: float = 0.25
    silence_dbfs: float = -55.0
    partial_deadline_s: float = 1.0  # a partial still queued after this is dropped, never decoded
    # Batching: up to batch_size requests per decode; the first request of a batch waits at most
    # batch_wait_ms for company (0: take what is queued). None: 16. On a CPU a batch saves decoder
    # work only (bench/stt.py: 16 gives ~10 % more throughput than 8 at 32 streams, with no worse latency).
    batch_size: int | None = None
    batch_wait_ms: float = 10.0
    # Back-pressure: with this many requests queued, a partial is refused at once (None) and a
    # final takes the place of the oldest queued partial, or waits for room.
    max_queue: int = 256
    # What the encoder reads. "full": every request padded to Whisper's 30 s window, as the model
    # was trained. "audio": only the audio plus half a second, in steps of two seconds: a 3 s answer
    # costs a 4 s window, a fifth of the encoder's work on a CPU, but only weights fine-tuned to read
    # short windows (FUTO's ACFT Whisper models, for one) keep their accuracy; stock Whisper loses it
    # (CTranslate2 issue #2100) and may not stop decoding, so this is not the default.
    encoder_window: str = "full"
    # At warm-up, decode one batch of the largest shape (batch_size windows of 30 s) once: the
    # process then holds its peak working memory from the start (the native buffers grow with the
    # batch and the audio, +150 MB for the toy test model at 8 x 30 s) instead of reaching it at
    # the first busy moment, which makes its memory predictable (container limits, leak checks).
    warm_peak: bool = False


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # a broken CUDA install must not stop a CPU host
        return "cpu"


def _keep_freed_memory() -> None:
    """Have glibc keep the encoder's freed buffers for the next window instead of unmapping them.

    A Whisper encoder allocates and frees tens of MB per 30 s window (the toy test model: two
    36 MB attention matrices). glibc serves blocks that large with mmap and unmaps them on free,
    so every window faults its buffers in again, page by page: measured here, half the encoder's
    time was the kernel zeroing pages. One heap (threads' own arenas are capped at 64 MiB), grown
    in large steps and not trimmed, serves them again from memory already mapped.
    Process-wide, idempotent; Linux/glibc only, elsewhere nothing happens.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl): its allocator, its rules
        return
    mallopt(-8, 1)  # M_ARENA_MAX: every thread allocates from the main heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum; larger blocks fit in the padded top
    mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap 256 MiB at a time
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only beyond 1 GiB free


def _cpu_count() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------- the request queue


@dataclass(eq=False)
class _Request:
    audio: np.ndarray
    final: bool
    language: str | None
    prompt: str | None
    deadline: float | None  # monotonic; partials only
    seq: int = 0
    queued_at: float = 0.0
    future: Future = field(default_factory=Future)
    # Its caller stopped waiting after the worker took it (a running Future cannot be cancelled):
    # the worker skips whatever of it has not started, encoder or decoder.
    abandoned: bool = False


class _RequestQueue:
    """Thread-safe, bounded, two-class queue: finals (FIFO) ahead of partials (newest first).

    Pure bookkeeping, no model: the asyncio side offers requests, the worker thread takes batches.
    A request's ``future`` (``concurrent.futures.Future``) is how it ends: a result, None (dropped
    partial), an exception, or cancelled by its caller before it was taken (then it is skipped).
    """

    def __init__(self, max_queue: int):
        self.max_queue = max(1, max_queue)
        self._finals: deque[_Request] = deque()
        self._partials: deque[_Request] = deque()  # oldest left, newest right
        self._space: deque[Future] = deque()  # finals waiting for room
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self.closed = False
        self.dropped_stale = 0
        self.refused = 0
        self._takers = 0  # workers inside take(): a backlog is shared among the idle ones

    def __len__(self) -> int:
        with self._cond:
            return self._live()

    def _live(self) -> int:
        return sum(1 for r in itertools.chain(self._finals, self._partials) if not r.future.done())

    def offer(self, req: _Request) -> tuple[bool, Future | None]:
        """(True, None): queued. (False, None): a partial refused. (False, fut): a final must wait
        for ``fut`` (room in the queue) and offer again."""
        evicted = None
        with self._cond:
            if self.closed:
                raise STTUnavailable("speech recognition engine is closed")
            self._prune()
            if len(self._finals) + len(self._partials) >= self.max_queue:
                if not req.final:
                    self.refused += 1
                    return False, None
                if not self._partials:
                    space: Future = Future()
                    self._space.append(space)
                    return False, space
                evicted = self._partials.popleft()  # the oldest partial makes room for a final
                self.refused += 1
            req.seq, req.queued_at = next(self._seq), time.monotonic()
            (self._finals if req.final else self._partials).append(req)
            self._cond.notify_all()
        if evicted is not None:
            _resolve(evicted.future, None)
        return True, None

    def _prune(self) -> None:
        """Forget requests their callers cancelled (under the lock)."""
        for q in (self._finals, self._partials):
            if any(r.future.done() for r in q):
                live = [r for r in q if not r.future.done()]
                q.clear()
                q.extend(live)

    def take(self, max_n: int, wait_s: float, idle_timeout_s: float = 0.5) -> list[_Request] | None:
        """The next batch (blocking). [] after ``idle_timeout_s`` with nothing to do; None once closed.

        The batch window starts when its oldest request arrived: a request that already waited
        for a busy engine does not wait again for company. With several workers taking, a
        backlog is split among the idle ones (8 queued, 2 idle: 4 each), so they decode in parallel.
        """
        with self._cond:
            self._takers += 1
            try:
                taken = self._take(max_n, wait_s, idle_timeout_s)
            finally:
                self._takers -= 1
                self._cond.notify_all()  # another idle worker may take what is left
        if taken is None:
            return None
        batch, stale, space = taken
        for r in stale:
            _resolve(r.future, None)
        for s in space:
            _resolve(s, None)
        return batch

    def _take(self, max_n: int, wait_s: float, idle_timeout_s: float):
        """(batch, stale partials, finals' room-waiters to wake) or None once closed; under the lock."""
        if not self._finals and not self._partials and not self.closed:
            self._cond.wait(idle_timeout_s)
        while True:
            if self.closed:
                return None
            self._prune()
            n = len(self._finals) + len(self._partials)
            if n == 0:
                return [], [], []
            if n >= max_n or wait_s <= 0:
                break
            first = min(r.queued_at for r in itertools.chain(self._finals, self._partials))
            remaining = first + wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        now = time.monotonic()
        max_n = min(max_n, -(-n // max(1, self._takers)))
        batch: list[_Request] = []
        stale: list[_Request] = []
        while self._finals and len(batch) < max_n:
            r = self._finals.popleft()
            if r.future.set_running_or_notify_cancel():
                batch.append(r)
        while self._partials and len(batch) < max_n:
            r = self._partials.pop()  # newest first
            if r.deadline is not None and now >= r.deadline:
                stale.append(r)
            elif r.future.set_running_or_notify_cancel():
                batch.append(r)
        # Older partials left behind may already be stale: drop them now, not after this batch.
        for r in list(self._partials):
            if r.deadline is not None and now >= r.deadline:
                self._partials.remove(r)
                stale.append(r)
        self.dropped_stale += len(stale)
        space = [self._space.popleft() for _ in range(min(len(self._space), len(batch) + len(stale)))]
        return batch, stale, space

    def close(self) -> list[_Request]:
        """Refuse new requests, wake the worker, and hand back what was still queued."""
        with self._cond:
            self.closed = True
            left = [*self._finals, *self._partials]
            self._finals.clear()
            self._partials.clear()
            space = list(self._space)
            self._space.clear()
            self._cond.notify_all()
        for s in space:
            _resolve(s, None)  # its final offers again and hears that the engine is closed
        return left


def _resolve(fut: Future, value=None, exc: BaseException | None = None) -> None:
    """Settle a future that its caller may have cancelled meanwhile."""
    if fut.done():
        return
    try:
        if not fut.running() and not fut.set_running_or_notify_cancel():
            return  # cancelled
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except Exception:  # InvalidStateError: settled concurrently
        pass


# ---------------------------------------------------------------------- the engine


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0  # decoded (not dropped)
    audio_s: float = 0.0
    busy_s: float = 0.0  # worker time spent decoding, summed over the workers
    stage_s: dict[str, float] = field(default_factory=dict)  # features / encode / decode, summed over replicas
    recent: deque = field(default_factory=lambda: deque(maxlen=100), repr=False)  # sizes of the last batches
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def batch_done(self, busy_s: float, results: list) -> None:
        with self._lock:
            self.recent.append(len(results))
            self.batches += 1
            self.busy_s += busy_s
            self.requests += len(results)
            self.audio_s += sum(r.duration for r in results)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.stage_s[stage] = self.stage_s.get(stage, 0.0) + now - since
        return now

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class WhisperSTT:
    """faster-whisper, loaded once, decoding micro-batches in its own thread."""

    def __init__(self, options: WhisperOptions):
        if options.encoder_window not in ("full", "audio"):
            raise ValueError(f"encoder_window must be 'full' or 'audio', not {options.encoder_window!r}")
        self.options = options
        self.device = resolve_device(options.device)
        self.batch_size = max(1, options.batch_size or 16)
        cores = _cpu_count()
        self.replicas = max(1, options.replicas)
        self.cpu_threads = options.cpu_threads or (max(1, cores // self.replicas) if self.device == "cpu" else 0)
        self.stats = EngineStats()
        self._model = None
        self._load_lock = threading.Lock()
        self._queue = _RequestQueue(options.max_queue)
        self._workers: list[threading.Thread] = []
        self._worker_lock = threading.Lock()
        self._closed = False
        self._tokenizers: dict[str | None, object] = {}
        self._suppress: list[int] | None = None
        self._torch_mel = None  # None: not tried yet; False: unavailable
        self._peaked = False

    # ------------------------------------------------------------------ public API

    def load(self):
        """Load the model (blocking; idempotent). Raises with a clear message when it cannot."""
        with self._load_lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                o = self.options
                compute = o.compute_type
                if compute == "auto":
                    compute = "int8_float16" if self.device == "cuda" else "int8"
                if self.device == "cpu" and o.tune_malloc:
                    _keep_freed_memory()
                t0 = time.perf_counter()
                try:
                    self._model = WhisperModel(
                        o.model, device=self.device, compute_type=compute, cpu_threads=self.cpu_threads,
                        num_workers=self.replicas, download_root=o.download_root,
                    )
                except Exception as e:
                    raise RuntimeError(f"cannot load Whisper model {o.model!r} on {self.device}: {e}") from e
                log.info("whisper %s loaded on %s/%s in %.1fs (batches of up to %d, %d replica(s) x %d threads, "
                         "%s encoder window)", o.model, self.device, compute, time.perf_counter() - t0,
                         self.batch_size, self.replicas, self.cpu_threads, o.encoder_window)
        return self._model

    async def warm_up(self) -> None:
        await asyncio.to_thread(self.load)
        if self.options.warm_peak and not self._peaked:
            self._peaked = True
            await asyncio.to_thread(self._decode_peak)

    def _decode_peak(self) -> None:
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(int(MAX_AUDIO_S * PIPELINE_RATE)) * 0.05).astype(np.float32)
        t0 = time.perf_counter()
        self._decode_batch([_Request(noise, True, "en", None, None) for _ in range(self.batch_size)], t0)
        log.info("whisper peak batch (%d x %.0fs) decoded in %.1fs", self.batch_size, MAX_AUDIO_S,
                 time.perf_counter() - t0)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def recent_batch_sizes(self) -> list[int]:
        """Requests decoded by each of the last 100 batches (for /metrics)."""
        return list(self.stats.recent)

    async def transcribe(
        self, audio: np.ndarray, *, final: bool, language: str | None = None, prompt: str | None = None,
        urgent: bool = False,
    ) -> STTResult | None:
        o = self.options
        duration = len(audio) / PIPELINE_RATE
        if duration < o.min_audio_s or rms_dbfs(audio) < o.silence_dbfs:
            return STTResult("", language, 1.0, 0.0, duration, 0.0)
        if self._closed:
            raise STTUnavailable("speech recognition engine is closed")
        deadline = None if final or urgent else time.monotonic() + o.partial_deadline_s
        # An urgent partial is queued as a final: first served, never stale, waits for room.
        req = _Request(np.asarray(audio, dtype=np.float32), final or urgent, language, prompt or None, deadline)
        self._ensure_workers()
        while True:
            queued, space = self._queue.offer(req)
            if queued:
                break
            if space is None:
                return None  # a partial, refused by a full queue
            try:  # a final waits for room; it offers again at least every second
                await asyncio.wait_for(asyncio.wrap_future(space), 1.0)
            except asyncio.TimeoutError:
                pass
        # Cancelling the awaiting task cancels the request: skipped if the worker has not taken it,
        # and cut short at its next stage if it has.
        try:
            return await asyncio.wrap_future(req.future)
        except asyncio.CancelledError:
            req.abandoned = True
            raise

    def close(self) -> None:
        """Stop the worker. Queued requests fail with STTUnavailable; a batch being decoded finishes."""
        self._closed = True
        for r in self._queue.close():
            _resolve(r.future, exc=STTUnavailable("speech recognition engine is closed"))
        deadline = time.monotonic() + 10
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(w.is_alive() for w in self._workers):
            log.warning("whisper worker still decoding after close(); it exits when its batch ends")

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ the worker

    def _ensure_workers(self) -> None:
        """One batching thread per model replica: each takes its own batches from the shared queue."""
        if len(self._workers) == self.replicas and all(w.is_alive() for w in self._workers):
            return
        with self._worker_lock:
            if self._closed:
                raise STTUnavailable("speech recognition engine is closed")
            self._workers = [w for w in self._workers if w.is_alive()]
            while len(self._workers) < self.replicas:
                worker = threading.Thread(target=self._run, name=f"whisper-batcher-{len(self._workers)}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def _run(self) -> None:
        wait_s = max(0.0, self.options.batch_wait_ms / 1000)
        while True:
            batch = self._queue.take(self.batch_size, wait_s)
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                outcomes = self._decode_batch(batch, t0)
            except BaseException as e:  # noqa: BLE001 - every request must hear how its batch ended
                outcomes = [e] * len(batch)
                if not isinstance(e, Exception):
                    for r in batch:
                        _resolve(r.future, exc=RuntimeError(f"speech recognition worker failed: {e!r}"))
                    raise
            self.stats.batch_done(time.perf_counter() - t0, [o for o in outcomes if isinstance(o, STTResult)])
            for r, out in zip(batch, outcomes):  # finals first: their tasks wake first
                if isinstance(out, BaseException):
                    _resolve(r.future, exc=out)
                else:
                    _resolve(r.future, out)

    # ------------------------------------------------------------------ decoding one batch

    def _decode_batch(self, batch: list[_Request], t0: float) -> list[STTResult | BaseException]:
        model = self.load()
        o = self.options
        ct2 = model.model
        fe = model.feature_extractor
        max_samples = int(MAX_AUDIO_S * fe.sampling_rate)
        audios = []
        for r in batch:
            if len(r.audio) > max_samples:
                log.warning("audio of %.1fs trimmed to one %.0fs Whisper window", len(r.audio) / fe.sampling_rate,
                            MAX_AUDIO_S)
            audios.append(r.audio[:max_samples])
        outcomes: list[STTResult | BaseException | None] = [None] * len(batch)

        # Languages: given, English for an English-only model, or detected as faster-whisper does:
        # on the window's features plus the last frame, which the transcription window omits.
        languages: list[str | None] = [r.language if ct2.is_multilingual else "en" for r in batch]
        detect = [i for i, lang in enumerate(languages) if lang is None]
        if detect:
            t = time.perf_counter()
            _, detect_features = self._features(fe, [audios[i] for i in detect], list(range(len(detect))))
            t = self.stats.add("features", t)
            windows = [self._window(len(audios[i])) for i in detect]
            for w in sorted(set(windows)):
                ks = [k for k, x in enumerate(windows) if x == w]
                rows_features = detect_features if len(ks) == len(detect) else detect_features[ks]
                for k, d in zip(ks, ct2.detect_language(ct2.encode(_storage(_trim(rows_features, w))))):
                    languages[detect[k]] = d[0][0][2:-2]
            self.stats.add("encode", t)

        # Prompts, grouped by shape: CTranslate2 decodes a batch only if every prompt puts
        # <|startoftranscript|> at the same position and every encoder output has the same length
        # (a row's window never depends on the company it is decoded in).
        groups: dict[tuple[int, int, int], list[tuple[int, list[int]]]] = {}
        for i, r in enumerate(batch):
            try:
                tokenizer = self._tokenizer(model, languages[i])
                previous = tokenizer.encode(" " + r.prompt.strip()) if r.prompt is not None else []
                prompt = model.get_prompt(tokenizer, previous, without_timestamps=True)
                max_length = _MAX_LENGTH if o.max_new_tokens is None else len(prompt) + o.max_new_tokens
                if max_length > _MAX_LENGTH:
                    raise ValueError(f"a prompt of {len(prompt)} tokens plus max_new_tokens={o.max_new_tokens} "
                                     f"exceeds Whisper's {_MAX_LENGTH}")
            except Exception as e:
                outcomes[i] = e
                continue
            key = (prompt.index(tokenizer.sot), max_length, self._window(len(audios[i])))
            groups.setdefault(key, []).append((i, prompt))

        suppress = self._suppressed(model)
        for (_, max_length, frames), members in groups.items():
            members = [m for m in members if not batch[m[0]].abandoned]
            rows = [i for i, _ in members]
            if not rows:
                continue
            try:
                t = time.perf_counter()
                features, _ = self._features(fe, [audios[i] for i in rows], [])
                features = _trim(features, frames)
                t = self.stats.add("features", t)
                if self.device == "cpu":
                    # One window per call: a batch gains nothing in the encoder on a CPU (its
                    # matrices are already 1500 rows tall) and would need buffers too large to reuse.
                    # Between windows, a request its caller gave up on (a caption superseded by the
                    # transcript of a pause) costs nothing more.
                    parts = {}
                    for k, i in enumerate(rows):
                        if not batch[i].abandoned:
                            parts[i] = np.asarray(ct2.encode(_storage(features[k : k + 1])))
                    members = [m for m in members if m[0] in parts and not batch[m[0]].abandoned]
                    rows = [i for i, _ in members]
                    if not rows:
                        continue
                    encoded = _storage(np.concatenate([parts[i] for i in rows]) if len(rows) > 1 else parts[rows[0]])
                else:
                    encoded = ct2.encode(_storage(features))
                t = self.stats.add("encode", t)
                results = ct2.generate(
                    encoded, [p for _, p in members], beam_size=o.beam_size, patience=1, length_penalty=1,
                    repetition_penalty=1, no_repeat_ngram_size=0, max_length=max_length, return_scores=True,
                    return_no_speech_prob=True, suppress_blank=True, suppress_tokens=suppress,
                    max_initial_timestamp_index=50,
                )
                for i, res in zip(rows, results):
                    outcomes[i] = self._result(model, languages[i], res, len(audios[i]) / fe.sampling_rate)
                self.stats.add("decode", t)
            except Exception as e:
                for i in rows:
                    outcomes[i] = e
        decode_ms = (time.perf_counter() - t0) * 1000
        for res in outcomes:
            if isinstance(res, STTResult):
                res.decode_ms = decode_ms
        return outcomes  # type: ignore[return-value]

    def _window(self, n_samples: int) -> int:
        """The encoder's input length, in mel frames, for this much audio (options.encoder_window)."""
        if self.options.encoder_window == "full":
            return _WINDOW_FRAMES
        frames = n_samples // _HOP + _WINDOW_MARGIN_FRAMES
        return min(_WINDOW_FRAMES, -(-frames // _WINDOW_STEP_FRAMES) * _WINDOW_STEP_FRAMES)

    def _result(self, model, language: str, res, seconds: float) -> STTResult:
        """One decoded window, turned into text exactly as faster-whisper's segment loop does."""
        o = self.options
        tokenizer = self._tokenizer(model, language)
        tokens = res.sequences_ids[0]
        avg_logprob = res.scores[0] * len(tokens) / (len(tokens) + 1)
        no_speech = res.no_speech_prob
        text = tokenizer.decode(tokens)
        # Whisper's own rule: probably silence *and* decoded with low confidence is a hallucination;
        # faster-whisper then yields no segment for the window, as it does for blank text.
        hallucinated = no_speech > o.no_speech_threshold and not avg_logprob > o.logprob_threshold
        if hallucinated or not text.strip():
            return STTResult("", language, 1.0, 0.0, seconds, 0.0)
        text = text.strip()
        if text.lower() in _HALLUCINATIONS and no_speech > 0.2:
            text = ""
        return STTResult(text, language, no_speech, avg_logprob, seconds, 0.0)

    def _tokenizer(self, model, language: str | None):
        tok = self._tokenizers.get(language)
        if tok is None:
            from faster_whisper.tokenizer import Tokenizer

            tok = self._tokenizers[language] = Tokenizer(model.hf_tokenizer, model.model.is_multilingual,
                                                         task="transcribe", language=language)
        return tok

    def _suppressed(self, model) -> list[int]:
        if self._suppress is None:
            from faster_whisper.transcribe import get_suppressed_tokens

            tokens = list(self.options.suppress_tokens)
            tok = self._tokenizer(model, "en" if model.model.is_multilingual else None)
            self._suppress = list(get_suppressed_tokens(tok, tokens) if tokens else tokens)
        return self._suppress

    # ------------------------------------------------------------------ features

    def _features(self, fe, audios: list[np.ndarray], extra: list[int]):
        """The batch's log-mel windows [B, n_mels, 3000] and, for the rows in ``extra``, the
        language-detection windows: numpy arrays, or torch CUDA tensors on a GPU."""
        if self.device == "cuda" and self._torch_mel is not False:
            try:
                mel = log_mel_torch(fe, audios, extra, device="cuda")
                self._torch_mel = True
                return mel
            except Exception as e:  # no torch, or no CUDA in it: numpy does the same work
                log.warning("log-mel on the GPU unavailable (%s); computing it with numpy", e)
                self._torch_mel = False
        return log_mel_batch(fe, audios, extra)


def _storage(array):
    """A CTranslate2 StorageView over a numpy array or a CUDA tensor (no copy when contiguous)."""
    import ctranslate2

    array = np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array.contiguous()
    return ctranslate2.StorageView.from_array(array)


def _trim(features, frames: int):
    """The first ``frames`` mel frames of each window (numpy or torch)."""
    return features if features.shape[-1] <= frames else features[..., :frames]


def log_mel_batch(fe, audios: list[np.ndarray], extra: list[int] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """faster-whisper's ``FeatureExtractor`` for a batch, bit for bit, with numpy.

    Returns the transcription windows ``[B, n_mels, 3000]`` (the audio's frames, zeros after, as
    faster-whisper pads a segment) and the language-detection windows for the rows in ``extra``.
    One STFT over the batch padded to its longest member; each row keeps its own normalisation
    (the max over its own frames).
    """
    n_fft, hop, n_max = fe.n_fft, fe.hop_length, fe.nb_max_frames
    n_mels = fe.mel_filters.shape[0]
    out = np.zeros((len(audios), n_mels, n_max), np.float32)
    det = np.zeros((len(extra), n_mels, n_max), np.float32) if extra else None
    if not audios:
        return out, det
    # Each row: the waveform, 160 zeros (faster-whisper's padding), reflect-padded by n_fft/2 at the
    # start; zeros to the batch's longest row. The frames each row keeps only read its own samples
    # and zeros, exactly as they do alone.
    lengths = [len(a) for a in audios]
    width = n_fft // 2 + max(lengths) + 160 + n_fft // 2
    x = np.zeros((len(audios), width), np.float32)
    for i, a in enumerate(audios):
        row = np.pad(np.pad(a.astype(np.float32), (0, 160)), (n_fft // 2, n_fft // 2), mode="reflect")
        x[i, : len(row)] = row
    n_frames = min(1 + (width - n_fft) // hop, max((n + 160) // hop for n in lengths))
    frames = np.lib.stride_tricks.as_strided(x, (len(audios), n_frames, n_fft), (x.strides[0], hop * x.strides[1],
                                                                                   x.strides[1]))
    window = np.hanning(n_fft + 1)[:-1].astype("float32")
    spec = np.fft.rfft(frames * window, n=n_fft, axis=-1).transpose(0, 2, 1).astype("complex64")
    mel = fe.mel_filters @ (np.abs(spec) ** 2)
    d = 0
    for i, n in enumerate(lengths):
        valid = (n + 160) // hop  # the frames faster-whisper keeps (its STFT's last one dropped)
        log_spec = np.log10(np.clip(mel[i, :, :valid], a_min=1e-10, a_max=None))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        log_spec = (log_spec + 4.0) / 4.0
        content = min(valid - 1, n_max)  # the window faster-whisper transcribes omits the last frame
        out[i, :, :content] = log_spec[:, :content]
        if det is not None and d < len(extra) and extra[d] == i:
            det[d, :, : min(valid, n_max)] = log_spec[:, :n_max]
            d += 1
    return out, det


def log_mel_torch(fe, audios: list[np.ndarray], extra: list[int] = (), device: str = "cuda"):
    """``log_mel_batch`` computed by torch on ``device`` (float32; equal to numpy's up to rounding).

    On a GPU the windows never leave it: CTranslate2 reads the tensors in place.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("this torch has no CUDA")
    dev = torch.device(device)
    n_fft, hop, n_max = fe.n_fft, fe.hop_length, fe.nb_max_frames
    lengths = torch.tensor([len(a) for a in audios], device=dev)
    width = max(len(a) for a in audios) + 160
    x = torch.zeros((len(audios), width), dtype=torch.float32)
    for i, a in enumerate(audios):
        x[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    x = x.to(dev, non_blocking=True)
    window = torch.hann_window(n_fft, periodic=True, device=dev)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    mags = spec.abs() ** 2  # [B, freq, frames]
    filters = torch.from_numpy(fe.mel_filters).to(dev)
    mel = torch.matmul(filters, mags)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    valid = (lengths + 160) // hop
    frame = torch.arange(log_spec.shape[-1], device=dev)
    mask = frame[None, :] < valid[:, None]
    peak = torch.where(mask[:, None, :], log_spec, torch.full_like(log_spec, -torch.inf)).amax(dim=(1, 2))
    log_spec = torch.maximum(log_spec, (peak - 8.0)[:, None, None])
    log_spec = (log_spec + 4.0) / 4.0
    out = torch.zeros((len(audios), log_spec.shape[1], n_max), dtype=torch.float32, device=dev)
    frames = min(log_spec.shape[-1], n_max)
    content = frame[None, :frames] < (valid - 1)[:, None]
    out[:, :, :frames] = torch.where(content[:, None, :], log_spec[:, :, :frames], 0.0)
    det = None
    if extra:
        rows = torch.tensor(list(extra), device=dev)
        det = torch.zeros((len(extra), log_spec.shape[1], n_max), dtype=torch.float32, device=dev)
        keep = mask[rows, :frames]
        det[:, :, :frames] = torch.where(keep[:, None, :], log_spec[rows, :, :frames], 0.0)
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()  # CTranslate2 reads them on its own stream
    return out.contiguous(), (det.contiguous() if det is not None else None)


_shared: dict[WhisperOptions, WhisperSTT] = {}
_shared_lock = threading.Lock()


def shared_whisper(options: WhisperOptions) -> WhisperSTT:
    """The process-wide engine for these options: never one model per room."""
    with _shared_lock:
        engine = _shared.get(options)
        if engine is None or engine.closed:
            engine = _shared[options] = WhisperSTT(options)
        return engine
