"""`parley bench endpointing` stays runnable, and semantic end of turn keeps its edge: fewer false
cut-offs than a plain VAD endpoint tuned to the same median latency (real Silero, tests/data)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_semantic_end_of_turn_cuts_off_fewer_utterances_than_plain_vad_at_the_same_latency(tmp_path):
    out = tmp_path / "endpointing.json"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "endpointing", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ORACLE" in proc.stdout and "same median latency" in proc.stdout
    data = json.loads(out.read_text())
    assert data["smoke"] and data["utterances"] >= 20 and data["with_inserted_pause"] >= 15
    sem, plain = data["semantic"], data["plain_same_latency"]
    assert abs(sem["median_ms"] - plain["median_ms"]) <= 40  # one 32 ms VAD window apart at most
    assert sem["false_cutoffs"] < plain["false_cutoffs"], (sem, plain)
    assert sem["no_turn"] == 0 and plain["no_turn"] == 0
    assert 200 < sem["median_ms"] < 600  # the short endpoint after a finished sentence, plus Silero's lag
    # Getting as few cut-offs from a plain VAD costs latency.
    assert data["plain_same_cutoffs"]["median_ms"] > sem["median_ms"] + 150
