"""What a conversation is made of, whatever carries its audio.

Both transports build on these: ``agent/room.py`` (the browser, over aiortc) and
``agent/livekit_worker.py`` (a LiveKit room). A persona session becomes a ``Conversation`` with the
server's VAD and turn settings; a store, when there is one, gets a recorder and feeds the persona
the person's past weaknesses; a long silence after a question gets a hint.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from personas.catalog import PersonaSession
from personas.runtime import PersonaRuntime
from pipeline import frames as F
from pipeline.conversation import Conversation
from pipeline.llm import LLM
from pipeline.turns import EndpointingOptions, TurnOptions
from pipeline.vad import VADOptions

from .config import Settings
from .engines import Engines
from .recorder import Recorder
from .store import Store
from .store.db import new_token


def build_conversation(persona: PersonaSession, settings: Settings, engines: Engines, llm: LLM,
                       emit: Callable[[F.Event], None], name: str) -> Conversation:
    """The pipeline for one room; ``llm`` is the persona runtime, which calls the real LLM."""
    return Conversation(
        stt=engines.stt, llm=llm, tts=engines.tts, config=persona.config,
        vad_options=VADOptions(threshold=settings.vad_threshold,
                               endpoint_silence_ms=persona.config.endpoint_silence_ms
                               or settings.vad_endpoint_silence_ms,
                               max_segment_s=settings.max_utterance_s),
        turn_options=TurnOptions(min_interruption_s=settings.min_interruption_s,
                                 partial_interval_s=settings.stt_partial_interval_s,
                                 endpointing=EndpointingOptions(enabled=settings.semantic_endpointing,
                                                                complete_silence_ms=settings.endpoint_complete_ms,
                                                                incomplete_silence_ms=settings.endpoint_incomplete_ms),
                                 preemptive_generation=settings.preemptive_generation),
        emit=emit, name=name, turn_model=engines.turn_model,
    )


async def open_recorder(store: Store, settings: Settings, room_id: str, session: PersonaSession,
                        user_token: str | None) -> tuple[PersonaSession, Recorder]:
    """A recorder for this conversation; without a token it is saved under a fresh anonymous user.
    The session comes back with the user's history folded into the persona's prompt."""
    user_id = await store.user(user_token or new_token())
    session = await with_history(store, session, user_id)
    return session, Recorder(store, user_id, room_id, session, audio_dir=settings.audio_path,
                             owner=settings.instance_id)


async def with_history(store: Store, session: PersonaSession, user_id: int) -> PersonaSession:
    """Feedback builds on history: past weaknesses for this role go into the interviewer's prompt."""
    if session.kind != "interviewer" or session.role is None:
        return session
    weak = await store.weaknesses(user_id, session.role.id)
    if not weak:
        return session
    note = (" In this candidate's previous interviews for this role the feedback said: " + " | ".join(weak) +
            " Notice whether they have improved on these, and probe them with your follow-ups.")
    return dataclasses.replace(session, config=dataclasses.replace(
        session.config, system_prompt=session.config.system_prompt + note))


class SilenceHint:
    """A question followed by a long silence gets a hint, if the persona wants one.

    Feed it every pipeline event; ``present()`` says whether anyone is there to hear the hint.
    """

    def __init__(self, runtime: PersonaRuntime, conversation: Conversation, present: Callable[[], bool]):
        self.runtime, self.conversation, self.present = runtime, conversation, present
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def on_event(self, ev: F.Event) -> None:
        if isinstance(ev, (F.UserStartedSpeaking, F.BotStartedSpeaking, F.Transcript)) and self._timer:
            self._timer.cancel()
            self._timer = None
        elif isinstance(ev, F.BotStoppedSpeaking) and not ev.interrupted and not self._closed:
            if self._timer:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self.runtime.hint_after_s, self._on_silence)

    def _on_silence(self) -> None:
        self._timer = None
        if self.present() and self.runtime.wants_hint():
            self.conversation.respond()

    def cancel(self) -> None:
        self._closed = True
        if self._timer:
            self._timer.cancel()
            self._timer = None
