"""All of Parley's configuration: environment variables with the PARLEY_ prefix, or a .env file."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("parley"))


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("parley"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARLEY_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Agent processes behind host:port (`parley serve --workers N`, agent/workers.py): one event loop
    # holds ~20 rooms, so a host with more cores serves more rooms with more workers (about one per
    # core, the STT worker counted). 1: everything in this one process.
    workers: int = Field(1, ge=1, le=64)
    log_level: str = "info"
    log_format: str = Field("text", pattern="^(text|json)$")  # json: one object per line, room as a field

    # Speech recognition. "base" answers in well under a second on a laptop CPU; on a GPU use
    # large-v3-turbo. A size name is fetched once into the cache; a local path is used as is.
    stt_model: str = "base"
    stt_device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    stt_compute_type: str = "auto"
    stt_max_new_tokens: int | None = None
    stt_partial_interval_s: float = 0.6
    # A `parley stt-worker --socket PATH` to share (one model per host); None: the model in this process.
    stt_worker: str | None = None
    stt_batch_size: int | None = None  # requests per decode; None: the engine's default (16)
    stt_batch_wait_ms: float = 10.0
    # CTranslate2 threads; 0: one per core this process may run on.
    stt_cpu_threads: int = Field(0, ge=0)
    # Reserve the STT engine's peak memory at start (one full batch of 30 s windows decoded once):
    # steady RSS for container memory limits, at the cost of holding it from the first minute.
    stt_warm_peak: bool = False
    # "audio": encode only the speech (plus 0.5 s) instead of Whisper's 30 s window: several times
    # faster on a CPU, for models fine-tuned to read short windows (e.g. FUTO's ACFT Whisper) only.
    stt_encoder_window: str = Field("full", pattern="^(full|audio)$")

    # LLM: any OpenAI-compatible server. With neither a key nor a base URL, Parley runs its
    # offline personas (question bank and heuristic feedback) so the page works out of the box.
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_offline: bool = False
    llm_first_token_timeout_s: float = 15.0
    llm_token_timeout_s: float = 10.0  # a stream silent this long mid-reply has stalled

    tts: str = Field("edge", pattern="^(edge|espeak)$")
    tts_voice: str | None = None

    personas_dir: str | None = None  # a folder laid out like personas/data; None: the packaged personas

    database_url: str | None = None
    # Recordings of answers, only for sessions that opted in; deleted after this many days.
    audio_retention_days: int = Field(30, ge=1)
    audio_dir: str | None = None  # default: "audio" under the user's data directory

    # Names this server instance in the sessions it runs, so that on a shared database a restart
    # marks only its own unfinished sessions interrupted. Default: host name and port.
    instance: str | None = None

    @property
    def instance_id(self) -> str:
        import socket

        return self.instance or f"{socket.gethostname()}:{self.port}"

    @property
    def audio_path(self) -> Path:
        return Path(self.audio_dir) if self.audio_dir else data_dir() / "audio"

    # Access (SECURITY.md). With auth_secret set, /api/offer, /api/rooms and the history API need a
    # signed room token (`parley token` mints one); unset, the server is open, as on a laptop.
    auth_secret: str | None = Field(None, min_length=32)  # HS256 wants at least 256 bits
    # Browser origins other than this server's own that may call the API (comma-separated); none:
    # same origin only. Pages that may frame Parley (CSP frame-ancestors), e.g. a video-call app.
    cors_origins: str = ""
    frame_ancestors: str = "'self'"
    # Per client address, over /api/offer (POST and PATCH) and the token endpoint: a browser joining
    # sends one offer and a few candidate batches, so a burst of 40 never limits people.
    signaling_rate_per_min: float = Field(120.0, gt=0)
    signaling_burst: int = Field(40, ge=1)

    # Rooms
    max_rooms: int = 50
    room_grace_s: float = 30.0  # a room whose peer dropped waits this long for a reconnect
    max_session_s: float = 3600.0
    connect_timeout_s: float = 30.0  # offer answered but ICE never completed
    peer_media_timeout_s: float = Field(15.0, gt=0)  # a connected peer that sends no audio this long is gone
    max_message_bytes: int = 16 * 1024  # data-channel messages
    max_messages_per_s: float = Field(20.0, gt=0)  # per room, bursts of 2 s allowed
    max_utterance_s: float = Field(30.0, ge=5, le=120)  # longer speech is cut into turns (Whisper's window)
    max_body_bytes: int = 64 * 1024  # signaling requests

    vad_threshold: float = 0.5
    vad_endpoint_silence_ms: int = 500
    min_interruption_s: float = 0.35
    # Semantic end of turn (pipeline/endpointing.py): the interim transcript's words choose the
    # silence that ends a turn, short after a finished sentence and long after "and..." or "um".
    semantic_endpointing: bool = True
    endpoint_complete_ms: int = Field(250, ge=100)
    endpoint_incomplete_ms: int = Field(1200, ge=100)
    # How the speech sounds, beside its words (pipeline/turn_model.py): "auto" uses Smart Turn v3
    # from an installed pipecat-ai (pip install --no-deps pipecat-ai), "off", or a path to its ONNX file.
    turn_model: str = "auto"
    # Start the LLM on the interim transcript when the silence begins; heard only if the final agrees.
    preemptive_generation: bool = True

    @model_validator(mode="after")
    def _openai_fallbacks(self) -> "Settings":
        # The openai client's own variables work too, so existing set-ups need no renaming.
        if self.llm_base_url is None:
            self.llm_base_url = os.environ.get("OPENAI_BASE_URL") or None
        if self.llm_api_key is None:
            self.llm_api_key = os.environ.get("OPENAI_API_KEY") or None
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def offline_llm(self) -> bool:
        return self.llm_offline or not (self.llm_api_key or self.llm_base_url)

    # LiveKit. For `parley serve` (the token endpoint), livekit_url is the URL browsers connect to;
    # for `parley livekit` (the worker), the URL the worker reaches the server at. Unset: LiveKit is off
    # (the worker then falls back to LiveKit's own LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET).
    livekit_url: str | None = None
    livekit_api_key: str | None = None
    livekit_api_secret: str | None = None
    livekit_agent_name: str = "parley"  # explicit dispatch: tokens from /api/livekit/token name this agent
    livekit_participant: str | None = None  # talk with this identity (default: whoever dispatched the agent)
    livekit_listen_all: bool = False  # hear every participant (mixed), not only the one it talks with


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
