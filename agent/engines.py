"""The engines one process shares across all rooms: one Whisper, one LLM client, one TTS."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.llm import LLMOptions, OpenAILLM
from pipeline.stt import STT, WhisperOptions, shared_whisper
from pipeline.tts import TTS, aclose_tts, make_tts
from pipeline.turn_model import TurnModel
from pipeline.turn_model import load as load_turn_model

from .config import Settings, cache_dir

log = logging.getLogger(__name__)


@dataclass
class Engines:
    stt: STT  # WhisperSTT, or RemoteSTT with settings.stt_worker
    tts: TTS
    llm: OpenAILLM | None  # None: offline personas
    stt_status: str = "not loaded"
    turn_model: TurnModel | None = None  # None: the end of turn reads the words only

    async def warm_up(self) -> None:
        """Load Whisper before the first person speaks; a failure is reported, not fatal:
        typed input keeps working and the error reaches the page."""
        self.stt_status = "loading"
        try:
            await self.stt.warm_up()
            self.stt_status = "ready"
        except Exception as e:
            self.stt_status = f"error: {e}"
            log.error("speech recognition unavailable: %s", e)

    async def aclose(self) -> None:
        if hasattr(self.stt, "aclose"):  # RemoteSTT: its connection; the in-process engine is shared
            await self.stt.aclose()
        if self.llm is not None:
            await self.llm.aclose()
        await aclose_tts(self.tts)


def whisper_options(settings: Settings) -> WhisperOptions:
    return WhisperOptions(
        model=settings.stt_model, device=settings.stt_device, compute_type=settings.stt_compute_type,
        max_new_tokens=settings.stt_max_new_tokens, download_root=str(cache_dir() / "models"),
        batch_size=settings.stt_batch_size, batch_wait_ms=settings.stt_batch_wait_ms,
        cpu_threads=settings.stt_cpu_threads,
        warm_peak=settings.stt_warm_peak, encoder_window=settings.stt_encoder_window,
    )


def build_engines(settings: Settings) -> Engines:
    if settings.stt_worker:
        from pipeline.stt_remote import RemoteSTT

        stt = RemoteSTT(settings.stt_worker)
    else:
        stt = shared_whisper(whisper_options(settings))
    llm = None
    if not settings.offline_llm:
        llm = OpenAILLM(LLMOptions(base_url=settings.llm_base_url, api_key=settings.llm_api_key,
                                   model=settings.llm_model,
                                   first_token_timeout_s=settings.llm_first_token_timeout_s,
                                   token_timeout_s=settings.llm_token_timeout_s))
    return Engines(stt=stt, tts=make_tts(settings.tts), llm=llm, turn_model=turn_model(settings))


def turn_model(settings: Settings) -> TurnModel | None:
    """A model file named in the settings must load; one merely found installed ("auto") may fail
    with a warning, and the words alone decide the end of turn."""
    if not settings.semantic_endpointing:
        return None
    try:
        return load_turn_model(settings.turn_model)
    except (RuntimeError, OSError) as e:
        if settings.turn_model != "auto":
            raise
        log.warning("turn model unavailable (the words alone decide the end of turn): %s", e)
        return None
