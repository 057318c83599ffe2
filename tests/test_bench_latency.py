"""bench/latency.py stays runnable: its --smoke mode end to end (a server child process with the
real VAD, faster-whisper and turn-taking, an aiortc client on loopback saying real recordings, a
local OpenAI-compatible LLM with a 150 ms first token), and the figures it writes are plausible."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_latency_smoke_measures_every_turn_end_to_end(tmp_path, tiny_whisper_path):
    out = tmp_path / "latency.json"
    tts = "espeak" if shutil.which("espeak-ng") or shutil.which("espeak") else "tone"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--smoke", "--tts", tts,
                           "--out", str(out)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["target"]["ttft_ms"] == 150
    (run,) = r["runs"]
    assert run["ttft_ms"] == 150 and run["tts"] == tts and run["stt_model"] == "tiny-test"
    assert run["endpointing"]  # the mode in effect, in words
    assert run["client_receive"] == "decoded on arrival, in order"
    s = run["summary"]
    # Every turn was said, heard out and answered with audio the client decoded.
    assert s["turns"] == 2 and s["no_reply"] == 0 and s["cut_off"] == 0 and s["measured"] == 2
    for turn in run["turns"]:
        total, st = turn["total_ms"], turn["stages_ms"]
        # An answer needs at least the LLM's first token after the person stopped talking (or,
        # generated ahead, the silence that decided the turn), and a turn on loopback takes well
        # under the seconds a broken pipeline would.
        assert 150 < total < 5000
        assert set(st) == {"endpointing", "stt_final", "llm", "tts_first_audio", "output", "transport"}
        assert all(v is not None and v >= 0 for v in st.values()), st
        assert st["endpointing"] > 0 and 0 < st["transport"] < 200
        # The stages are the critical path: they add up to the total, never to more.
        assert sum(st.values()) <= total + 1 and sum(st.values()) == pytest.approx(total, abs=1)
        # The engines' own times (TurnMetrics over the data path) fit inside the turn.
        engine = turn["engine_ms"]
        assert engine["llm_ttft"] >= 140 and engine["stt"] > 0 and engine["tts"] >= 0
        assert st["endpointing"] + engine["stt"] <= total and engine["llm_ttft"] < total
    assert s["total_ms"]["median"] > 0 and s["total_ms"]["p90"] >= s["total_ms"]["median"]
