"""The interviewer: question flow, follow-ups, hints, per-answer feedback and the scorecard.

``InterviewRuntime`` is the conversation's LLM (it implements the pipeline's ``LLM`` protocol): for
each turn it decides what the interviewer does next (next question, a follow-up on this answer, a
hint, the closing) and either instructs the real LLM with that decision or, offline, says it from
the question bank. Scoring runs beside the conversation in tasks this object owns.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import frames as F
from pipeline.tasks import TaskSet
from pipeline.llm import LLM, LLMError, StructuredLLM

from .catalog import PersonaSession
from .delivery import Delivery, analyse, combine
from .evaluation import Corrections, ask_structured, evaluate_answer, key_point_coverage, scorecard, star_parts
from .schema import InterviewerPersona, Question

log = logging.getLogger(__name__)
_ACKS = ["Thank you.", "Okay, thanks.", "Got it, thank you.", "Thanks for that."]
_FOLLOW_UP_MIN_WORDS = 60


@dataclass
class _Answer:
    parts: list[tuple[str, float | None, list[float]]] = field(default_factory=list)  # text, speech_s, pauses
    follow_ups: int = 0
    hints: int = 0

    @property
    def text(self) -> str:
        return " ".join(t for t, _, _ in self.parts)


class InterviewRuntime:
    def __init__(self, session: PersonaSession, llm: LLM | None, structured: StructuredLLM | None,
                 emit: Callable[[dict[str, Any]], None]):
        assert isinstance(session.definition, InterviewerPersona)
        self.session = session
        self.persona: InterviewerPersona = session.definition
        self.questions: list[Question] = session.questions
        self.base, self.structured, self._emit = llm, structured, emit
        self.current = 0  # the question being answered (the greeting asks the first)
        self.answers: list[_Answer] = [_Answer() for _ in self.questions]
        self.feedback: list[dict[str, Any] | None] = [None] * len(self.questions)
        self.deliveries: list[Delivery] = []
        self.finished = False  # the closing line has been produced
        self.result: dict[str, Any] | None = None  # the scorecard, once made
        self._evaluations: dict[int, asyncio.Task] = {}
        self._tasks = TaskSet("interview")
        self._timings: dict[str, tuple[float | None, list[float]]] = {}
        self._acks = itertools.cycle(_ACKS)
        self._scorecard_lock = asyncio.Lock()
        self._told_offline = False

    @property
    def hint_after_s(self) -> float:
        return self.persona.hint_after_s

    # ------------------------------------------------------------------ events from the conversation

    def on_event(self, ev: F.Event) -> None:
        if isinstance(ev, F.Transcript) and ev.final:
            # Timing arrives with the transcript, before the conversation asks for the reply.
            self._timings[ev.text] = (ev.speech_s, list(ev.pauses))
            if not self.finished:
                d = analyse(ev.text, ev.speech_s, ev.pauses)
                self._emit({"type": "delivery", "question_index": self.current, **d.payload()})
                if self.session.options.get("corrections"):
                    self._spawn(self._corrections(ev.text), "corrections")

    def wants_hint(self) -> bool:
        """After a long silence: true when a question is waiting for an answer and had no hint yet."""
        return not self.finished and self.answers[self.current].hints == 0 and not self.answers[self.current].parts

    # ------------------------------------------------------------------ the LLM protocol

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        last = messages[-1] if messages else {"role": "system"}
        kind, instruction, offline = self._decide(last["content"] if last["role"] == "user" else None)
        if self.base is None:
            text = offline
        else:
            text, produced = None, False
            try:
                async for delta in self.base.stream([*messages, {"role": "system", "content": instruction}]):
                    produced = True
                    yield delta
            except LLMError as e:
                if produced:
                    raise  # half a line was spoken: the conversation handles it
                # Unreachable LLM: carry on from the question bank rather than stall the interview.
                text = offline
                if not self._told_offline:
                    self._told_offline = True
                    self._emit({"type": "notice", "text": f"The language model is unavailable ({e}); "
                                                          "continuing from the question bank."})
        if text is not None:
            for word in text.split(" "):
                yield word + " "
        if kind == "closing":
            self._spawn(self.finish(), "scorecard")

    def _decide(self, answer: str | None) -> tuple[str, str, str]:
        """(kind, instruction for the LLM, what to say offline) for the interviewer's next line."""
        p = self.persona.prompts
        if self.finished:
            return "after", "The interview is over. Answer briefly and politely; do not ask new questions.", \
                "The interview is over; your scorecard is on the screen. Thank you!"
        q = self.questions[self.current]
        a = self.answers[self.current]
        if answer is None:  # the agent speaks first after a silence: offer a hint
            a.hints += 1
            return "hint", p.hint.format(question=q.text, hint=q.hint), \
                f"Take your time. Here is a hint: {q.hint}"
        speech_s, pauses = self._timings.pop(answer, (None, []))
        a.parts.append((answer, speech_s, pauses))
        if self._stuck(answer) and a.hints == 0:
            a.hints += 1
            a.parts.pop()  # "I don't know" is not the answer
            return "hint", p.hint.format(question=q.text, hint=q.hint), \
                f"No problem, take your time. Here is a hint: {q.hint}"
        if a.follow_ups < self.persona.max_follow_ups and self._needs_follow_up(q, a):
            a.follow_ups += 1
            return "follow_up", p.follow_up.format(question=q.text, answer=a.text), self._offline_follow_up(q, a)
        self._close_question(self.current)
        self.current += 1
        if self.current < len(self.questions):
            nq = self.questions[self.current]
            return "ask", p.ask.format(n=self.current + 1, total=len(self.questions), question=nq.text), \
                f"{next(self._acks)} Question {self.current + 1} of {len(self.questions)}. {nq.text}"
        self.current = len(self.questions) - 1
        self.finished = True
        return "closing", p.closing, ("Thank you, that was the last question and the interview is over. "
                                      "Your scorecard is on the screen." +
                                      ("" if self.base else " For richer feedback, connect a language model."))

    def _stuck(self, answer: str) -> bool:
        text = " ".join(answer.lower().replace("’", "'").split())
        return len(text.split()) <= 12 and any(phrase in text for phrase in self.persona.stuck_phrases)

    def _needs_follow_up(self, q: Question, a: _Answer) -> bool:
        """Probe answers that are short or miss most of what a strong answer covers."""
        if len(a.text.split()) < _FOLLOW_UP_MIN_WORDS:
            return True
        covered = key_point_coverage(q, a.text)
        return sum(covered) * 2 < len(covered)

    def _offline_follow_up(self, q: Question, a: _Answer) -> str:
        if q.kind == "behavioural":
            star = star_parts(a.text)
            if not star.result:
                return "And what was the result, in concrete terms?"
            if not star.action:
                return "What exactly did you do yourself?"
        missing = [p for p, c in zip(q.key_points, key_point_coverage(q, a.text)) if not c]
        if missing:
            return f"Could you say a bit more about {missing[0].lower()}?"
        return "Can you give me a concrete example of that from your own work?"

    # ------------------------------------------------------------------ judging

    def _close_question(self, index: int) -> None:
        a = self.answers[index]
        if not a.parts or index in self._evaluations:
            return
        delivery = combine(a.parts)
        self.deliveries.append(delivery)
        self._evaluations[index] = self._spawn(self._evaluate(index, a.text, delivery), f"evaluate {index}")

    async def _evaluate(self, index: int, answer: str, delivery: Delivery) -> None:
        q = self.questions[index]
        prompt = self.persona.prompts.evaluate.format(
            role=self.session.role.label if self.session.role else "", question=q.text, kind=q.kind,
            key_points="; ".join(q.key_points), answer=answer)
        fb = await evaluate_answer(self.structured, prompt, q, answer, delivery)
        fb.update(question_index=index, question=q.text, answer=answer)
        self.feedback[index] = fb
        self._emit({"type": "feedback", **fb})

    async def _corrections(self, text: str) -> None:
        if self.structured is None:
            return
        try:
            parsed, _ = await ask_structured(self.structured, self.persona.prompts.corrections.format(answer=text),
                                             Corrections, "corrections")
        except LLMError as e:
            log.warning("corrections unavailable: %s", e)
            return
        for c in parsed.corrections if parsed else []:
            self._emit({"type": "correction", **c.model_dump()})

    async def finish(self) -> dict[str, Any]:
        """The scorecard over every answered question (also when the person ends early)."""
        async with self._scorecard_lock:
            if self.result is not None:
                return self.result
            self._close_question(self.current)
            if self._evaluations:
                await asyncio.gather(*self._evaluations.values(), return_exceptions=True)
            results = [fb for fb in self.feedback if fb is not None]
            role = self.session.role.label if self.session.role else ""
            self.result = await scorecard(self.structured, self.persona.prompts.scorecard, role, results,
                                          self.deliveries)
            self.finished = True
            self._emit({"type": "scorecard", **self.result})
            self._emit({"type": "session-ended", "reason": "interview complete"})
            return self.result

    # ------------------------------------------------------------------ tasks

    def _spawn(self, coro, what: str) -> asyncio.Task:
        return self._tasks.spawn(coro, what)

    async def aclose(self) -> None:
        await self._tasks.aclose()
