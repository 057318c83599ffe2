"""Per-conversation summary of the per-turn latencies."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .frames import TurnMetrics

FIELDS = ("stt_ms", "llm_ttft_ms", "tts_ttfb_ms", "voice_to_voice_ms", "pipeline_ms")


def summarize(turns: Iterable[TurnMetrics]) -> dict[str, dict[str, float]]:
    """p50 / p95 / mean / count of each latency over the turns where it was measured."""
    turns = list(turns)
    out: dict[str, dict[str, float]] = {}
    for name in FIELDS:
        values = np.array([v for t in turns if (v := getattr(t, name)) is not None], dtype=float)
        if len(values):
            out[name] = {"p50": round(float(np.percentile(values, 50)), 1),
                         "p95": round(float(np.percentile(values, 95)), 1),
                         "mean": round(float(values.mean()), 1), "count": len(values)}
    return out
