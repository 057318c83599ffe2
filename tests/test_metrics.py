from pipeline.frames import TurnMetrics
from pipeline.metrics import summarize


def test_summary_skips_missing_values_and_gives_percentiles():
    turns = [TurnMetrics(i, stt_ms=float(i * 100), llm_ttft_ms=None if i == 1 else 50.0) for i in range(1, 11)]
    s = summarize(turns)
    assert s["stt_ms"]["count"] == 10 and s["stt_ms"]["p50"] == 550.0 and s["stt_ms"]["p95"] == 955.0
    assert s["llm_ttft_ms"]["count"] == 9 and s["llm_ttft_ms"]["mean"] == 50.0
    assert "voice_to_voice_ms" not in s
