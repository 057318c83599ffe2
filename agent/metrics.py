"""Prometheus metrics for one server: per-stage latency histograms, rooms, the STT queue, errors.

Every app owns one ``Metrics`` with its own ``CollectorRegistry`` (no process-global state, so two
apps in one process, as in the tests, never share counts). Rooms feed it from their event stream
(``observe``: ``TurnMetrics`` and ``ErrorEvent``); gauges that describe the present (active rooms,
STT queue depth, recent batch sizes, the voice tracks' late frames) are read at scrape time.

Latencies are exported in seconds, as Prometheus expects. The buckets have an edge at exactly
50 ms (and 20 ms) so that "pipeline-added p95 < 50 ms" can be read off the histogram without
interpolation: ``bucket{le="0.05"} / count >= 0.95``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pipeline import frames as F

log = logging.getLogger(__name__)

# Engine stages: tens of ms (a warm GPU Whisper) to seconds (a cold LLM).
ENGINE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Parley's own share: a few ms; 20 and 50 ms are the targets.
PIPELINE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
# (TurnMetrics field, metric name, help, buckets)
STAGES = (
    ("stt_ms", "parley_stt_seconds", "End of speech to final transcript", ENGINE_BUCKETS),
    ("llm_ttft_ms", "parley_llm_ttft_seconds", "LLM request to first token", ENGINE_BUCKETS),
    ("tts_ttfb_ms", "parley_tts_ttfb_seconds", "First clause to first TTS audio", ENGINE_BUCKETS),
    ("voice_to_voice_ms", "parley_voice_to_voice_seconds", "End of speech to first reply audio out",
     ENGINE_BUCKETS),
    ("pipeline_ms", "parley_pipeline_added_seconds",
     "Voice-to-voice minus the engines' own time: the latency Parley itself adds", PIPELINE_BUCKETS),
)
# Names an STT engine may use for the sizes of its recent batches (duck-typed: the batched engine
# is free to pick one).
BATCH_ATTRS = ("last_batch_sizes", "batch_sizes", "recent_batch_sizes")


class Metrics:
    def __init__(self, rooms: Callable[[], Iterable[Any]] = lambda: (), stt: Any = None):
        """``rooms``: the live rooms (read at scrape time); ``stt``: the shared STT engine."""
        self.registry = CollectorRegistry()
        self._rooms = rooms
        self.stt = stt
        self.stages = {field: Histogram(name, help_, registry=self.registry, buckets=buckets)
                       for field, name, help_, buckets in STAGES}
        self.turns = Counter("parley_turns", "Replies that started playing (one TurnMetrics each)",
                             registry=self.registry)
        self.errors = Counter("parley_errors", "Errors reported to clients, by source",
                              ["source"], registry=self.registry)
        # The extra LLM cost of preemptive generation: replies started on the interim transcript
        # that were played ("used") or cancelled unheard ("discarded").
        self.preemptive = Counter("parley_llm_preemptive_requests", "LLM requests started on an interim "
                                  "transcript, by outcome", ["outcome"], registry=self.registry)
        # Totals of connections and rooms already closed, so the counters stay monotonic.
        self._closed = {"frames": 0, "late": 0, "resyncs": 0, "underruns": 0}
        self.registry.register(_LiveCollector(self))

    # -- feeding

    def observe(self, ev: F.Event) -> None:
        """One pipeline event of any room."""
        if isinstance(ev, F.TurnMetrics):
            self.turns.inc()
            if ev.preemptive:
                self.preemptive.labels("used").inc()
            if ev.llm_discarded:
                self.preemptive.labels("discarded").inc(ev.llm_discarded)
            for field, hist in self.stages.items():
                value = getattr(ev, field)
                if value is not None:
                    hist.observe(value / 1000)
        elif isinstance(ev, F.ErrorEvent):
            self.errors.labels(ev.source).inc()

    def peer_closed(self, peer: Any) -> None:
        """Keep a closed connection's voice-track counts (the totals stay monotonic)."""
        for key, value in voice_stats(peer).items():
            self._closed[key] += value

    def room_closed(self, room: Any) -> None:
        self._closed["underruns"] += player_underruns(room)

    # -- reading

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def voice_stats(peer: Any) -> dict[str, int]:
    """A connection's outgoing voice track counters (see ``agent.peer.AgentVoiceTrack``)."""
    track = getattr(peer, "voice", None)
    return {"frames": getattr(track, "frames", 0), "late": getattr(track, "late_frames", 0),
            "resyncs": getattr(track, "resyncs", 0)}


def player_underruns(room: Any) -> int:
    player = getattr(getattr(room, "conversation", None), "player", None)
    return getattr(player, "underruns", 0)


def batch_sizes(stt: Any) -> list[int] | None:
    for attr in BATCH_ATTRS:
        sizes = getattr(stt, attr, None)
        if sizes is not None:
            try:
                return [int(s) for s in sizes]
            except (TypeError, ValueError):
                return None
    return None


class _LiveCollector:
    """Gauges computed when scraped: nothing to keep in step when rooms come and go."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []  # unchecked collector: families are created per scrape

    def collect(self):
        rooms = list(self.m._rooms())
        yield GaugeMetricFamily("parley_active_rooms", "Rooms open in this process", value=len(rooms))
        totals = dict(self.m._closed)
        for r in rooms:
            peer = getattr(r, "peer", None)
            if peer is not None and not peer.closed:
                for key, value in voice_stats(peer).items():
                    totals[key] += value
            totals["underruns"] += player_underruns(r)
        for key, name, help_ in (
                ("frames", "parley_voice_frames", "Agent voice frames sent"),
                ("late", "parley_voice_late_frames", "Agent voice frames handed to the encoder more than 20 ms late"),
                ("resyncs", "parley_voice_resyncs", "Times an agent voice clock re-anchored after a stall"),
                ("underruns", "parley_player_underruns", "Frames inside a reply played short, waiting for TTS")):
            yield CounterMetricFamily(name, help_, value=totals[key])
        stt = self.m.stt
        depth = getattr(stt, "queue_depth", None)
        if depth is not None:
            yield GaugeMetricFamily("parley_stt_queue_depth", "Transcriptions waiting for the STT engine",
                                    value=float(depth))
        sizes = batch_sizes(stt)
        if sizes is not None:
            family = GaugeMetricFamily("parley_stt_batch_size", "Sizes of the STT engine's recent batches",
                                       labels=["stat"])
            if sizes:
                family.add_metric(["last"], sizes[-1])
                family.add_metric(["mean"], sum(sizes) / len(sizes))
                family.add_metric(["max"], max(sizes))
            family.add_metric(["count"], len(sizes))
            yield family
