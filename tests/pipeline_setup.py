"""Real engines wired for pipeline tests: tiny Whisper, the local OpenAI-compatible server, espeak-ng."""
from __future__ import annotations

from pipeline.conversation import Conversation
from pipeline.llm import LLMOptions, OpenAILLM
from pipeline.stt import WhisperOptions, shared_whisper
from pipeline.tts import EspeakTTS
from pipeline.turns import ConversationConfig, TurnOptions


def whisper(path) -> object:
    return shared_whisper(WhisperOptions(model=str(path), device="cpu", max_new_tokens=12))


def llm(url: str, **kw) -> OpenAILLM:
    opts = dict(base_url=url, api_key="test", model="test-model", first_token_timeout_s=3.0,
                token_timeout_s=3.0, retries=1, backoff_s=0.05)
    opts.update(kw)
    return OpenAILLM(LLMOptions(**opts))


def conversation(stt, llm_, log, tts=None, **turn_kw) -> Conversation:
    return Conversation(stt=stt, llm=llm_, tts=tts or EspeakTTS(), emit=log,
                        config=ConversationConfig(system_prompt="You are a test interviewer."),
                        turn_options=TurnOptions(**turn_kw), name="test")
