"""`parley bench stt` stays runnable: its smoke mode, end to end, writes sane figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_stt_bench_smoke_mode_runs_and_writes_sane_json(tmp_path, tiny_whisper_path):
    out = tmp_path / "stt.json"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "stt", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "audio s / wall s" in proc.stdout and "batched / one-at-a-time, audio s per wall s" in proc.stdout
    data = json.loads(out.read_text())
    assert data["smoke"] and data["device"] == "cpu" and data["arch"] == "tiny-test"
    runs = {(r["streams"], r["mode"]): r for r in data["runs"]}
    assert set(runs) == {(n, m) for n in (1, 4) for m in ("batched", "one-at-a-time")}
    for (n, mode), r in runs.items():
        assert r["finals"] >= n and r["audio_s"] > 0 and r["wall_s"] > 0
        assert r["audio_s_per_wall_s"] == pytest.approx(r["audio_s"] / r["wall_s"], rel=0.02)
        lat = r["final_latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] < r["wall_s"] * 1000 + 1
        assert r["batches"] >= 1 and 1 <= r["mean_batch"] <= r["batch_size"]
        assert r["worker_stage_s"]["encode"] > 0 and r["worker_stage_s"]["decode"] > 0
    assert runs[(4, "one-at-a-time")]["mean_batch"] == 1 and runs[(4, "one-at-a-time")]["batch_size"] == 1
    assert runs[(4, "batched")]["mean_batch"] > 1  # four streams in flight: decoded together
    assert set(data["throughput_gain"]) == {"1", "4"} and all(g > 0 for g in data["throughput_gain"].values())
