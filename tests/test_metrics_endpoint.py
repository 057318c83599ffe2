"""GET /metrics: Prometheus histograms fed by real turns, the rooms gauge, errors by source."""
from __future__ import annotations

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics
from fake_llm import last_user
from pipeline import frames as F
from webrtc_client import Client


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def count(s: dict, name: str) -> float:
    return s.get((f"{name}_count", ()), 0.0)


async def test_metrics_after_a_typed_turn(parley_server):
    parley_server.llm.reply_for = lambda req: "You typed: " + last_user(req)
    before = await scrape(parley_server.url)
    assert before[("parley_active_rooms", ())] == 0
    assert count(before, "parley_pipeline_added_seconds") == 0
    c = Client(parley_server.url, np.zeros(16000, np.float32), room="metrics")
    try:
        await c.connect()
        await c.wait_for(lambda c: c.of("bot-ready"))
        c.send("send-text", {"content": "hello there", "options": {}})
        await c.wait_for(lambda c: any(m["data"].get("type") == "turn-metrics" and m["data"]["llm_ttft_ms"] is not None
                                       for m in c.of("server-message")))
        after = await scrape(parley_server.url)
    finally:
        await c.close()
    turns = [m["data"] for m in c.of("server-message") if m["data"].get("type") == "turn-metrics"]
    assert after[("parley_active_rooms", ())] == 1
    # Every turn that reached the client is in the histograms (the typed reply; the greeting too if it
    # started playing before the text cut it off).
    assert count(after, "parley_pipeline_added_seconds") == len(turns) >= 1
    assert count(after, "parley_tts_ttfb_seconds") == len(turns)
    assert count(after, "parley_llm_ttft_seconds") == 1  # the greeting is scripted: no LLM
    assert after[("parley_turns_total", ())] == len(turns)
    # Typed turns have no speech: the STT and voice-to-voice histograms exist, still empty.
    assert count(after, "parley_stt_seconds") == 0 and count(after, "parley_voice_to_voice_seconds") == 0
    # The 50 ms bucket edge is exact, so "p95 < 50 ms" reads straight off the histogram.
    assert ("parley_pipeline_added_seconds_bucket", (("le", "0.05"),)) in after
    total_ms = sum(t["pipeline_ms"] for t in turns)
    assert abs(after[("parley_pipeline_added_seconds_sum", ())] * 1000 - total_ms) < 1.0
    # The agent's voice track has been sending (client, server and Whisper's warm-up share this
    # process and its event loop here, so late frames are possible and not asserted).
    assert after[("parley_voice_frames_total", ())] > 0
    assert ("parley_voice_late_frames_total", ()) in after and ("parley_voice_resyncs_total", ()) in after
    assert ("parley_stt_queue_depth", ()) in after
    assert ("parley_stt_batch_size", (("stat", "count"),)) in after  # the engine's recent_batch_sizes


def test_errors_by_source_and_a_registry_per_app():
    class BatchedSTT:
        queue_depth = 3
        last_batch_sizes = [1, 4, 2]

    a, b = Metrics(stt=BatchedSTT()), Metrics()
    a.observe(F.ErrorEvent("llm", "timeout"))
    a.observe(F.ErrorEvent("llm", "timeout"))
    a.observe(F.ErrorEvent("tts", "espeak failed"))
    a.observe(F.TurnMetrics(1, stt_ms=120.0, pipeline_ms=4.0))
    sa, sb = samples(a.render()[0].decode()), samples(b.render()[0].decode())
    assert sa[("parley_errors_total", (("source", "llm"),))] == 2
    assert sa[("parley_errors_total", (("source", "tts"),))] == 1
    assert count(sa, "parley_stt_seconds") == 1 and sa[("parley_stt_seconds_sum", ())] == 0.12
    assert sa[("parley_stt_queue_depth", ())] == 3
    assert sa[("parley_stt_batch_size", (("stat", "last"),))] == 2
    assert sa[("parley_stt_batch_size", (("stat", "max"),))] == 4
    # Another app's registry saw none of it; an engine without the attributes exports no gauge.
    assert count(sb, "parley_stt_seconds") == 0 and ("parley_errors_total", (("source", "llm"),)) not in sb
    assert ("parley_stt_queue_depth", ()) not in sb and ("parley_stt_batch_size", (("stat", "count"),)) not in sb
