"""False cut-offs: semantic end of turn against a plain VAD endpoint at the same median latency.

    parley bench endpointing [--speech DIR] [--variants N] [--decode-ms MS] [--smoke] [--out PATH]

The test set: every recording of ../shared/speech with a transcript (en, de, fr, es; one channel),
as recorded (some have natural pauses: JFK's run to a second) and in ``--variants`` copies with a
400-700 ms silence inserted at a word boundary mid-sentence. There is no forced aligner offline, so
word boundaries are estimated: the words share the voiced span in proportion to their letters, and
each boundary moves to the quietest 10 ms within 120 ms of the estimate (a breath or a stop closure).

Every utterance runs through real Silero VAD (its probabilities computed once, then replayed) and
``pipeline.vad.Segmenter``, (a) with a fixed endpoint silence, swept, and (b) with the endpoint the
conversation would choose (``pipeline.endpointing``, as ``Conversation._update_endpoint`` uses it):
the middle endpoint until an interim transcript exists, then the one its words call for.

The text signal is an ORACLE, not an STT: the reference transcript's words that ended before the
instant the interim decode starts (``partial_reuse_margin_s`` into the silence), available
``--decode-ms`` later, and a full stop added to the whole transcript (Whisper punctuates; several
references are lower-case without punctuation). The tests' random-weight Whisper writes garbage.
A real Whisper may end a fragment with a full stop; the policy lets trailing words win over it, but
a fragment ending on a content word with a stop would be cut at the short endpoint, so these
figures are the heuristic's best case on the text side.

A false cut-off: a turn ended before the true end of speech (the last 10 ms of the recording
within 25 dB of its peak that Silero also calls speech: JFK ends in applause). Latency: true end of speech to the end of the last turn.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.audio import load_audio  # noqa: E402
from pipeline.endpointing import Verdict, classify, endpoint_ms, with_audio  # noqa: E402
from pipeline.turn_model import load as load_turn_model  # noqa: E402
from pipeline.turns import EndpointingOptions, TurnOptions  # noqa: E402
from pipeline.vad import WINDOW, SileroVAD, Segmenter, SpeechEnd, VADOptions, heard_by  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # after the package: bench/pipeline.py shadows it
from _harness import save_result  # noqa: E402

RATE = 16000
LANGUAGES = {"en", "de", "fr", "es"}
LEAD_S, TAIL_S = 0.5, 2.5
SWEEP_MS = list(range(96, 1504, 32))  # window multiples: what the segmenter can actually resolve


@dataclass
class Utterance:
    name: str
    language: str
    audio: np.ndarray  # lead silence, speech, tail silence
    words: list[str]  # reference words with their punctuation, the last one closing the sentence
    word_ends: list[float]  # stream time (s) each word has been heard by
    speech_end: float  # stream time of the true end of speech
    onsets: list[float]  # stream times where speech resumes after a pause (for the oracle)
    gap: tuple[float, float] | None = None  # (stream time, seconds) of the inserted pause
    probs: np.ndarray | None = None  # Silero's probability per window


def energy(x: np.ndarray) -> np.ndarray:
    win = RATE // 100
    return np.sqrt(np.mean(x[: len(x) // win * win].reshape(-1, win) ** 2, axis=1))


def voiced_frames(x: np.ndarray) -> np.ndarray:
    """Per 10 ms: loud (within 25 dB of the peak) and speech to Silero. Energy alone takes a
    crowd's applause for speech (JFK), Silero alone ends a word early on a soft final consonant."""
    rms = energy(x)
    loud = rms > rms.max() * 10 ** (-25 / 20)
    probs = silero_probs(x)
    frame_win = np.minimum(np.arange(len(rms)) * 160 // WINDOW, len(probs) - 1)
    return loud & (probs[frame_win] >= 0.5)


def onsets(voiced: np.ndarray) -> list[float]:
    """Where each voiced stretch starts (s)."""
    starts = np.nonzero(voiced[1:] & ~voiced[:-1])[0] + 1
    return [i * 0.01 for i in starts]


def word_boundaries(x: np.ndarray, words: list[str]) -> tuple[float, list[float], list[float]]:
    """True end of speech and the estimated end of each word (s into ``x``): the words share the
    voiced 10 ms frames in proportion to their letters, so none is placed inside a pause."""
    mask = voiced_frames(x)
    voiced = np.nonzero(mask)[0]
    letters = np.array([max(sum(c.isalnum() for c in w), 1) for w in words], float)
    share = np.cumsum(letters) / letters.sum()
    idx = [voiced[min(int(round(f * len(voiced))) - 1, len(voiced) - 1)] for f in share[:-1]]
    rms = energy(x)
    out = []
    for i in idx:
        # The quietest instant nearby: a stop closure or breath between the words.
        lo, hi = max(i - 8, 0), min(i + 9, len(rms))
        out.append((lo + int(np.argmin(rms[lo:hi]))) * 0.01 + 0.01)
    end = (voiced[-1] + 1) * 0.01
    return end, list(np.maximum.accumulate(out)) + [end], onsets(mask)


def reference(text: str) -> list[str]:
    words = text.split()
    if words and words[-1][-1] not in ".?!":
        words[-1] += "."  # Whisper ends a finished sentence with a stop
    return words


def load_set(speech: Path, variants: int, seed: int, only: set[str] | None) -> list[Utterance]:
    rng = np.random.default_rng(seed)
    rows = list(csv.DictReader((speech / "manifest.tsv").open(encoding="utf-8"), delimiter="\t"))
    seen, out = set(), []
    for row in rows:
        name, lang, text = row["filename"], row["language"], row["reference_transcript"]
        if lang not in LANGUAGES or row.get("channels", "1") != "1" or text in seen:
            continue
        if only is not None and name not in only:
            continue
        seen.add(text)
        x = load_audio(str(speech / name))
        words = reference(text)
        end, ends, starts = word_boundaries(x, words)
        lead = np.zeros(int(LEAD_S * RATE), np.float32)
        tail = np.zeros(int(TAIL_S * RATE), np.float32)
        out.append(Utterance(name, lang, np.concatenate([lead, x, tail]), words,
                             [LEAD_S + e for e in ends], LEAD_S + end, [LEAD_S + t for t in starts]))
        for _ in range(variants):
            k = int(rng.integers(0, len(words) - 1))  # a pause after word k, never after the last
            gap_s = float(rng.uniform(0.4, 0.7))
            cut = int(ends[k] * RATE)
            # Low-level noise, not digital zeros: a pause in a real room is never exactly silent.
            pause = rng.normal(0, 10 ** (-60 / 20), int(gap_s * RATE)).astype(np.float32)
            y = np.concatenate([lead, x[:cut], pause, x[cut:], tail])
            shifted = [LEAD_S + e + (gap_s if i > k else 0.0) for i, e in enumerate(ends)]
            resumed = [LEAD_S + t + (gap_s if t >= ends[k] else 0.0) for t in starts]
            resumed.append(LEAD_S + ends[k] + gap_s)
            out.append(Utterance(f"{name}+{gap_s * 1000:.0f}ms@{k + 1}", lang, y, words, shifted,
                                 LEAD_S + end + gap_s, sorted(resumed), gap=(LEAD_S + ends[k], gap_s)))
    return out


class Replay:
    """Silero's probabilities, computed once per utterance, fed back to each configuration."""

    def __init__(self, probs: np.ndarray):
        self.probs, self.i = probs, 0

    def reset(self) -> None:
        self.i = 0

    def __call__(self, window: np.ndarray) -> float:
        p = self.probs[self.i]
        self.i += 1
        return float(p)


def silero_probs(audio: np.ndarray) -> np.ndarray:
    vad = SileroVAD()
    n = len(audio) // WINDOW
    return np.array([vad(audio[i * WINDOW:(i + 1) * WINDOW]) for i in range(n)], np.float32)


class Sound:
    """The turn model's P(complete) at each pause, computed once per (utterance, instant)."""

    def __init__(self, model, ready_s: float):
        self.model, self.ready_s, self._memo = model, ready_s, {}
        self.calls_s: list[float] = []

    def __call__(self, u: Utterance, now: float) -> float:
        key = (u.name, round(now, 4))
        if key not in self._memo:
            t = time.perf_counter()
            self._memo[key] = self.model.probability(u.audio[: int(round(now * RATE))])
            self.calls_s.append(time.perf_counter() - t)
        return self._memo[key]


def run(u: Utterance, vad: VADOptions, semantic: EndpointingOptions | None, decode_s: float,
        margin_s: float, quiet_s: float, sound: Sound | None = None,
        stop: bool = False) -> tuple[list[float], list[str], list[float]]:
    """Turn-end times (stream s), the verdicts the semantic policy reached, and when each decode of
    a pause started (stream s). ``sound``: the turn model, asked when the pause's text leaves the
    words undecided and answering ``sound.ready_s`` later; ``stop``: every interim text ends with
    a full stop (Whisper's habit on fragments, at its worst)."""
    seg = Segmenter(vad, Replay(u.probs))
    ends, verdicts, decodes = [], [], []
    quiet_for = ready_at = None
    interim: str | None = None
    p = p_at = None
    for i in range(len(u.probs)):
        events = seg.feed(u.audio[i * WINDOW:(i + 1) * WINDOW])
        ends += [seg.now for e in events if isinstance(e, SpeechEnd)]
        if any(isinstance(e, SpeechEnd) for e in events):
            quiet_for = ready_at = interim = p = None
        if semantic is None or not seg.speaking:
            continue
        # As Conversation._while_speaking: the pause is transcribed once a transcript would hear
        # every word (``heard_by``), and that transcript stops covering the utterance once it goes on.
        now = seg.now
        heard = round(heard_by(now - seg.silence_s, seg.sound_end, margin_s, quiet_s), 4)
        if quiet_for is not None and heard > quiet_for:
            interim = ready_at = p = None  # talking again: the last interim no longer covers it
        if now >= heard - 1e-6 and quiet_for != heard:
            # The decode of everything said starts now; its text: the words said by now. Nothing is
            # said in a pause, so every word estimated to end before speech resumes counts: that
            # keeps the estimated word timings' errors out of the text.
            quiet_for, ready_at = heard, now + decode_s
            decodes.append(now)
            said_by = next((t for t in u.onsets if t > now), float("inf"))
            interim = " ".join(w for w, t in zip(u.words, u.word_ends) if t <= said_by)
            if stop and interim and interim[-1] not in ".?!":
                interim += "."
        text = interim if ready_at is not None and now >= ready_at else None
        said = classify(text, u.language)
        if (sound is not None and text is not None and p is None
                and (said is Verdict.UNKNOWN or (said is Verdict.COMPLETE and semantic.audio_veto_below > 0))):
            # As Conversation._ask_turn_model: asked once the words leave it undecided.
            p, p_at = sound(u, now), now + sound.ready_s
        verdict = with_audio(said, p if p is not None and now >= p_at - 1e-9 else None, semantic)
        seg.endpoint_ms = endpoint_ms(verdict, semantic, vad.endpoint_silence_ms)
        if text is not None and (not verdicts or verdicts[-1] != verdict.value):
            verdicts.append(verdict.value)
    return ends, verdicts, decodes


def pause_decodes(utts: list[Utterance], runs: list) -> dict:
    """When the decode of the final pause started, after the true end of speech (as recorded, no
    inserted pause), and how many decodes per utterance started while the person still had words
    to say (a stop consonant's closure, a breath: each a decode, and maybe an LLM request, in vain)."""
    last = [(max(d for d in r[2] if d < max(r[0]) + 1e-6) - u.speech_end) * 1000
            for u, r in zip(utts, runs) if not u.gap and r[0] and any(d < max(r[0]) + 1e-6 for d in r[2])]
    early = [sum(1 for d in r[2] if d < u.speech_end - 0.02) for u, r in zip(utts, runs)]
    q = np.percentile(last, [50, 90]) if last else [float("nan")] * 2
    return {"after_true_end_median_ms": round(float(q[0]), 1), "after_true_end_p90_ms": round(float(q[1]), 1),
            "before_the_end_per_utterance": round(sum(early) / max(len(early), 1), 2)}


def score(utts: list[Utterance], turn_ends: list[list[float]]) -> dict:
    cut = [any(t < u.speech_end for t in ends) for u, ends in zip(utts, turn_ends)]
    lat = [(max(ends) - u.speech_end) * 1000 for u, ends in zip(utts, turn_ends) if ends]
    missed = sum(1 for ends in turn_ends if not ends)
    q = np.percentile(lat, [50, 90]) if lat else [float("nan")] * 2
    gaps = [c for u, c in zip(utts, cut) if u.gap]
    return {"false_cutoffs": int(sum(cut)), "utterances": len(utts), "false_cutoff_rate": sum(cut) / len(utts),
            "false_cutoffs_inserted_pause": int(sum(gaps)), "with_inserted_pause": len(gaps),
            "median_ms": round(float(q[0]), 1), "p90_ms": round(float(q[1]), 1), "no_turn": missed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speech", type=Path, default=ROOT.parent / "shared" / "speech")
    ap.add_argument("--variants", type=int, default=6, help="copies of each recording with an inserted pause")
    ap.add_argument("--decode-ms", type=float, default=50.0,
                    help="time from the interim decode's start to its text (a warm GPU Whisper: tens of ms)")
    ap.add_argument("--base-ms", type=int, default=VADOptions().endpoint_silence_ms,
                    help="the VAD's own endpoint (the server's default)")
    ap.add_argument("--persona-base-ms", type=int, default=1200,
                    help="a persona's longer endpoint (the teacher's), also run with semantic end of turn")
    ap.add_argument("--turn-model", default="auto",
                    help="auto (Smart Turn v3 from an installed pipecat-ai), off, or an ONNX path")
    ap.add_argument("--turn-model-ms", type=float, default=50.0,
                    help="time from the pause's text to the turn model's answer (~45 ms on a core)")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--smoke", action="store_true", help="the recordings in tests/data, 3 variants each")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    only = None
    if args.smoke:
        args.speech = ROOT / "tests" / "data"
        args.variants = min(args.variants, 3)
    out = args.out or ROOT / "bench" / "results" / ("endpointing-smoke.json" if args.smoke else "endpointing.json")

    t0 = time.perf_counter()
    utts = load_set(args.speech, args.variants, args.seed, only)
    for u in utts:
        u.probs = silero_probs(u.audio)
    t_vad = time.perf_counter() - t0
    semantic = TurnOptions().endpointing
    margin, quiet = TurnOptions().partial_reuse_margin_s, TurnOptions().pause_quiet_s
    base = VADOptions(endpoint_silence_ms=args.base_ms)

    runs = [run(u, base, semantic, args.decode_ms / 1000, margin, quiet) for u in utts]
    sem = score(utts, [r[0] for r in runs])
    persona = VADOptions(endpoint_silence_ms=args.persona_base_ms)
    sem_persona = score(utts, [run(u, persona, semantic, args.decode_ms / 1000, margin, quiet)[0] for u in utts])
    # The pause's decode by the sound's end against by Silero's silence alone (quiet: never).
    pauses = pause_decodes(utts, runs)
    pauses_vad = pause_decodes(utts, [run(u, base, semantic, args.decode_ms / 1000, margin, float("inf"))
                                      for u in utts])
    verdict_counts: dict[str, int] = {}
    for _, vs, _ in runs:
        for v in vs:
            verdict_counts[v] = verdict_counts.get(v, 0) + 1
    sweep = {ms: score(utts, [run(u, VADOptions(endpoint_silence_ms=ms), None, 0, margin, quiet)[0] for u in utts])
             for ms in SWEEP_MS}
    model = load_turn_model(args.turn_model)
    sound = Sound(model, args.turn_model_ms / 1000) if model is not None else None
    decode_s = args.decode_ms / 1000

    def scored(vad: VADOptions, options: EndpointingOptions = semantic, **kw) -> dict:
        return score(utts, [run(u, vad, options, decode_s, margin, quiet, **kw)[0] for u in utts])

    # Whisper's habit at its worst: every interim fragment ends with a full stop.
    stop = {"words": scored(base, stop=True)}
    with_model = {}
    if sound is not None:
        with_model = {"base": scored(base, sound=sound), "persona_base": scored(persona, sound=sound)}
        stop["words_and_sound"] = scored(base, sound=sound, stop=True)
        stop["words_and_sound_veto_0.2"] = scored(base, sound=sound, stop=True,
                                                  options=dataclasses.replace(semantic, audio_veto_below=0.2))
    # The plain VAD whose median latency is nearest the semantic one (the longer on a tie: kinder to it).
    same_latency = min(SWEEP_MS, key=lambda ms: (abs(sweep[ms]["median_ms"] - sem["median_ms"]), -ms))
    fewer = [ms for ms in SWEEP_MS if sweep[ms]["false_cutoffs"] <= sem["false_cutoffs"]]
    same_cutoffs = fewer[0] if fewer else None

    n_gap = sum(1 for u in utts if u.gap)
    print(f"endpointing: {len(utts)} utterances from {args.speech} ({len(utts) - n_gap} as recorded, {n_gap} with "
          f"a 400-700 ms pause inserted at a word boundary); real Silero VAD ({t_vad:.1f} s)")
    print(f"text signal: ORACLE (reference transcript up to the audio heard, {args.decode_ms:.0f} ms after the "
          f"interim decode starts), not an STT")
    print(f"semantic options: complete {semantic.complete_silence_ms} ms, unknown {semantic.unknown_silence_ms} ms, "
          f"incomplete {semantic.incomplete_silence_ms} ms (unknown at most, incomplete at least the VAD base)\n")
    header = f"{'':<40}{'false cut-offs':>16}{'(inserted)':>12}{'median':>9}{'p90':>9}"
    print(header)
    print("-" * len(header))

    def line(label: str, s: dict) -> None:
        print(f"{label:<40}{s['false_cutoffs']:>7}/{s['utterances']:<3} {100 * s['false_cutoff_rate']:>3.0f}%"
              f"{s['false_cutoffs_inserted_pause']:>7}/{s['with_inserted_pause']:<4}"
              f"{s['median_ms']:>7.0f}ms{s['p90_ms']:>7.0f}ms")

    line(f"semantic end of turn, VAD base {args.base_ms} ms", sem)
    line(f"semantic end of turn, VAD base {args.persona_base_ms} ms", sem_persona)
    if with_model:
        line(f"  + turn model, VAD base {args.base_ms} ms", with_model["base"])
        line(f"  + turn model, VAD base {args.persona_base_ms} ms", with_model["persona_base"])
    line(f"plain VAD {same_latency} ms (same median latency)", sweep[same_latency])
    if same_cutoffs is not None:
        line(f"plain VAD {same_cutoffs} ms (as few cut-offs)", sweep[same_cutoffs])
    if with_model:
        fewer_m = [ms for ms in SWEEP_MS if sweep[ms]["false_cutoffs"] <= with_model["base"]["false_cutoffs"]]
        if fewer_m:
            line(f"plain VAD {fewer_m[0]} ms (as few as with the model)", sweep[fewer_m[0]])
    print(f"\nevery interim fragment ending with a full stop (VAD base {args.base_ms} ms):")
    for label, s in stop.items():
        line(f"  {label.replace('_', ' ')}", s)
    if sound is not None:
        calls = np.array(sound.calls_s) * 1000
        print(f"turn model {model.path.name}: {len(calls)} pauses heard, {np.median(calls):.1f} ms median "
              f"(p90 {np.percentile(calls, 90):.1f}) each on one thread")
    else:
        print(f"turn model: none ({args.turn_model}; pip install --no-deps pipecat-ai for Smart Turn v3)")
    print(f"\nsemantic verdicts on interim text: {verdict_counts}")
    print(f"pause transcribed (as recorded): {pauses['after_true_end_median_ms']:.0f} / "
          f"{pauses['after_true_end_p90_ms']:.0f} ms (median / p90) after the true end of speech, "
          f"{pauses['before_the_end_per_utterance']} decodes per utterance before it; by Silero's silence alone: "
          f"{pauses_vad['after_true_end_median_ms']:.0f} / {pauses_vad['after_true_end_p90_ms']:.0f} ms, "
          f"{pauses_vad['before_the_end_per_utterance']}")
    print("\nplain VAD sweep (endpoint ms: false cut-offs, median latency ms):")
    print("  " + "  ".join(f"{ms}:{sweep[ms]['false_cutoffs']}/{sweep[ms]['median_ms']:.0f}" for ms in SWEEP_MS[::2]))
    result = {
        "smoke": args.smoke, "speech": str(args.speech), "utterances": len(utts), "with_inserted_pause": n_gap,
        "text_signal": "oracle: reference transcript prefix up to the audio heard",
        "decode_ms": args.decode_ms, "vad_base_ms": args.base_ms,
        "semantic_options": {"complete_silence_ms": semantic.complete_silence_ms,
                             "unknown_silence_ms": semantic.unknown_silence_ms,
                             "incomplete_silence_ms": semantic.incomplete_silence_ms},
        "semantic": sem, "verdicts": verdict_counts,
        "turn_model": str(model.path.name) if sound is not None else None,
        "turn_model_ms": args.turn_model_ms,
        "turn_model_inference_ms_median": round(float(np.median(sound.calls_s)) * 1000, 1) if sound else None,
        "semantic_with_turn_model": with_model or None,
        "fragments_end_with_a_stop": stop,
        "pause_decode": {"quiet_ms": round(quiet * 1000), "margin_ms": round(margin * 1000), **pauses,
                         "by_silero_silence_alone": pauses_vad},
        "semantic_persona_base": {"vad_base_ms": args.persona_base_ms, **sem_persona},
        "plain_same_latency": {"endpoint_ms": same_latency, **sweep[same_latency]},
        "plain_same_cutoffs": {"endpoint_ms": same_cutoffs, **sweep[same_cutoffs]} if same_cutoffs else None,
        "sweep": {str(ms): s for ms, s in sweep.items()},
        # Turn ends relative to the true end of speech (negative: a cut-off), base endpoint.
        "cases": [{"name": u.name, "semantic_turn_ends": [round(t - u.speech_end, 3) for t in r[0]],
                   "verdicts": r[1]} for u, r in zip(utts, runs)],
    }
    save_result(out, result)


if __name__ == "__main__":
    main()
