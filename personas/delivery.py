"""How an answer was spoken, from the transcript and the VAD's timing; no LLM involved.

Pace is words per minute of speaking time (first to last voiced moment), so a long think before
answering does not count as slow speech. 120-160 wpm is the usual range for clear presentation
speech; interview coaches flag sustained pace outside it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

HEALTHY_WPM = (120, 160)
# A silence this long mid-answer reads as losing the thread. It must stay below the persona's
# endpoint silence, or the pause would end the turn instead of being counted.
LONG_PAUSE_S = 1.0
# Single-word fillers; "like" and "so" only count as fillers in the positions below.
_FILLERS = {"um", "umm", "uh", "uhh", "erm", "er", "ah", "hmm", "mm"}
_PHRASES = ("you know", "i mean", "sort of", "kind of")
_WORD = re.compile(r"[\w']+", re.UNICODE)


@dataclass
class Delivery:
    words: int
    speech_s: float
    wpm: float | None
    pace: str  # "slow" | "ok" | "fast" | "unknown"
    healthy_wpm: tuple[int, int] = HEALTHY_WPM
    fillers: dict = field(default_factory=dict)  # {"count", "per_minute", "words": {filler: n}}
    long_pauses: int = 0
    longest_pause_s: float = 0.0

    def payload(self) -> dict:
        d = asdict(self)
        d["healthy_wpm"] = list(self.healthy_wpm)
        return d


def count_fillers(text: str) -> Counter:
    words = [w.lower() for w in _WORD.findall(text)]
    found: Counter = Counter(w for w in words if w in _FILLERS)
    joined = " ".join(words)
    for phrase in _PHRASES:
        n = len(re.findall(rf"\b{phrase}\b", joined))
        if n:
            found[phrase] += n
    # "like" is a filler when it is not a verb or comparison: "it was, like, fine" / "like, we".
    found["like"] += len(re.findall(r"(?:^|[,.;]\s*)like\s*,|,\s*like\b", text.lower()))
    if not found["like"]:
        del found["like"]
    return found


def _pace(words: int, speech_s: float) -> tuple[float | None, str]:
    if speech_s < 1.0 or words < 3:
        return None, "unknown"  # too little to judge
    wpm = round(words / speech_s * 60, 1)
    return wpm, "slow" if wpm < HEALTHY_WPM[0] else "fast" if wpm > HEALTHY_WPM[1] else "ok"


def _build(words: int, speech_s: float, fillers: Counter, pauses: list[float]) -> Delivery:
    wpm, pace = _pace(words, speech_s)
    n = sum(fillers.values())
    return Delivery(words, round(speech_s, 2), wpm, pace,
                    fillers={"count": n, "per_minute": round(n / speech_s * 60, 1) if wpm is not None else None,
                             "words": dict(fillers)},
                    long_pauses=sum(p >= LONG_PAUSE_S for p in pauses),
                    longest_pause_s=round(max(pauses, default=0.0), 2))


def analyse(text: str, speech_s: float | None, pauses: list[float] | None = None) -> Delivery:
    return _build(len(_WORD.findall(text)), speech_s or 0.0, count_fillers(text), pauses or [])


def combine(parts: list[tuple[str, float | None, list[float]]]) -> Delivery:
    """One answer spoken over several turns (an answer, then the answer to the follow-up)."""
    fillers: Counter = Counter()
    for text, _, _ in parts:
        fillers.update(count_fillers(text))
    return _build(sum(len(_WORD.findall(t)) for t, _, _ in parts), sum(s or 0.0 for _, s, _ in parts),
                  fillers, [p for _, _, ps in parts for p in ps])
