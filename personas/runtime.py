"""What a room needs from its persona, whatever its kind."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pipeline import frames as F
from pipeline.llm import LLM, StructuredLLM

from .catalog import PersonaSession
from .interview import InterviewRuntime
from .teacher import TeacherRuntime


class PersonaRuntime(Protocol):
    finished: bool
    hint_after_s: float

    def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        """The conversation's LLM: the persona decides, the real LLM (or the offline bank) speaks."""

    def on_event(self, ev: F.Event) -> None:
        """Every pipeline event of the room (final transcripts carry speech timing)."""

    def wants_hint(self) -> bool:
        """After a long silence, should the agent speak first?"""

    async def finish(self) -> dict[str, Any]:
        """End the session: the scorecard or summary (also pushed to the client)."""

    async def aclose(self) -> None:
        """Cancel and await every task the persona started."""


def make_runtime(session: PersonaSession, llm: LLM | None, structured: StructuredLLM | None,
                 emit: Callable[[dict[str, Any]], None]) -> PersonaRuntime:
    """``llm``/``structured`` None: the offline persona (question bank and rule-based feedback)."""
    cls = InterviewRuntime if session.kind == "interviewer" else TeacherRuntime
    return cls(session, llm, structured, emit)
