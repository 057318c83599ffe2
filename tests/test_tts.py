"""espeak-ng as the pipeline uses it: streamed output, a spare process per voice, nothing left behind."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.tts import EspeakTTS, FallbackTTS, TTSError

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") or shutil.which("espeak")),
                                reason="espeak-ng is not installed (apt-get install espeak-ng)")

SENTENCE = "Thank you, that is a clear answer. Could you tell me more about the result you measured?"


def one_shot(text: str) -> np.ndarray:
    """espeak-ng run the plain way, the whole WAV at once: what the stream must add up to."""
    out = subprocess.run([shutil.which("espeak-ng") or shutil.which("espeak"), "-v", "en-us", "-s", "165",
                          "--stdout", "--", text], capture_output=True, check=True).stdout
    return np.frombuffer(out[44:], np.int16).astype(np.float32) / 32768.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_audio_streams_in_chunks_that_add_up_to_the_whole_sentence():
    tts = EspeakTTS()
    try:
        chunks = [c async for c in tts.synthesize(SENTENCE, "en")]
        # The first audio leaves before the sentence is finished: several chunks, the words last
        # (their timing needs the whole length).
        assert len(chunks) >= 3
        assert all(c.sample_rate == 22050 for c in chunks)
        assert not any(c.words for c in chunks[:-1])
        pcm = np.concatenate([c.pcm for c in chunks])
        np.testing.assert_array_equal(pcm, one_shot(SENTENCE))  # header and odd byte splits handled
        words = chunks[-1].words
        assert [w.text for w in words] == SENTENCE.split()
        starts = [w.start for w in words]
        assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(pcm) / 22050
    finally:
        await tts.aclose()


async def test_the_next_sentence_is_spoken_by_a_process_started_in_advance():
    tts = EspeakTTS()
    fds = open_fds()
    try:
        first = np.concatenate([c.pcm async for c in tts.synthesize("Good.", "en")])
        (spare,) = tts._spares.values()  # started once the first audio was out, waiting on stdin
        assert running(spare.pid) and len(tts.spare_fds()) == 3
        second = np.concatenate([c.pcm async for c in tts.synthesize("Good.", "en")])
        np.testing.assert_array_equal(first, second)
        assert not running(spare.pid)  # it spoke the second sentence and was reaped
        (refill,) = tts._spares.values()
        assert refill.pid != spare.pid and running(refill.pid)

        # Another voice gets its own spare; the oldest goes once there are more than max_spares.
        tts.max_spares = 1
        async for _ in tts.synthesize("Bien.", "fr"):
            pass
        assert list(tts._spares) == [(tts.binary, "fr-fr", 165)] and not running(refill.pid)
    finally:
        spares = list(tts._spares.values())
        await tts.aclose()
    assert spares and not any(running(p.pid) for p in spares)
    assert open_fds() == fds and tts.spare_fds() == set()
    # Closed: still speaks (a sentence in flight at shutdown), without starting a spare.
    assert len(np.concatenate([c.pcm async for c in tts.synthesize("Good.", "en")])) > 1000
    assert not tts._spares and open_fds() == fds


async def test_a_reply_cancelled_mid_sentence_ends_its_process_and_closes_its_pipes():
    tts = EspeakTTS()
    fds = open_fds()
    try:
        async for _ in tts.synthesize("Good.", "en"):
            pass
        (speaker,) = tts._spares.values()  # the process that will speak the long sentence
        # Longer than any pipe buffer: the text is still being written when the first audio
        # arrives (a blocking write would deadlock here), and the cancel drops the rest.
        agen = tts.synthesize("This sentence goes on and on. " * 4000, "en")
        first = await asyncio.wait_for(agen.__anext__(), 10)
        assert len(first.pcm) and speaker not in tts._spares.values() and running(speaker.pid)
        await agen.aclose()
        assert not running(speaker.pid) and speaker.returncode is not None  # killed and reaped
    finally:
        await tts.aclose()
    assert open_fds() == fds


async def test_an_unknown_voice_fails_with_espeaks_message_every_time():
    tts = EspeakTTS()
    try:
        for _ in range(2):  # the second attempt finds a spare that died at once, and starts afresh
            with pytest.raises(TTSError, match="voice does not exist"):
                async for _ in tts.synthesize("Hello.", "en", voice="xx-nonexistent"):
                    pass
    finally:
        await tts.aclose()


async def test_closing_the_fallback_engine_ends_espeaks_spares():
    espeak = EspeakTTS()
    tts = FallbackTTS(EspeakTTS(), espeak)
    async for _ in espeak.synthesize("Good.", "en"):
        pass
    (spare,) = espeak._spares.values()
    await tts.aclose()
    assert not running(spare.pid) and espeak.spare_fds() == set()


def test_on_uvloop_which_parley_serve_runs_a_cancelled_sentence_leaves_nothing_behind():
    """uvloop owns a pipe's descriptor differently from asyncio (closing it under the transport
    aborted the server): the same streamed, spared and cancelled sentences on uvicorn's loop."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop comes with uvicorn[standard]")

    async def scenario() -> None:
        warm = EspeakTTS()  # libuv keeps a descriptor of its own from the first pipe on (to /dev/null)
        async for _ in warm.synthesize("Good.", "en"):
            pass
        await warm.aclose()
        tts = EspeakTTS()
        fds = open_fds()
        for _ in range(2):  # cold, then from the spare
            assert len(np.concatenate([c.pcm async for c in tts.synthesize("Good.", "en")])) > 1000
        agen = tts.synthesize("This sentence goes on and on. " * 4000, "en")
        assert len((await asyncio.wait_for(agen.__anext__(), 10)).pcm)
        await agen.aclose()
        await tts.aclose()
        assert open_fds() == fds

    uvloop.run(scenario())
