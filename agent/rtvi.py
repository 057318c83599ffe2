"""Pipeline events as RTVI messages (the Pipecat client protocol) and client messages parsed.

Field names follow @pipecat-ai/client-js 1.13 (see tests/web/RTVI_NOTES.md): times in ``metrics``
are seconds, ``user-transcription`` carries an ISO 8601 timestamp, ``bot-ready`` announces the
protocol version the client itself speaks.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline import frames as F

PROTOCOL_VERSION = "2.1.0"
LABEL = "rtvi-ai"


def message(type_: str, data: dict[str, Any] | None = None, id_: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"label": LABEL, "type": type_, "id": id_ or uuid.uuid4().hex[:8]}
    if data is not None:
        msg["data"] = data
    return msg


def bot_ready(about: dict[str, Any]) -> dict[str, Any]:
    return message("bot-ready", {"version": PROTOCOL_VERSION, "about": about})


def error(text: str, fatal: bool = False) -> dict[str, Any]:
    return message("error", {"error": text, "fatal": fatal})


def server_message(data: dict[str, Any]) -> dict[str, Any]:
    return message("server-message", data)


def from_event(ev: F.Event, user_id: str = "user") -> list[dict[str, Any]]:
    """The RTVI messages that tell a client about one pipeline event."""
    match ev:
        case F.UserStartedSpeaking():
            return [message("user-started-speaking")]
        case F.UserStoppedSpeaking():
            return [message("user-stopped-speaking")]
        case F.Transcript(text=text, final=final):
            ts = datetime.now(timezone.utc).isoformat()
            return [message("user-transcription", {"text": text, "user_id": user_id, "timestamp": ts, "final": final})]
        case F.BotStartedSpeaking():
            return [message("bot-started-speaking")]
        case F.BotStoppedSpeaking():
            return [message("bot-stopped-speaking")]
        case F.BotText(text=text, spoken=True):
            return [message("bot-tts-text", {"text": text}),
                    message("bot-output", {"text": text, "spoken": True, "aggregated_by": "sentence"})]
        case F.BotText(text=text, tts_failed=True):
            return [message("bot-output", {"text": text, "spoken": False, "aggregated_by": "sentence"})]
        case F.BotText(text=text):
            # Clients concatenate bot-llm-text like streamed tokens: keep the space between clauses.
            return [message("bot-llm-text", {"text": text + " "})]
        case F.BotInterrupted(spoken_text=spoken):
            return [server_message({"type": "interrupted", "spoken_text": spoken})]
        case F.StateChanged(state=state):
            return [server_message({"type": "state", "state": state.value})]
        case F.TurnMetrics() as m:
            ttfb = [{"processor": name, "value": round(v / 1000, 4)}
                    for name, v in (("stt", m.stt_ms), ("llm", m.llm_ttft_ms), ("tts", m.tts_ttfb_ms)) if v is not None]
            summary = {"type": "turn-metrics", "turn": m.turn, "stt_ms": m.stt_ms, "llm_ttft_ms": m.llm_ttft_ms,
                       "tts_ttfb_ms": m.tts_ttfb_ms, "voice_to_voice_ms": m.voice_to_voice_ms,
                       "pipeline_ms": m.pipeline_ms}
            return [message("metrics", {"ttfb": ttfb}), server_message(summary)]
        case F.ErrorEvent(message=text, fatal=fatal):
            return [error(text, fatal)]
        case F.Notice(text=text):
            return [server_message({"type": "notice", "text": text})]
    return []


@dataclass(slots=True)
class ClientMessage:
    type: str
    id: str | None
    data: dict[str, Any]


class BadMessage(ValueError):
    pass


SIGNALLING = "signalling"  # SmallWebRTC's own envelope (track status), not RTVI: no label
MAX_DEPTH = 32  # deeper JSON than any RTVI message; past ~1000 levels json.loads itself overflows the stack
MAX_ID_CHARS = 64  # ids are echoed back in replies


def parse(raw: str | bytes, max_bytes: int) -> ClientMessage | None:
    """An RTVI message from the data channel; None for traffic that is not for us (pings, signalling).

    Anything else that is not a well-formed RTVI message raises ``BadMessage`` with a sentence the
    room sends back as an ``error``: a client never gets silence for a message it got wrong."""
    if not isinstance(raw, (str, bytes)):
        raise BadMessage(f"messages are text, not {type(raw).__name__}")
    # The limit is in bytes as they came over the wire: a str counts characters, up to 4 bytes each.
    size = len(raw) if isinstance(raw, bytes) or len(raw) > max_bytes else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadMessage(f"message of {size} bytes is over the {max_bytes}-byte limit")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise BadMessage("binary messages are not supported") from None
    if raw == "ping" or raw.startswith("ping:"):
        return None  # the Pipecat client's keep-alive: "ping: <ms>"
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadMessage(f"message is not JSON: {e.msg}") from None
    except RecursionError:
        raise BadMessage(f"message is nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(msg, dict):
        raise BadMessage("message must be a JSON object")
    if _depth(msg) > MAX_DEPTH:
        raise BadMessage(f"message is nested more than {MAX_DEPTH} levels deep")
    type_ = msg.get("type")
    label = msg.get("label")
    if label is None and type_ == SIGNALLING:
        return None  # e.g. {"type": "signalling", "message": {"type": "trackStatus", ...}}
    if label != LABEL:
        raise BadMessage(f"not an RTVI message: expected label {LABEL!r}")
    if not isinstance(type_, str) or not type_:
        raise BadMessage("an RTVI message needs a 'type' string")
    id_ = msg.get("id")
    if isinstance(id_, int) and not isinstance(id_, bool):
        id_ = str(id_)
    if id_ is not None and not (isinstance(id_, str) and len(id_) <= MAX_ID_CHARS):
        raise BadMessage(f"an RTVI message 'id' is a string of at most {MAX_ID_CHARS} characters")
    data = msg.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadMessage(f"{type_[:40]!r}: 'data' must be an object")
    return ClientMessage(type_, id_, data)


def _depth(obj: Any) -> int:
    """Nesting depth, without recursion (the value may be as deep as json.loads allowed)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest
