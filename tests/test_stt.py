"""Speech-to-text: faster-whisper on the suite's tiny Whisper through WhisperSTT, its request queue and batching."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest
from faster_whisper import WhisperModel

from driver import Driver
from pipeline import frames as F
from pipeline.conversation import Conversation
from pipeline.stt import STTResult, STTUnavailable, WhisperOptions, WhisperSTT, _Request, _RequestQueue, shared_whisper
from pipeline.tts import EspeakTTS
from pipeline.turns import ConversationConfig, TurnOptions
from pipeline_setup import llm, whisper
from test_audio_vad import voiced_bounds


async def test_tiny_whisper_loads_and_decodes_through_faster_whisper(tiny_whisper_path, speech):
    stt = whisper(tiny_whisper_path)
    audio = speech("en_birch_canoe.wav")
    result = await stt.transcribe(audio, final=True, language="en")
    assert isinstance(stt.load(), WhisperModel)  # the real faster-whisper model class, loaded once
    assert stt.load() is stt.load()
    assert result.text  # random weights: garbage, but decoded tokens
    assert result.language == "en"
    assert result.decode_ms > 0
    assert result.duration == pytest.approx(len(audio) / 16000)
    assert -np.inf < result.avg_logprob < 0 and 0 <= result.no_speech_prob <= 1


async def test_shared_whisper_is_one_engine_per_options(tiny_whisper_path):
    a = shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12))
    b = whisper(tiny_whisper_path)  # what every test conversation uses: equal options, built separately
    assert a is b
    other = shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=5))
    assert other is not a
    assert shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=5)) is other


def _streams(speech) -> list[tuple[np.ndarray, str | None, str | None]]:
    """16 different requests: every recording, whole and cut, with or without a language and a prompt."""
    files = ["en_goforward.wav", "en_LDC93S1_timit.wav", "en_birch_canoe.wav", "en_harvard_spk1_snt1.wav",
             "en_harvard_spk1_snt3.wav", "fr_picovoice_cv.wav", "sb_noise2.wav"]
    prompts = [None, "Python, Kubernetes, PostgreSQL.", None, "An interview for a senior backend engineer role, "
               "with questions about distributed systems."]
    rng = np.random.default_rng(7)
    out = []
    for k in range(16):
        audio = speech(files[k % len(files)])
        if k >= len(files):
            audio = audio[: int(rng.integers(len(audio) // 2, len(audio)))]
        language = ["en", None, "fr", "en"][k % 4] if "noise" not in files[k % len(files)] else None
        out.append((audio, language, prompts[(k // 2) % 4]))
    return out


def test_batched_log_mel_is_faster_whispers_bit_for_bit_and_torchs_within_rounding(speech):
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    from pipeline.stt import log_mel_batch, log_mel_torch

    long = np.tile(speech("fr_picovoice_cv.wav"), 5)[: 30 * 16000]  # exactly one window
    audios = [speech(n) for n in ("en_goforward.wav", "fr_picovoice_cv.wav", "sb_noise2.wav")] + [
        speech("en_birch_canoe.wav")[:4321], long]
    extra = [1, 4]  # rows that also want language-detection windows
    for n_mels in (80, 128):  # large-v3 has 128 mel bins
        fe = FeatureExtractor(feature_size=n_mels)
        windows, detect = log_mel_batch(fe, audios, extra)
        assert windows.shape == (5, n_mels, 3000) and detect.shape == (2, n_mels, 3000)
        for audio, window in zip(audios, windows):
            alone = fe(audio)  # what WhisperModel.transcribe computes, then pads, for one request
            assert np.array_equal(window, pad_or_trim(alone[:, : alone.shape[-1] - 1]))
        for i, window in zip(extra, detect):
            assert np.array_equal(window, pad_or_trim(fe(audios[i])[..., :3000]))  # detect_language's window
        t_windows, t_detect = log_mel_torch(fe, audios, extra, device="cpu")  # the GPU path, on the CPU
        assert np.abs(t_windows.numpy() - windows).max() < 1e-3 and np.abs(t_detect.numpy() - detect).max() < 1e-3


async def test_sixteen_concurrent_streams_batched_give_the_text_of_each_decoded_alone(tiny_whisper_path, speech):
    options = WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=40, batch_size=16,
                             batch_wait_ms=200)
    streams = _streams(speech)
    stt = WhisperSTT(options)
    try:
        await stt.warm_up()
        results = await asyncio.wait_for(asyncio.gather(*[
            stt.transcribe(audio, final=True, language=lang, prompt=prompt) for audio, lang, prompt in streams]), 120)
        assert stt.stats.requests == 16 and stt.stats.batches <= 2  # decoded together, not one by one
        assert sum(stt.recent_batch_sizes) == 16 and max(stt.recent_batch_sizes) >= 8  # what /metrics shows
    finally:
        stt.close()
    model = WhisperModel(str(tiny_whisper_path), device="cpu", compute_type="int8")
    for (audio, lang, prompt), got in zip(streams, results):
        # What the engine did before batching: faster-whisper's own transcribe, one request alone.
        segments, info = model.transcribe(
            audio, language=lang, initial_prompt=prompt, beam_size=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, max_new_tokens=40,
            no_speech_threshold=options.no_speech_threshold, log_prob_threshold=options.logprob_threshold)
        segments = list(segments)
        assert got.text == " ".join(s.text.strip() for s in segments).strip()
        assert got.language == info.language
        if segments:
            assert got.no_speech_prob == segments[0].no_speech_prob
            assert got.avg_logprob == pytest.approx(segments[0].avg_logprob, abs=1e-12)
    assert sum(bool(r.text) for r in results) >= 12  # garbage words, but words: the comparison has teeth
    assert {r.language for r in results} >= {"en", "fr"}


async def test_hallucination_filter_drops_probable_silence_and_subtitle_credits(tiny_whisper_path):
    from types import SimpleNamespace

    stt = whisper(tiny_whisper_path)
    model = stt.load()
    tok = stt._tokenizer(model, "en")

    def decoded(text: str, no_speech: float, avg_logprob: float) -> STTResult:
        tokens = tok.encode(" " + text)
        score = avg_logprob * (len(tokens) + 1) / len(tokens)  # CTranslate2's length-normalised score
        return stt._result(model, "en", SimpleNamespace(sequences_ids=[tokens], scores=[score],
                                                         no_speech_prob=no_speech), 2.0)

    kept = decoded("Go forward ten meters.", 0.1, -0.3)
    assert (kept.text, kept.no_speech_prob) == ("Go forward ten meters.", 0.1)
    assert kept.avg_logprob == pytest.approx(-0.3)
    # Probably silence and decoded with low confidence: no text, as faster-whisper skips the window.
    silent = decoded("Go forward ten meters.", 0.8, -1.5)
    assert (silent.text, silent.no_speech_prob, silent.avg_logprob) == ("", 1.0, 0.0)
    assert decoded("Go forward ten meters.", 0.8, -0.5).text  # confident enough: kept
    assert decoded("Thank you.", 0.3, -0.5).text == ""  # a subtitle credit over likely silence
    assert decoded("Thank you.", 0.05, -0.5).text == "Thank you."  # ...but people do say it


async def test_replicas_take_their_own_batches_and_agree(tiny_whisper_path, speech):
    streams = _streams(speech)[:8]
    two = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12, batch_size=4,
                                    replicas=2))
    try:
        got = await asyncio.wait_for(asyncio.gather(*[
            two.transcribe(audio, final=True, language=lang, prompt=prompt) for audio, lang, prompt in streams]), 60)
        assert len(two._workers) == 2 and two.stats.requests == 8
    finally:
        two.close()
    assert not any(w.is_alive() for w in two._workers)
    one = whisper(tiny_whisper_path)
    alone = [await one.transcribe(audio, final=True, language=lang, prompt=prompt) for audio, lang, prompt in streams]
    assert [(r.text, r.language) for r in got] == [(r.text, r.language) for r in alone]


async def test_language_is_passed_through_or_detected(tiny_whisper_path, speech):
    stt = whisper(tiny_whisper_path)
    audio = speech("fr_picovoice_cv.wav")
    assert (await stt.transcribe(audio, final=True, language="fr")).language == "fr"
    assert (await stt.transcribe(audio, final=True, language="de")).language == "de"
    detected = await stt.transcribe(audio, final=True, language=None)
    assert isinstance(detected.language, str) and len(detected.language) in (2, 3)  # Whisper's language id


@pytest.mark.parametrize("audio", [
    np.zeros(0, np.float32),  # nothing
    np.zeros(16000, np.float32),  # a second of digital silence
    np.full(16000, 1e-4, np.float32),  # a second far below speech level (-80 dBFS)
    None,  # 0.2 s of real speech: shorter than min_audio_s
], ids=["empty", "silent", "very-quiet", "very-short"])
async def test_empty_short_and_silent_audio_give_empty_text_without_decoding(audio, speech, tmp_path):
    if audio is None:
        x = speech("en_birch_canoe.wav")
        onset, _ = voiced_bounds(x)
        audio = x[int(onset * 16000) : int(onset * 16000) + 3200]
    # An engine whose model cannot even load: any decode attempt would raise.
    stt = WhisperSTT(WhisperOptions(model=str(tmp_path), device="cpu"))
    try:
        for final in (True, False):
            result = await stt.transcribe(audio, final=final, language="en")
            assert isinstance(result, STTResult)
            assert result.text == "" and result.decode_ms == 0.0 and result.language == "en"
        assert stt._model is None
    finally:
        stt.close()


async def test_model_that_cannot_load_fails_with_a_clear_error(tmp_path, speech):
    stt = WhisperSTT(WhisperOptions(model=str(tmp_path), device="cpu"))
    try:
        with pytest.raises(RuntimeError, match="cannot load Whisper model"):
            await stt.transcribe(speech("en_goforward.wav"), final=True)
        # The failure freed the decode slot: the next request fails the same way instead of hanging.
        with pytest.raises(RuntimeError, match="cannot load Whisper model"):
            await asyncio.wait_for(stt.transcribe(speech("en_goforward.wav"), final=True), 10)
    finally:
        stt.close()


async def test_partials_while_speaking_then_one_final(tiny_whisper_path, fake_llm, event_log, speech):
    fake_llm.behaviour.reply = "Merci."
    conv = Conversation(stt=whisper(tiny_whisper_path), llm=llm(fake_llm.url), tts=EspeakTTS(), emit=event_log,
                        config=ConversationConfig(language="fr"),
                        turn_options=TurnOptions(partial_interval_s=0.5), name="test")
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(8000, np.float32))
        await d.say_with_partials(speech("en_LDC93S1_timit.wav"), trailing_silence_s=0.8)  # 2.9 s, one utterance
        await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
        transcripts = event_log.of(F.Transcript)
        partials = [t for t in transcripts if not t.final]
        finals = [t for t in transcripts if t.final]
        assert len(finals) == 1 and finals[0].text
        assert len(partials) >= 3, transcripts  # ~0.5 s apart over a 2.9 s utterance
        assert all(t.text for t in partials)
        assert transcripts.index(finals[0]) == len(transcripts) - 1  # every partial came before the final
        assert {t.language for t in transcripts} == {"fr"}  # the conversation's language reached Whisper
        # Partials are only shown while the person speaks: all between the start and stop events.
        started = event_log.events.index(event_log.of(F.UserStartedSpeaking)[0])
        stopped = event_log.events.index(event_log.of(F.UserStoppedSpeaking)[0])
        assert all(started < event_log.events.index(t) < stopped for t in partials)
        assert fake_llm.requests[0]["messages"][-1] == {"role": "user", "content": finals[0].text}
    finally:
        await conv.aclose()
    assert not conv._tasks


# ---------------------------------------------------------------------- the request queue


def req(name: str, final: bool, deadline: float | None = None) -> _Request:
    r = _Request(np.zeros(1, np.float32), final, None, None, deadline)
    r.name = name
    return r


def names(batch) -> list[str]:
    return [r.name for r in batch]


def test_queue_serves_finals_first_then_newest_partials():
    q = _RequestQueue(max_queue=10)
    for r in [req("p1", False), req("f1", True), req("p2", False), req("f2", True), req("p3", False)]:
        assert q.offer(r) == (True, None)
    assert len(q) == 5
    # Finals in arrival order; then partials newest first (an older partial is superseded anyway).
    assert names(q.take(max_n=3, wait_s=0)) == ["f1", "f2", "p3"]
    assert names(q.take(max_n=3, wait_s=0)) == ["p2", "p1"]
    assert len(q) == 0 and q.take(max_n=3, wait_s=0, idle_timeout_s=0.01) == []


def test_queue_drops_stale_partials_without_decoding_them_never_finals():
    q = _RequestQueue(max_queue=10)
    now = time.monotonic()
    old_final, stale, fresh = req("old-final", True), req("stale", False, deadline=now), req("fresh", False, now + 60)
    for r in (old_final, stale, fresh):
        q.offer(r)
    # One slot left after the final: the fresh partial takes it; the stale one is dropped, not left queued.
    assert names(q.take(max_n=2, wait_s=0)) == ["old-final", "fresh"]
    assert stale.future.result(timeout=1) is None and q.dropped_stale == 1
    assert len(q) == 0


def test_queue_skips_a_cancelled_request_and_frees_its_place():
    q = _RequestQueue(max_queue=2)
    gone, after = req("gone", True), req("after", False)
    q.offer(gone)
    q.offer(after)
    assert gone.future.cancel()  # its caller gave up before the worker took it
    assert len(q) == 1
    assert q.offer(req("room", True)) == (True, None)  # the cancelled request's place is free again
    assert names(q.take(max_n=8, wait_s=0)) == ["room", "after"]
    assert not gone.future.running()


def test_full_queue_refuses_partials_and_finals_take_a_partials_place_or_wait():
    q = _RequestQueue(max_queue=2)
    p1, f1 = req("p1", False), req("f1", True)
    q.offer(p1)
    q.offer(f1)
    assert q.offer(req("p2", False)) == (False, None)  # refused at once: the caller gets None
    f2 = req("f2", True)
    assert q.offer(f2) == (True, None)  # a final evicts the oldest queued partial
    assert p1.future.result(timeout=1) is None
    ok, space = q.offer(req("f3", True))  # only finals queued: this one waits for room
    assert not ok and space is not None and not space.done()
    assert names(q.take(max_n=1, wait_s=0)) == ["f1"]
    assert space.result(timeout=1) is None  # room: the waiting final offers again
    assert q.offer(req("f3", True)) == (True, None)


def test_queue_batch_window_waits_for_company_but_not_for_a_full_batch():
    import threading

    q = _RequestQueue(max_queue=10)
    q.offer(req("a", True))
    threading.Timer(0.05, lambda: q.offer(req("b", True))).start()
    t0 = time.monotonic()
    assert names(q.take(max_n=4, wait_s=2.0)) == ["a", "b"]  # "b" joined within the window...
    assert time.monotonic() - t0 >= 1.5  # ...which ran to its end, the batch not being full
    for n in "cdef":
        q.offer(req(n, n != "f"))
    t0 = time.monotonic()
    assert names(q.take(max_n=4, wait_s=2.0)) == ["c", "d", "e", "f"]
    assert time.monotonic() - t0 < 1.0  # a full batch goes at once


def test_queue_shares_a_backlog_among_idle_workers():
    import threading

    q = _RequestQueue(max_queue=20)
    batches: list[list[str]] = []

    def worker():
        batches.append(names(q.take(max_n=8, wait_s=0.5, idle_timeout_s=5)))

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(0.1)  # both idle in take()
    for k in range(6):
        q.offer(req(f"f{k}", True))
    for w in workers:
        w.join(5)
    # Six requests, two idle workers (one replica each): three each, decoded side by side.
    assert sorted(len(b) for b in batches) == [3, 3]
    assert sorted(n for b in batches for n in b) == [f"f{k}" for k in range(6)]


def test_closed_queue_hands_back_what_was_queued():
    q = _RequestQueue(max_queue=10)
    a = req("a", True)
    q.offer(a)
    assert names(q.close()) == ["a"]
    assert q.take(max_n=4, wait_s=0) is None
    with pytest.raises(STTUnavailable):
        q.offer(req("b", True))


async def test_stale_partial_is_dropped_by_a_busy_engine(tiny_whisper_path, speech):
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12,
                                    partial_deadline_s=0.0))
    try:
        audio = speech("en_goforward.wav")
        final = asyncio.create_task(stt.transcribe(audio, final=True, language="en"))
        await asyncio.sleep(0)  # one iteration: the final holds the decode slot
        assert await stt.transcribe(audio, final=False, language="en") is None
        assert (await asyncio.wait_for(final, 30)).text
    finally:
        stt.close()


@pytest.mark.parametrize("deadline_s, served", [(60.0, ["final", "pause", "caption"]),
                                                 (0.0, ["caption:dropped", "final", "pause"])])
async def test_an_urgent_partial_goes_ahead_of_captions_and_is_never_stale(tiny_whisper_path, speech,
                                                                          deadline_s, served):
    """The transcript of a pause (urgent) is served before a caption queued earlier, and waits
    behind a busy engine like a final where a caption past its deadline is dropped."""
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12,
                                    partial_deadline_s=deadline_s, batch_size=1))
    try:
        audio = speech("en_goforward.wav")
        await stt.warm_up()
        order: list[str] = []

        async def run(name: str, **kw) -> None:
            result = await stt.transcribe(audio, language="en", **kw)
            order.append(name if result is not None else f"{name}:dropped")

        busy = asyncio.create_task(run("final", final=True))
        await asyncio.sleep(0)  # one iteration: the final is queued first and holds the decode slot
        caption = asyncio.create_task(run("caption", final=False))
        await asyncio.sleep(0)
        pause = asyncio.create_task(run("pause", final=False, urgent=True))
        await asyncio.wait_for(asyncio.gather(busy, caption, pause), 30)
        # (When the dropped caption hears so, before or after the final ends, is the worker's timing.)
        assert sorted(order) == sorted(served) and order.index("final") < order.index("pause")
        if "caption" in order:
            assert order.index("pause") < order.index("caption")
    finally:
        stt.close()


async def test_a_request_cancelled_while_decoding_does_not_let_a_partial_overtake_a_final(tiny_whisper_path, speech):
    # Long decodes (200 tokens of garbage), so the abandoned one is surely still running.
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=200))
    try:
        await _abandon_a_decode_then_race(stt, speech("en_birch_canoe.wav"))
    finally:
        stt.close()


async def _abandon_a_decode_then_race(stt: WhisperSTT, audio: np.ndarray) -> None:
    await stt.warm_up()
    abandoned = asyncio.create_task(stt.transcribe(audio, final=False, language="en"))
    await asyncio.sleep(0.1)  # past the batch window: its decode is running
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    order: list[str] = []

    async def run(name: str, final: bool) -> None:
        result = await stt.transcribe(audio, final=final, language="en")
        order.append(name if result is not None else f"{name}:dropped")

    partial = asyncio.create_task(run("partial", False))
    await asyncio.sleep(0)
    final = asyncio.create_task(run("final", True))
    await asyncio.wait_for(asyncio.gather(partial, final), 30)
    # The partial asked first, but the engine was still busy with the abandoned decode, so both
    # queued and the final (which a person is waiting for) was served first.
    assert order == ["final", "partial"]
    assert stt.queue_depth == 0


async def test_closed_engine_fails_queued_and_new_requests_clearly(tiny_whisper_path, speech):
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=200, batch_size=1))
    audio = speech("en_birch_canoe.wav")
    await stt.warm_up()
    running = asyncio.create_task(stt.transcribe(audio, final=True, language="en"))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(stt.transcribe(audio, final=True, language="en"))
    await asyncio.sleep(0.01)
    stt.close()  # waits for the batch being decoded
    assert (await asyncio.wait_for(running, 10)).text  # the batch already decoding finished
    with pytest.raises(STTUnavailable, match="closed"):
        await asyncio.wait_for(queued, 10)
    with pytest.raises(STTUnavailable, match="closed"):
        await stt.transcribe(audio, final=True, language="en")
    assert stt._workers and not any(w.is_alive() for w in stt._workers)  # close() left no thread behind


async def test_shared_whisper_replaces_a_closed_engine(tiny_whisper_path):
    options = WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=7)
    a = shared_whisper(options)
    a.close()
    b = shared_whisper(options)
    assert b is not a and not b.closed and shared_whisper(options) is b


class _Watched:
    """The engine's CTranslate2 model, seen through: counts encoder windows and decoded prompts,
    and runs ``on_first_encode`` in the worker thread before the first window is encoded."""

    def __init__(self, ct2, on_first_encode):
        self._ct2, self._hook = ct2, on_first_encode
        self.windows = 0
        self.prompts = 0
        self.shapes: list[tuple[int, ...]] = []  # each encoder call's input: (rows, mels, frames)

    def __getattr__(self, name):
        return getattr(self._ct2, name)

    def encode(self, features, *args, **kw):
        if self.windows == 0 and self._hook is not None:
            self._hook()
        self.windows += features.shape[0]
        self.shapes.append(tuple(features.shape))
        return self._ct2.encode(features, *args, **kw)

    def generate(self, encoded, prompts, *args, **kw):
        self.prompts += len(prompts)
        return self._ct2.generate(encoded, prompts, *args, **kw)


async def test_a_request_given_up_after_the_worker_took_it_is_neither_encoded_nor_decoded(tiny_whisper_path, speech):
    """A caption superseded mid-batch (the person paused) costs no more encoder or decoder time."""
    options = WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12, batch_size=3,
                             partial_deadline_s=60)
    one = WhisperSTT(options)
    stt = WhisperSTT(dataclasses.replace(options, batch_wait_ms=60_000))  # the three in one batch
    audio = [voiced(speech(n)) for n in ("en_birch_canoe.wav", "en_goforward.wav", "en_harvard_spk1_snt1.wav")]
    try:
        alone = [await one.transcribe(a, final=True, language="en") for a in audio[1:]]
        loop = asyncio.get_running_loop()
        gave_up = threading.Event()
        tasks: list[asyncio.Task] = []

        # Partials are batched newest first, so the first request is the last to be encoded.
        def give_up_on_the_first():  # in the worker thread: the batch is taken, nothing encoded yet
            loop.call_soon_threadsafe(tasks[0].cancel)
            assert gave_up.wait(10)

        model = stt.load()
        watched = model.model = _Watched(model.model, give_up_on_the_first)
        tasks.extend(asyncio.create_task(stt.transcribe(a, final=False, language="en")) for a in audio)
        tasks[0].add_done_callback(lambda _: gave_up.set())
        first, second = await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        assert (first.text, second.text) == (alone[0].text, alone[1].text)
        assert (watched.windows, watched.prompts) == (2, 2)  # one batch of three, one skipped
        assert stt.queue_depth == 0
    finally:
        stt.close()
        one.close()


def voiced(audio: np.ndarray) -> np.ndarray:
    start, end = voiced_bounds(audio)
    return audio[int(start * 16000): int(end * 16000)]


async def test_warm_peak_decodes_one_full_batch_of_whole_windows_once(tiny_whisper_path):
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=4, batch_size=3,
                                    warm_peak=True))
    try:
        model = await asyncio.to_thread(stt.load)
        watched = model.model = _Watched(model.model, None)
        await stt.warm_up()
        assert (watched.windows, watched.prompts) == (3, 3)
        await stt.warm_up()  # a second warm-up (another agent of an STT worker) does not repeat it
        assert (watched.windows, watched.prompts) == (3, 3)
    finally:
        stt.close()


async def test_audio_encoder_window_encodes_the_speech_not_thirty_seconds_and_ignores_company(tiny_whisper_path,
                                                                                               speech):
    """encoder_window="audio" (for models fine-tuned on short windows): each request's encoder input
    is its own audio plus 0.5 s in 2 s steps, whatever it is batched with."""
    streams = _streams(speech)
    base = WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12, encoder_window="audio")
    batched = WhisperSTT(dataclasses.replace(base, batch_size=16, batch_wait_ms=200))
    alone = WhisperSTT(dataclasses.replace(base, batch_size=1))
    full = WhisperSTT(dataclasses.replace(base, encoder_window="full"))
    try:
        watched = {}
        for name, engine in (("batched", batched), ("alone", alone), ("full", full)):
            model = await asyncio.to_thread(engine.load)
            watched[name] = model.model = _Watched(model.model, None)
        together = await asyncio.wait_for(asyncio.gather(*[
            batched.transcribe(audio, final=True, language=lang, prompt=prompt) for audio, lang, prompt in streams]), 120)
        one_by_one = [await alone.transcribe(audio, final=True, language=lang, prompt=prompt)
                      for audio, lang, prompt in streams]
        await full.transcribe(streams[0][0], final=True, language="en")
    finally:
        for engine in (batched, alone, full):
            engine.close()
    assert [(r.text, r.language, r.avg_logprob) for r in together] == [
        (r.text, r.language, r.avg_logprob) for r in one_by_one]
    assert sum(bool(r.text) for r in together) >= 12  # words (garbage ones): the comparison has teeth

    def window(audio):  # frames: 10 ms each, the audio + 50, rounded up to 200
        return min(3000, -(-(len(audio) // 160 + 50) // 200) * 200)

    expected = sorted(window(a) for a, _, _ in streams)
    # Alone: one encoder call per request (two for those whose language is detected first).
    detected = sorted(window(a) for a, lang, _ in streams if lang is None)
    assert sorted(s[2] for s in watched["alone"].shapes) == sorted(expected + detected)
    assert {s[2] for s in watched["batched"].shapes} == set(expected)
    assert max(expected) <= 800 and min(expected) >= 200  # these recordings are 1.3-7.5 s: not 30
    assert {s[2] for s in watched["full"].shapes} == {3000}
    long = WhisperSTT(base)
    assert (long._window(29 * 16000), long._window(40 * 16000), long._window(1)) == (3000, 3000, 200)
    with pytest.raises(ValueError, match="encoder_window"):
        WhisperSTT(dataclasses.replace(base, encoder_window="short"))
