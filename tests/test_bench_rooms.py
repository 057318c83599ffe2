"""bench/rooms.py and bench/transport.py stay runnable: their --smoke modes end to end (a server
child process, aiortc clients on loopback), and the JSON they write says what it should."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_bench(name: str, out, *args: str, timeout: float = 180) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["cpus"] >= 1
    return result


def test_rooms_smoke_measures_rooms_talking_to_a_real_server(tmp_path, tiny_whisper_path):
    r = run_bench("rooms", tmp_path / "rooms.json")
    assert r["stt"] == "tiny" and r["criteria"]["pipeline_ms_p95_below"] == 50.0
    (step,) = r["runs"]
    assert step["rooms"] == 2 and step["rooms_lost"] == 0 and step["rooms_drained"]
    # The rooms talked: the server answered turns, sent the agent's voice, the clients received it.
    assert step["turns"] >= 1 and step["pipeline_ms"]["p50"] is not None
    assert step["frames_sent"] > 2 * 50 * 3 and step["received_frames"] > 2 * 50 * 3
    assert step["missing_frames"] == 0  # loopback loses nothing
    assert 0 < step["server_cpu_pct"] and 0 < step["event_loop_cpu_pct"] <= step["server_cpu_pct"] + 5
    assert set(step["server_cpu_split_pct"]) == {"loop", "stt", "other"}
    assert isinstance(step["ok"], bool) and (step["ok"] or step["failed"])  # pass/fail is the bench's verdict
    assert r["max_rooms"] in (0, 2)


def test_rooms_smoke_through_a_front_and_two_worker_processes(tmp_path):
    r = run_bench("rooms", tmp_path / "rooms.json", "--stt", "instant", "--workers", "2")
    assert r["workers"] == 2 and "2 worker processes" in r["benchmark"]
    (step,) = r["runs"]
    assert step["rooms"] == 2 and step["rooms_lost"] == 0 and step["rooms_drained"]
    # Rooms placed on the least loaded worker talked, and the per-room counters of both workers came back.
    assert step["turns"] >= 1 and step["frames_sent"] > 2 * 50 * 3 and step["received_frames"] > 2 * 50 * 3
    # The server's CPU is the front's and its workers' together (their main threads are the loops).
    assert 0 < step["server_cpu_pct"] and step["server_cpu_split_pct"]["loop"] > 0


def test_transport_smoke_times_bursts_both_ways(tmp_path, tiny_whisper_path):
    r = run_bench("transport", tmp_path / "transport.json")
    (run,) = r["runs"]
    assert run["variant"] == "parley" and r["target_one_way_ms"] == 60
    up, down = run["mouth_to_pipeline_ms"], run["pipeline_to_ear_ms"]
    assert up["n"] >= 3 and down["n"] >= 3
    # One way through loopback is tens of milliseconds, never seconds; and the parts add up.
    assert 0 < up["p50"] < 300 and 0 < down["p50"] < 300
    assert run["mouth_to_server_socket_ms"]["p50"] <= up["p50"]
    assert run["pipeline_to_client_socket_ms"]["p50"] <= down["p50"]


def test_rooms_smoke_with_the_server_on_its_own_core(tmp_path):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip(reason="needs two cores: one for the server, the rest for the clients")
    r = run_bench("rooms", tmp_path / "rooms.json", "--stt", "instant", "--server-cores", "1")
    # The kernel confined the server (every process of it) to one core; the clients ran elsewhere.
    assert r["server_cores"] == 1 and r["server_cpus"] == [min(os.sched_getaffinity(0))]
    (step,) = r["runs"]
    assert step["rooms"] == 2 and step["rooms_lost"] == 0 and step["turns"] >= 1
    assert step["frames_sent"] > 2 * 50 * 3 and step["received_frames"] > 2 * 50 * 3
    assert r["rooms_per_server_core"] == r["max_rooms"]
