"""The language teacher: free conversation in the target language, corrections and new words shown
on screen (not lectured out loud), and an end-of-session summary."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline import frames as F
from pipeline.tasks import TaskSet
from pipeline.llm import LLM, LLMError, StructuredLLM

from .catalog import PersonaSession
from .evaluation import Corrections, Suggestions, ask_structured
from .schema import TeacherPersona

log = logging.getLogger(__name__)

# Offline suggestions by level band, in English (the summary is also shown, not spoken).
_OFFLINE_SUGGESTIONS = {
    "A": ["Describe your day in five short sentences, out loud.", "Learn ten words about food and use each once.",
          "Practise asking simple questions: who, what, where, when."],
    "B": ["Tell a short story about last weekend using the past tense.",
          "Give your opinion on a news topic and one reason for it.",
          "Retell a short video you watched in your own words."],
    "C": ["Argue both sides of a debate topic for two minutes each.", "Practise idioms by using three in a conversation.",
          "Summarise a podcast episode and react to it."],
}
OFFLINE_NOTE = "Corrections and new vocabulary need a language model; connect one for feedback on your sentences."


class TeacherRuntime:
    def __init__(self, session: PersonaSession, llm: LLM | None, structured: StructuredLLM | None,
                 emit: Callable[[dict[str, Any]], None]):
        assert isinstance(session.definition, TeacherPersona) and session.language and session.native
        self.session = session
        self.persona: TeacherPersona = session.definition
        self.base, self.structured, self._emit = llm, structured, emit
        self.corrections: list[dict[str, str]] = []
        self.vocabulary: list[dict[str, str]] = []
        self.turns = 0
        self.finished = False
        self.result: dict[str, Any] | None = None
        self._topics = itertools.cycle(session.language.topics)
        self._tasks = TaskSet("teacher")
        self._noted_offline = False

    hint_after_s = 30.0

    def wants_hint(self) -> bool:
        return False  # a learner's silence is thinking time, not a cue to interrupt

    def on_event(self, ev: F.Event) -> None:
        if isinstance(ev, F.Transcript) and ev.final and not self.finished:
            self.turns += 1
            if self.structured is not None:
                self._spawn(self._correct(ev.text), "corrections")
            elif not self._noted_offline:
                self._noted_offline = True
                self._emit({"type": "notice", "text": OFFLINE_NOTE})

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        if self.base is not None:
            async for delta in self.base.stream(messages):
                yield delta
            return
        # Offline: keep the learner talking with the language's conversation starters.
        for word in next(self._topics).split(" "):
            yield word + " "

    async def _correct(self, utterance: str) -> None:
        s = self.session
        prompt = self.persona.prompts.corrections.format(
            language=s.language.label, level=s.options["level"], native=s.native.label, utterance=utterance)
        try:
            parsed, _ = await ask_structured(self.structured, prompt, Corrections, "corrections")
        except LLMError as e:
            log.warning("corrections unavailable: %s", e)
            return
        if parsed is None:
            return
        for c in parsed.corrections:
            if c.original.strip().lower() != c.corrected.strip().lower():
                item = c.model_dump()
                self.corrections.append(item)
                self._emit({"type": "correction", **item})
        for v in parsed.vocabulary:
            item = v.model_dump()
            if item not in self.vocabulary:
                self.vocabulary.append(item)
                self._emit({"type": "vocabulary", **item})

    async def finish(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result
        self.finished = True
        pending = self._tasks.others()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        s = self.session
        level = s.options["level"]
        suggestions = _OFFLINE_SUGGESTIONS.get(level[0], _OFFLINE_SUGGESTIONS["B"])
        source = "heuristic"
        if self.structured is not None:
            prompt = self.persona.prompts.summary.format(
                language=s.language.label, level=level, native=s.native.label,
                corrections=self.corrections or "none", vocabulary=self.vocabulary or "none")
            try:
                parsed, _ = await ask_structured(self.structured, prompt, Suggestions, "suggestions")
                if parsed is not None and parsed.suggestions:
                    suggestions, source = parsed.suggestions, "llm"
            except LLMError as e:
                log.warning("summary suggestions unavailable: %s", e)
        self.result = {"language": s.language.id, "level": level, "turns": self.turns,
                       "corrections": self.corrections, "vocabulary": self.vocabulary,
                       "suggestions": suggestions, "source": source}
        self._emit({"type": "summary", **self.result})
        self._emit({"type": "session-ended", "reason": "session complete"})
        return self.result

    def _spawn(self, coro, what: str) -> asyncio.Task:
        return self._tasks.spawn(coro, what)

    async def aclose(self) -> None:
        await self._tasks.aclose()
