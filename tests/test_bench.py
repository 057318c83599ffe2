"""bench/pipeline.py stays runnable, and the TurnMetrics it reports mean what they say."""
from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_pipeline_bench_runs_in_real_time_and_pipeline_ms_is_decision_to_first_frame():
    bench = load_bench()
    # 3.5 s of real time (the bench paces itself): each conversation says its recording from the
    # start (speech ends at 2.4 s, the turn is decided 0.5 s later) and hears the start of a reply.
    r = await bench.run(n_conv=3, seconds=3.5, seed=1, start_s=0.0)
    assert r["turns"] == 3 and r["unexpected_interruptions"] == 0 and r["underruns"] == 0
    # With instant engines nothing is subtracted: pipeline_ms is the decision -> first frame time.
    assert abs(r["pipeline_ms"]["p50"] - r["decision_to_frame_ms"]["p50"]) < 1.0
    # The first frame waits for the transport's next 20 ms tick after the audio is ready.
    assert r["decision_to_queued_ms"]["p50"] <= r["decision_to_frame_ms"]["p50"]
    assert 0 < r["cpu_pct_per_conversation"] < 100 and r["cpu_in_push_audio_pct"] > 0
