"""Text-to-speech: edge-tts (streamed MP3 with word boundaries) and espeak-ng offline.

Every engine yields ``TTSChunk``s of mono float32 PCM plus the words that start in the chunk, so the
player can tell which words were actually heard when the person interrupts.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
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
    """espeak-ng: robotic but instant (a sentence in ~25 ms) and fully offline."""

    name = "espeak"

    def __init__(self, rate_wpm: int = 165, timeout_s: float = 10.0):
        self.rate_wpm = rate_wpm
        self.timeout_s = timeout_s
        self.binary = shutil.which("espeak-ng") or shutil.which("espeak")

    async def synthesize(self, text: str, language: str, voice: str | None = None) -> AsyncIterator[TTSChunk]:
        if not self.binary:
            raise TTSError("espeak-ng is not installed")
        voice = voice if voice and "Neural" not in voice else ESPEAK_VOICES.get(language, language or "en")
        # A reply cancelled (barge-in) while the process is being started must not leave it and
        # its pipes behind: the start is shielded, then the process ended like any other.
        starting = asyncio.ensure_future(asyncio.create_subprocess_exec(
            self.binary, "-v", voice, "-s", str(self.rate_wpm), "--stdout", "--", text,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        ))
        try:
            proc = await asyncio.shield(starting)
        except OSError as e:  # missing or not executable: a TTS failure, not a crashed reply
            raise TTSError(f"cannot run espeak-ng ({self.binary}): {e.strerror or e}") from e
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                proc = await starting
                proc.kill()
                await proc.wait()
            raise
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0 or len(out) <= 44:
            raise TTSError(f"espeak-ng failed: {err.decode(errors='replace').strip() or proc.returncode}")
        rate = int.from_bytes(out[24:28], "little")
        pcm = np.frombuffer(out[44 : 44 + (len(out) - 44) // 2 * 2], np.int16).astype(np.float32) / 32768.0
        yield TTSChunk(pcm, rate, _estimate_words(text, len(pcm) / rate))


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


def make_tts(kind: str) -> TTS:
    if kind == "espeak":
        return EspeakTTS()
    if kind == "edge":
        return FallbackTTS(EdgeTTS(), EspeakTTS())
    raise ValueError(f"unknown TTS {kind!r} (expected 'edge' or 'espeak')")
