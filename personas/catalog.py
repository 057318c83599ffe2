"""Persona definitions loaded from YAML, and what a persona decides for one conversation."""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml

from pipeline.turns import ConversationConfig


class PersonaError(ValueError):
    """Unknown persona or option: a client error, shown to the user as is."""


@lru_cache(maxsize=None)
def _load(name: str) -> dict[str, Any]:
    text = importlib.resources.files("personas").joinpath(f"data/{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def interviewer() -> dict[str, Any]:
    return _load("interviewer")


def teacher() -> dict[str, Any]:
    return _load("teacher")


def _choices(items: list[dict]) -> list[dict[str, str]]:
    return [{"id": i["id"], "label": i["label"]} for i in items]


def list_personas() -> list[dict[str, Any]]:
    """The personas and their options, as the web page renders them."""
    iv, t = interviewer(), teacher()
    return [
        {"id": iv["id"], "name": iv["name"], "description": iv["description"], "options": [
            {"name": "role", "label": "Role", "default": iv["roles"][0]["id"], "choices": _choices(iv["roles"])},
            {"name": "interview_type", "label": "Interview type", "default": "mixed",
             "choices": _choices(iv["interview_types"])},
        ]},
        {"id": t["id"], "name": t["name"], "description": t["description"], "options": [
            {"name": "language", "label": "Language", "default": "fr", "choices": _choices(t["languages"])},
            {"name": "level", "label": "Level", "default": "B1", "choices": _choices(t["levels"])},
        ]},
    ]


@dataclass(frozen=True)
class PersonaSession:
    """A persona with its options resolved: the pipeline's config plus what the offline mode needs."""

    persona: str
    options: dict[str, str]
    config: ConversationConfig
    questions: list[str] = field(default_factory=list)


def _pick(items: list[dict], value: str | None, default: str, what: str) -> dict:
    value = value or default
    for item in items:
        if item["id"] == value:
            return item
    raise PersonaError(f"unknown {what} {value!r}; expected one of: {', '.join(i['id'] for i in items)}")


def build(persona: str | None, options: dict[str, Any] | None = None) -> PersonaSession:
    options = {k: str(v) for k, v in (options or {}).items() if v is not None}
    persona = persona or "interviewer"
    if persona == "interviewer":
        iv = interviewer()
        role = _pick(iv["roles"], options.get("role"), iv["roles"][0]["id"], "role")
        kind = _pick(iv["interview_types"], options.get("interview_type"), "mixed", "interview type")["id"]
        technical = role["questions"] if kind != "behavioural" else []
        behavioural = iv["behavioural_questions"] if kind != "technical" or not technical else []
        questions = [behavioural[0]] if behavioural else []
        rest_b, rest_t = behavioural[1:], list(technical)
        while rest_b or rest_t:  # alternate so a mixed interview really is mixed
            for pool in (rest_t, rest_b):
                if pool:
                    questions.append(pool.pop(0))
        system = (
            f"You are an experienced interviewer running a {kind} job interview for a {role['label']} position. "
            "This is a spoken conversation: reply in one to three short sentences, no lists, no markdown. "
            "Ask one question at a time. After each answer, briefly acknowledge it, ask a follow-up that probes "
            "the candidate's last answer when it was vague, otherwise move on to the next question. "
            "If the candidate is stuck, give a short hint. Questions you may use: " + " | ".join(questions)
        )
        greeting = f"Hello, thanks for coming in. Let's start. {questions[0]}" if questions else "Hello, let's begin."
        return PersonaSession("interviewer", {"role": role["id"], "interview_type": kind},
                              ConversationConfig(system_prompt=system, language="en", stt_prompt=role.get("vocabulary"),
                                                 greeting=greeting), questions)
    if persona == "teacher":
        t = teacher()
        lang = _pick(t["languages"], options.get("language"), "fr", "language")
        level = _pick(t["levels"], options.get("level"), "B1", "level")
        system = (
            f"You are a friendly {lang['label']} teacher having a spoken conversation with a learner at level "
            f"{level['id']}. Always answer in {lang['label']}. {level['style']} Reply in one to three short "
            "sentences, no lists, no markdown. Keep the conversation going on a topic the learner picks. "
            "When the learner makes a mistake, repeat their sentence correctly in your reply (a recast) "
            "without lecturing."
        )
        return PersonaSession("teacher", {"language": lang["id"], "level": level["id"]},
                              ConversationConfig(system_prompt=system, language=lang["id"], greeting=lang["greeting"]),
                              list(lang["questions"]))
    raise PersonaError(f"unknown persona {persona!r}; expected 'interviewer' or 'teacher'")
