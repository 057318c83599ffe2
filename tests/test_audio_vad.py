"""Resampling and Silero VAD segmentation on real recordings."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio import InputConverter, LeadingSilenceTrimmer, to_mono
from pipeline.frames import AudioFrame
from pipeline.vad import Segmenter, SpeechEnd, SpeechStart, VADOptions

RECORDINGS = ["en_birch_canoe.wav", "en_LDC93S1_timit.wav", "en_goforward.wav"]


def voiced_bounds(x: np.ndarray, rate: int = 16000) -> tuple[float, float]:
    """First and last 10 ms window within 25 dB of the loudest (the noise floor here is -27 dB and below)."""
    win = rate // 100
    rms = np.sqrt(np.mean(x[: len(x) // win * win].reshape(-1, win) ** 2, axis=1))
    voiced = np.nonzero(rms > rms.max() * 10 ** (-25 / 20))[0]
    return voiced[0] * 0.01, (voiced[-1] + 1) * 0.01


def test_downmix_and_resample_48k_stereo_to_16k_mono():
    t = np.arange(48000) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 16000).astype(np.int16)
    stereo = np.stack([tone, tone], axis=1).reshape(-1)
    conv = InputConverter()
    out = np.concatenate([conv.convert(AudioFrame(stereo[i : i + 1920], 48000, 2)) for i in range(0, len(stereo), 1920)])
    assert abs(len(out) - 16000) < 400  # the streaming filter holds back a few ms
    spectrum = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(out[2000:14000])
    assert abs(peak_hz - 440) < 3
    assert 0.45 < np.max(np.abs(out[2000:])) < 0.52  # 16000/32768, no gain change


def test_input_rate_change_mid_stream_is_handled():
    conv = InputConverter()
    a = conv.convert(AudioFrame(np.zeros(480 * 10, np.int16), 24000, 1))
    b = conv.convert(AudioFrame(np.ones(960 * 10, np.int16), 48000, 1))
    assert a.dtype == np.float32 and b.dtype == np.float32


def test_to_mono_averages_channels():
    pcm = np.array([1000, -1000, 2000, 0], np.int16)
    assert np.allclose(to_mono(pcm, 2), [0.0, 1000 / 32768])


def test_three_recordings_give_exactly_three_turns_with_their_whole_speech(speech):
    gap = np.zeros(int(1.2 * 16000), np.float32)
    parts, placements = [gap], []
    for name in RECORDINGS:
        x = speech(name)
        pos = sum(len(p) for p in parts) / 16000
        on, off = voiced_bounds(x)
        placements.append((pos + on, pos + off))
        parts += [x, gap]
    stream = np.concatenate(parts)
    seg = Segmenter(VADOptions())
    events = []
    for i in range(0, len(stream), 320):  # 20 ms frames, as transports deliver them
        events += seg.feed(stream[i : i + 320])
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) == 3 and len(ends) == 3, [(type(e).__name__, round(e.t, 2)) for e in events]
    for end, (onset, offset) in zip(ends, placements):
        # Pre-roll: the segment starts before the first syllable, but not far into the silence.
        assert onset - 0.4 <= end.start <= onset + 0.1, (end.start, onset)
        seg_end = end.start + len(end.audio) / 16000
        assert seg_end >= offset, (seg_end, offset)
        assert len(end.audio) / 16000 < (offset - onset) + 1.0


def test_noise_and_silence_make_no_turn(speech):
    noise = speech("sb_noise2.wav") * 0.3
    seg = Segmenter()
    events = []
    for x in (np.zeros(32000, np.float32), noise):
        for i in range(0, len(x), 320):
            events += seg.feed(x[i : i + 320])
    assert not [e for e in events if isinstance(e, SpeechEnd) and len(e.audio) > 16000 * 0.5]


@pytest.mark.parametrize("click_ms", [150])
def test_short_click_is_not_speech(click_ms):
    rng = np.random.default_rng(1)
    click = rng.normal(0, 0.3, int(click_ms / 1000 * 16000)).astype(np.float32)
    x = np.concatenate([np.zeros(8000, np.float32), click, np.zeros(16000, np.float32)])
    seg = Segmenter()
    events = [e for i in range(0, len(x), 320) for e in seg.feed(x[i : i + 320])]
    assert not [e for e in events if isinstance(e, SpeechEnd)]


def test_a_three_minute_monologue_is_cut_into_bounded_turns_and_keeps_every_second(speech):
    """Nobody's speech is buffered forever: past ``max_segment_s`` the segment ends and the next
    one starts at once, with no audio lost between them."""
    def trimmed(x: np.ndarray) -> np.ndarray:  # the recordings' own lead-in and tail silences
        loud = np.flatnonzero(np.abs(x) > 0.05)
        return x[loud[0] : loud[-1] + 1]

    recordings = [trimmed(speech(n)) for n in ("en_birch_canoe.wav", "en_goforward.wav")]
    gap = np.zeros(int(0.15 * 16000), np.float32)  # breaths, well under the endpoint silence
    parts, total = [], 0
    while total < 180 * 16000:
        for r in recordings:
            parts += [r, gap]
            total += len(r) + len(gap)
    monologue = np.concatenate(parts)
    seg = Segmenter(VADOptions(max_segment_s=30.0, endpoint_silence_ms=500))
    events = []
    for i in range(0, len(monologue), 320):
        events += seg.feed(monologue[i : i + 320])
    events += seg.feed(np.zeros(16000, np.float32))
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert len(ends) >= 6  # 180 s in turns of at most 30 s
    assert all(len(e.audio) / 16000 <= 30.0 + 0.05 for e in ends)
    cuts = [i for i, e in enumerate(ends[:-1]) if len(e.audio) / 16000 >= 29.9]
    assert len(cuts) >= 3  # the recordings' own silences end some turns; the limit ends the rest
    for i in cuts:
        # The turn after a cut starts where the cut one stopped: nothing said in between is lost.
        stopped = ends[i].start + len(ends[i].audio) / 16000
        assert abs(ends[i + 1].start - stopped) <= 0.05, (i, ends[i + 1].start, stopped)


def test_leading_silence_is_trimmed_across_chunks_with_a_short_lead_in():
    rate = 48000
    tone = (8000 * np.cos(np.arange(960) / 5)).astype(np.int16)
    sound = np.concatenate([np.zeros(600, np.int16), np.full(100, 20, np.int16), tone, np.zeros(300, np.int16)])
    trim = LeadingSilenceTrimmer(rate, lead_ms=5)
    out = np.concatenate([trim.process(sound[i:i + 160]) for i in range(0, len(sound), 160)])
    # 700 quiet samples (the last 100 below -50 dBFS too) minus the 240-sample lead-in
    assert trim.done and trim.dropped == 700 - 240
    assert np.array_equal(out, sound[700 - 240:])
    assert np.array_equal(trim.process(tone[:10]), tone[:10])  # after the onset nothing is touched


def test_a_sound_that_never_rises_keeps_only_its_lead_in():
    trim = LeadingSilenceTrimmer(48000, lead_ms=5)
    assert len(trim.process(np.zeros(1000, np.int16))) == 0
    assert len(trim.flush()) == 240 and trim.done


def _speech_end(stream: np.ndarray) -> SpeechEnd:
    seg = Segmenter(VADOptions(endpoint_silence_ms=1400))
    [end] = [e for i in range(0, len(stream), 320) for e in seg.feed(stream[i : i + 320]) if isinstance(e, SpeechEnd)]
    return end


@pytest.mark.parametrize("noise_db", [None, -50.0])
def test_the_sound_end_is_where_the_sound_stopped_not_where_silero_let_go(speech, noise_db):
    """Silero's probability stays up for a window or more after the last word; ``sound_end`` marks
    where the sound itself stopped (what a pause can be transcribed from), in a quiet room and over
    steady noise the segmenter learnt before the person spoke."""
    lags = []
    for name in RECORDINGS + ["en_harvard_spk1_snt1.wav", "en_harvard_spk1_snt3.wav"]:
        x = speech(name)
        _, off = voiced_bounds(x)  # the last 10 ms within 25 dB of the loudest
        stream = np.concatenate([np.zeros(8000, np.float32), x, np.zeros(40000, np.float32)])
        if noise_db is not None:
            stream += np.random.default_rng(0).normal(0, 10 ** (noise_db / 20), len(stream)).astype(np.float32)
        end = _speech_end(stream)
        true_end = 0.5 + off
        # Within about a window of the energy's end in a quiet room (softer tails than -25 dB count
        # as sound there). Over noise, a final "s" only 3 dB above it cannot be told from the room
        # ("meters": 128 ms early), which still leaves all but ~30 ms of it in a transcript taken
        # ``pause_quiet_s`` (96 ms) later; never a word early.
        early = 0.05 if noise_db is None else 0.13
        assert true_end - early <= end.sound_end <= true_end + 0.36, (name, end.sound_end - true_end)
        lags.append(end.t - end.sound_end)
    assert sum(lag > 0.03 for lag in lags) >= 3, lags  # mostly, Silero let go later


def test_a_stream_that_starts_mid_word_ends_its_sound_where_silero_does(speech):
    """With no noise floor learnt yet, a soft consonant cannot be told from the room: the sound
    lasts as long as Silero says, so no early transcript can miss the end of the word."""
    x = speech("en_birch_canoe.wav")
    on, _ = voiced_bounds(x)
    end = _speech_end(np.concatenate([x[int(on * 16000):], np.zeros(40000, np.float32)]))
    assert end.sound_end >= end.t - 1e-9


def test_loud_steady_noise_never_makes_the_sound_end_early(speech):
    """Where the noise is as loud as a soft consonant, the energy never falls back: the sound does
    not end before the speech (the caller falls back on Silero's silence)."""
    x = speech("en_birch_canoe.wav")
    _, off = voiced_bounds(x)
    stream = np.concatenate([np.zeros(8000, np.float32), x, np.zeros(40000, np.float32)])
    stream += np.random.default_rng(0).normal(0, 10 ** (-40 / 20), len(stream)).astype(np.float32)
    end = _speech_end(stream)
    assert end.sound_end >= 0.5 + off - 0.05
