"""Text-to-speech: edge-tts (streamed MP3 with word boundaries) and espeak-ng offline.

Every engine yields ``TTSChunk``s of mono float32 PCM plus the words that start in the chunk, so the
player can tell which words were actually heard when the person interrupts.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

EDGE_VOICES = {
    "en": "en-US-AriaNeural", "de": "de-DE-KatjaNeural", "fr": "fr-FR-DeniseNeural",
    "es": "es-ES-ElviraNeural", "it": "it-IT-ElsaNeural", "pt": "pt-BR-FranciscaNeural",
    "nl": "nl-NL-ColetteNeural", "pl": "pl-PL-ZofiaNeural", "ru": "ru-RU-SvetlanaNeural",
    "ja": "ja-JP-NanamiNeural", "zh": "zh-CN-XiaoxiaoNeural", "ko": "ko-KR-SunHiNeural",
    "tr": "tr-TR-EmelNeural", "sv": "sv-SE-SofieNeural", "uk": "uk-UA-PolinaNeural",
}
ESPEAK_VOICES = {
    "en": "en-us", "de": "de", "fr": "fr-fr", "es": "es", "it": "it", "pt": "pt-br", "nl": "nl",
    "pl": "pl", "ru": "ru", "ja": "ja", "zh": "cmn", "ko": "ko", "tr": "tr", "sv": "sv", "uk": "uk",
}


class TTSError(RuntimeError):
    pass


@dataclass(slots=True)
class Word:
    text: str
    start: float  # seconds from the start of the sentence's audio


@dataclass(slots=True)
class TTSChunk:
    pcm: np.ndarray  # mono float32
    sample_rate: int
    words: list[Word] = field(default_factory=list)


class TTS(Protocol):
    name: str

    def synthesize(self, text: str, language: str, voice: str | None = None) -> AsyncIterator[TTSChunk]:
        """Yield audio for one sentence as soon as it is available. Raises TTSError."""


class EspeakTTS:
    """espeak-ng: robotic but instant and fully offline.

    Two things keep it off the critical path of a reply's first audio. Its WAV output is streamed as
    it is synthesised (the first chunk ~0.3 ms after the text, the whole sentence ~5 ms). And the
    process for the next sentence is started in advance: espeak-ng loads its voice before it reads
    stdin, so a spare waiting on stdin saves that start-up (~7 ms idle, ~30 ms on a busy machine).
    One spare per voice, kept for the few most recent voices; ``aclose`` ends them. Spares are plain
    ``Popen`` objects, not asyncio ones, because LiveKit's job threads share the engine, each thread
    with its own event loop; the pipes are attached to the loop of the sentence that uses them.
    """

    name = "espeak"
    max_spares = 4  # voices kept warm (one process each, ~7 MB and 3 descriptors)

    def __init__(self, rate_wpm: int = 165, timeout_s: float = 10.0):
        self.rate_wpm = rate_wpm
        self.timeout_s = timeout_s
        self.binary = shutil.which("espeak-ng") or shutil.which("espeak")
        self._spares: OrderedDict[tuple[str, str, int], subprocess.Popen] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        # An engine dropped without aclose (a test's, a job thread's) still ends its spares, when it
        # is collected or at exit at the latest.
        self._end_spares = weakref.finalize(self, _end_all, self._lock, self._spares)

    async def synthesize(self, text: str, language: str, voice: str | None = None) -> AsyncIterator[TTSChunk]:
        if not self.binary:
            raise TTSError("espeak-ng is not installed")
        voice = voice if voice and "Neural" not in voice else ESPEAK_VOICES.get(language, language or "en")
        key = (self.binary, voice, self.rate_wpm)
        proc = self._take(key) or self._spawn(key)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        io = None
        try:
            io = _Stdio(proc, text.encode() + b"\n")
            header, pending, rate, samples = b"", b"", 22050, 0
            while True:
                async with asyncio.timeout_at(deadline):
                    data = await io.received.get()
                if not data:
                    break
                if len(header) < 44:
                    take = 44 - len(header)
                    header, data = header + data[:take], data[take:]
                    if len(header) == 44:
                        rate = int.from_bytes(header[24:28], "little") or rate
                data, pending = pending + data, b""
                if len(data) % 2:
                    data, pending = data[:-1], data[-1:]
                if data:
                    pcm = np.frombuffer(data, np.int16).astype(np.float32) / 32768.0
                    samples += len(pcm)
                    yield TTSChunk(pcm, rate)
                    if samples == len(pcm):  # after the first audio is out: the next sentence's process
                        self._refill(key)
            if proc.poll() is None:
                async with asyncio.timeout_at(deadline):
                    await asyncio.to_thread(proc.wait)
            if proc.returncode != 0 or not samples:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise TTSError(f"espeak-ng failed: {err or proc.returncode}")
            yield TTSChunk(np.zeros(0, np.float32), rate, _estimate_words(text, samples / rate))
        finally:
            if io is not None:
                io.close()
            _end(proc)

    def _spawn(self, key: tuple[str, str, int]) -> subprocess.Popen:
        binary, voice, rate = key
        try:
            return subprocess.Popen([binary, "-v", voice, "-s", str(rate), "--stdout"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:  # missing or not executable: a TTS failure, not a crashed reply
            raise TTSError(f"cannot run espeak-ng ({binary}): {e.strerror or e}") from e

    def _take(self, key: tuple[str, str, int]) -> subprocess.Popen | None:
        with self._lock:
            proc = self._spares.pop(key, None)
        if proc is not None and proc.poll() is not None:  # died waiting (a voice that does not exist)
            _end(proc)
            return None
        return proc

    def _refill(self, key: tuple[str, str, int]) -> None:
        if self._closed:
            return
        try:
            proc = self._spawn(key)
        except TTSError:
            return  # the next sentence starts its own and reports the error
        retired = []
        with self._lock:
            if self._closed or key in self._spares:
                retired.append(proc)  # another room's sentence refilled it first
            else:
                self._spares[key] = proc
                while len(self._spares) > self.max_spares:
                    retired.append(self._spares.popitem(last=False)[1])
        for p in retired:
            _end(p)

    async def aclose(self) -> None:
        self._closed = True
        self._end_spares()

    def spare_fds(self) -> set[int]:
        """The descriptors of the waiting processes' pipes (for leak checks: held by design)."""
        with self._lock:
            return {f.fileno() for p in self._spares.values() for f in (p.stdin, p.stdout, p.stderr)
                    if f is not None and not f.closed}


def _end_all(lock: threading.Lock, spares: OrderedDict) -> None:
    with lock:
        procs = list(spares.values())
        spares.clear()
    for p in procs:
        _end(p)


def _end(proc: subprocess.Popen) -> None:
    """Stop a process (if it still runs), reap it and close its pipes. A killed espeak-ng exits at
    once, and one that closed its output is exiting: the wait is short either way."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


class _Stdio:
    """A process's stdin and stdout on the event loop, by readiness callbacks rather than transports:
    the descriptors stay the caller's to close (a transport owns its pipe, and a cancel while it is
    being connected leaves unclear who closes it; uvloop aborts the process on a double close).
    Input is written as the pipe takes it (a text longer than the pipe's buffer must not wait on
    espeak-ng, which waits on us to read its output), then closed: the end of the text."""

    def __init__(self, proc: subprocess.Popen, data: bytes):
        self._loop = asyncio.get_running_loop()
        self._stdin, self._in, self._out = proc.stdin, proc.stdin.fileno(), proc.stdout.fileno()
        self.received: asyncio.Queue[bytes] = asyncio.Queue()  # output as it comes; b"" at its end
        self._rest = memoryview(data)
        self._writing = self._reading = False
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._loop.add_reader(self._out, self._read)
        self._reading = True
        self._write()

    def _write(self) -> None:
        try:
            self._rest = self._rest[os.write(self._in, self._rest):]
        except BlockingIOError:
            pass
        except OSError:  # it exited without reading the text: its exit status and stderr say why
            self._rest = self._rest[:0]
        if self._rest and not self._writing:
            self._loop.add_writer(self._in, self._write)
            self._writing = True
        elif not self._rest:
            if self._writing:
                self._loop.remove_writer(self._in)
                self._writing = False
            self._stdin.close()

    def _read(self) -> None:
        try:
            data = os.read(self._out, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._out)
            self._reading = False
        self.received.put_nowait(data)

    def close(self) -> None:
        """Stop watching the descriptors (before they are closed: their numbers get reused)."""
        if self._writing:
            self._loop.remove_writer(self._in)
            self._writing = False
        if self._reading:
            self._loop.remove_reader(self._out)
            self._reading = False


def _estimate_words(text: str, duration: float) -> list[Word]:
    """espeak-ng gives no word timings on stdout; spread the words over the audio by length."""
    words = text.split()
    total = sum(len(w) + 1 for w in words) or 1
    out, pos = [], 0
    for w in words:
        out.append(Word(w, duration * pos / total))
        pos += len(w) + 1
    return out


class EdgeTTS:
    """Microsoft Edge's online voices: natural, streamed MP3 with word boundaries."""

    name = "edge"

    def __init__(self, connect_timeout_s: float = 5.0, chunk_timeout_s: float = 10.0):
        self.connect_timeout_s = connect_timeout_s
        self.chunk_timeout_s = chunk_timeout_s

    async def synthesize(self, text: str, language: str, voice: str | None = None) -> AsyncIterator[TTSChunk]:
        import av
        import edge_tts

        voice = voice if voice and "Neural" in voice else EDGE_VOICES.get(language, EDGE_VOICES["en"])
        communicate = edge_tts.Communicate(text, voice, boundary="WordBoundary",
                                           connect_timeout=int(self.connect_timeout_s))
        decoder = av.CodecContext.create("mp3", "r")
        resampler = av.AudioResampler(format="flt", layout="mono")
        pending_words: list[Word] = []
        stream = communicate.stream().__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.chunk_timeout_s):
                        msg = await stream.__anext__()
                except StopAsyncIteration:
                    break
                if msg["type"] == "WordBoundary":
                    pending_words.append(Word(msg["text"], msg["offset"] / 1e7))
                elif msg["type"] == "audio" and msg["data"]:
                    pcm = _decode(decoder, resampler, msg["data"])
                    if pcm is not None:
                        yield TTSChunk(pcm[0], pcm[1], pending_words)
                        pending_words = []
            pcm = _decode(decoder, resampler, None)
            if pcm is not None or pending_words:
                yield TTSChunk(pcm[0] if pcm else np.zeros(0, np.float32), pcm[1] if pcm else 24000, pending_words)
        except Exception as e:  # edge-tts raises its own, aiohttp's and websocket errors
            raise TTSError(f"edge-tts failed: {type(e).__name__}: {e}") from e
        finally:
            await stream.aclose()


def _decode(decoder, resampler, data: bytes | None) -> tuple[np.ndarray, int] | None:
    chunks, rate = [], 24000
    for packet in decoder.parse(data) if data is not None else [None]:
        for frame in decoder.decode(packet):
            for out in resampler.resample(frame):
                rate = out.sample_rate
                chunks.append(out.to_ndarray().reshape(-1))
    return (np.concatenate(chunks), rate) if chunks else None


class FallbackTTS:
    """Try the primary engine; on failure before any audio, speak the sentence with the fallback.

    After a failure the primary is skipped for ``cooldown_s`` so that an outage costs one failed
    attempt, not one per sentence.
    """

    def __init__(self, primary: TTS, fallback: TTS, cooldown_s: float = 60.0):
        self.primary, self.fallback, self.cooldown_s = primary, fallback, cooldown_s
        self.name = f"{primary.name}+{fallback.name}"
        self._primary_down_until = 0.0
        self.last_error: str | None = None

    async def synthesize(self, text: str, language: str, voice: str | None = None) -> AsyncIterator[TTSChunk]:
        if time.monotonic() >= self._primary_down_until:
            produced = False
            try:
                async for chunk in self.primary.synthesize(text, language, voice):
                    produced = True
                    yield chunk
                return
            except TTSError as e:
                if produced:
                    raise
                self.last_error = str(e)
                self._primary_down_until = time.monotonic() + self.cooldown_s
                log.warning("%s; using %s for %.0fs", e, self.fallback.name, self.cooldown_s)
        async for chunk in self.fallback.synthesize(text, language, None):
            yield chunk

    async def aclose(self) -> None:
        await aclose_tts(self.primary)
        await aclose_tts(self.fallback)


async def aclose_tts(tts: TTS) -> None:
    """End what an engine keeps between sentences (espeak-ng's spare processes); most keep nothing."""
    close = getattr(tts, "aclose", None)
    if close is not None:
        await close()


def make_tts(kind: str) -> TTS:
    if kind == "espeak":
        return EspeakTTS()
    if kind == "edge":
        return FallbackTTS(EdgeTTS(), EspeakTTS())
    raise ValueError(f"unknown TTS {kind!r} (expected 'edge' or 'espeak')")
