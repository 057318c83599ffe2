"""The offline mode: with no LLM configured, the persona runs from its question bank.

It implements the pipeline's LLM protocol, so the rest of Parley cannot tell the difference: a new
user can open the page and practise before setting up any model.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from .catalog import PersonaSession

_FILLERS = {"um", "uh", "erm", "like", "basically", "actually"}


def _feedback(answer: str) -> str:
    words = answer.lower().split()
    if len(words) < 8:
        return "Thanks. Try to give a fuller answer next time, with a concrete example."
    fillers = sum(w.strip(",.") in _FILLERS for w in words)
    if fillers >= 3:
        return "Thanks. Watch the filler words; a short pause sounds more confident."
    if len(words) > 180:
        return "Thanks, that was thorough. Aim for about two minutes per answer."
    return "Thanks, that was a clear answer."


class OfflinePersonaLLM:
    def __init__(self, session: PersonaSession):
        self.session = session

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        answers = [m["content"] for m in messages if m["role"] == "user"]
        questions = self.session.questions
        asked = len(answers)  # the greeting asked the first question
        if self.session.persona == "interviewer":
            if asked < len(questions):
                reply = f"{_feedback(answers[-1])} Next question. {questions[asked]}"
            else:
                reply = f"{_feedback(answers[-1])} That's the end of our interview. Thank you, and good luck."
        else:
            reply = questions[asked % len(questions)] if questions else "..."
        for word in reply.split(" "):
            yield word + " "
