"""Persona data loaded and validated at start-up, and what a persona decides for one conversation.

Layout of ``personas/data`` (or ``PARLEY_PERSONAS_DIR``):
- ``*.yaml``: personas, each with ``kind: interviewer`` or ``kind: teacher`` (adding one needs no code);
- ``questions/<role>.yaml``: one question bank per interview role;
- ``languages.yaml``: the language teacher's languages.
"""
from __future__ import annotations

import importlib.resources
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.turns import ConversationConfig

from .schema import InterviewerPersona, Language, LanguageList, Persona, Question, RoleBank, TeacherPersona


class PersonaError(ValueError):
    """Unknown persona or option: a client error, shown to the user as is."""


class PersonaFileError(ValueError):
    """A persona data file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Catalog:
    personas: dict[str, InterviewerPersona | TeacherPersona]
    roles: dict[str, RoleBank]
    languages: dict[str, Language]

    def roles_of(self, persona: InterviewerPersona) -> list[RoleBank]:
        if persona.roles == "all":
            return list(self.roles.values())
        return [self.roles[r] for r in persona.roles]


def _read(path: Path, model: Any) -> Any:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PersonaFileError(f"{path.name}: not valid YAML: {e}") from None
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        def where(loc: tuple) -> str:
            if model is Persona and loc and loc[0] in ("interviewer", "teacher"):
                loc = loc[1:]  # the union's tag: the file already says which kind it is
            return ".".join(str(p) for p in loc) or "(top level)"

        problems = "; ".join(f"{where(err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise PersonaFileError(f"{path.name}: {problems}") from None


def default_dir() -> Path:
    return Path(str(importlib.resources.files("personas").joinpath("data")))


def load_catalog(root: Path | None = None) -> Catalog:
    """Read and validate every data file; raises PersonaFileError naming the file and field."""
    root = root or default_dir()
    roles: dict[str, RoleBank] = {}
    for path in sorted((root / "questions").glob("*.yaml")):
        bank = _read(path, RoleBank)
        if bank.id != path.stem:
            raise PersonaFileError(f"{path.name}: id: {bank.id!r} must match the file name {path.stem!r}")
        roles[bank.id] = bank
    languages: dict[str, Language] = {}
    lang_file = root / "languages.yaml"
    if lang_file.exists():
        languages = {lang.id: lang for lang in _read(lang_file, LanguageList).languages}
    personas: dict[str, InterviewerPersona | TeacherPersona] = {}
    for path in sorted(root.glob("*.yaml")):
        if path == lang_file:
            continue
        p = _read(path, Persona)
        if p.id in personas:
            raise PersonaFileError(f"{path.name}: id: {p.id!r} is already used by another persona")
        if isinstance(p, InterviewerPersona):
            names = roles.keys() if p.roles == "all" else p.roles
            for r in [*([] if p.roles == "all" else p.roles), p.default_role]:
                if r not in roles:
                    raise PersonaFileError(f"{path.name}: roles: no question bank questions/{r}.yaml")
            if not names:
                raise PersonaFileError(f"{path.name}: roles: no question banks found")
        else:
            for name, code in (("default_language", p.default_language),
                               ("default_native_language", p.default_native_language)):
                if code not in languages:
                    raise PersonaFileError(f"{path.name}: {name}: {code!r} is not in languages.yaml")
        personas[p.id] = p
    if not personas:
        raise PersonaFileError(f"{root}: no persona files")
    return Catalog(personas, roles, languages)


_data_dir: Path | None = None


def use_data_dir(root: str | Path | None) -> None:
    """Serve personas from ``root`` (None: the packaged ones) from now on."""
    global _data_dir
    _data_dir = Path(root) if root else None
    get_catalog.cache_clear()


@lru_cache(maxsize=1)
def get_catalog() -> Catalog:
    return load_catalog(_data_dir)


def _choices(items) -> list[dict[str, str]]:
    return [{"id": i.id, "label": i.label} for i in items]


RECORD_AUDIO = {"name": "record_audio", "label": "Save recordings of my answers", "type": "boolean", "default": False,
                "help": "Off by default. Kept on this server for a limited time, then deleted."}


def list_personas(catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """The personas and their options, as the web page renders them."""
    catalog = catalog or get_catalog()
    out = []
    for p in catalog.personas.values():
        if isinstance(p, InterviewerPersona):
            options = [
                {"name": "role", "label": "Role", "type": "choice", "default": p.default_role,
                 "choices": _choices(catalog.roles_of(p))},
                {"name": "interview_type", "label": "Interview type", "type": "choice",
                 "default": p.interview_types[0].id, "choices": _choices(p.interview_types)},
                {"name": "difficulty", "label": "Difficulty", "type": "choice",
                 "default": p.difficulties[len(p.difficulties) // 2].id, "choices": _choices(p.difficulties)},
                {"name": "questions", "label": "Questions", "type": "number", "default": p.default_questions,
                 "min": 1, "max": p.max_questions},
                {"name": "corrections", "label": "Grammar and wording corrections", "type": "boolean",
                 "default": False, "help": "For non-native speakers: corrections appear next to your answers."},
                RECORD_AUDIO,
            ]
        else:
            langs = [{"id": lang.id, "label": f"{lang.label} ({lang.native_label})"} for lang in catalog.languages.values()]
            options = [
                {"name": "language", "label": "Language", "type": "choice", "default": p.default_language, "choices": langs},
                {"name": "level", "label": "Level", "type": "choice", "default": p.default_level,
                 "choices": _choices(p.levels)},
                {"name": "native_language", "label": "Explain words in", "type": "choice",
                 "default": p.default_native_language, "choices": langs},
                {"name": "topic", "label": "Topic (optional)", "type": "text", "default": ""},
                RECORD_AUDIO,
            ]
        out.append({"id": p.id, "name": p.name, "description": p.description, "kind": p.kind, "options": options})
    return out


@dataclass(frozen=True)
class PersonaSession:
    """A persona with its options resolved: the pipeline's config plus what the persona runtime needs."""

    persona: str
    kind: str
    options: dict[str, Any]
    config: ConversationConfig
    definition: InterviewerPersona | TeacherPersona
    questions: list[Question] = field(default_factory=list)  # interviewer: the plan, in order
    role: RoleBank | None = None
    language: Language | None = None
    native: Language | None = None


def _pick(items, value: Any, default: str, what: str):
    value = str(value) if value not in (None, "") else default
    for item in items:
        if item.id == value:
            return item
    raise PersonaError(f"unknown {what} {value!r}; expected one of: {', '.join(i.id for i in items)}")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def plan_questions(role: RoleBank, behavioural: RoleBank | None, kind: str, difficulty: str, total: int,
                   rng: random.Random) -> list[Question]:
    """``total`` questions for this interview: the chosen kind and difficulty first, alternating
    technical and behavioural in a mixed interview, never the same question twice."""
    pool = list(role.questions) + ([q for q in behavioural.questions if q not in role.questions]
                                   if behavioural is not None and behavioural is not role else [])
    order = {"easy": 0, "medium": 1, "hard": 2}

    def ranked(kinds: tuple[str, ...]) -> list[Question]:
        qs = [q for q in pool if q.kind in kinds]
        rng.shuffle(qs)
        # Nearest difficulty first; the shuffle keeps sessions varied within a difficulty.
        return sorted(qs, key=lambda q: abs(order[q.difficulty] - order.get(difficulty, 1)))

    if kind == "mixed":
        streams = [ranked(("technical",)), ranked(("behavioural",))]
        if behavioural is role or not streams[0]:
            streams = [ranked(("technical", "behavioural"))]
        plan: list[Question] = []
        i = 0
        while len(plan) < total and any(streams):
            s = streams[i % len(streams)]
            if s:
                plan.append(s.pop(0))
            i += 1
        return plan
    wanted = ranked((kind,))
    if len(wanted) < total:  # a small bank: top up with the other kind rather than stop short
        wanted += [q for q in ranked(("technical", "behavioural")) if q not in wanted]
    return wanted[:total]


def build(persona: str | None, options: dict[str, Any] | None = None, catalog: Catalog | None = None,
          seed: int | None = None) -> PersonaSession:
    catalog = catalog or get_catalog()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    persona = persona or next(iter(catalog.personas))
    # Request data is any JSON: a list or object here must be a 400, not an unhashable-key crash.
    p = catalog.personas.get(persona) if isinstance(persona, str) else None
    if p is None:
        raise PersonaError(f"unknown persona {persona!r}; expected one of: {', '.join(catalog.personas)}")
    rng = random.Random(seed)
    if isinstance(p, InterviewerPersona):
        role = _pick(catalog.roles_of(p), options.get("role"), p.default_role, "role")
        kind = _pick(p.interview_types, options.get("interview_type"), p.interview_types[0].id, "interview type").id
        difficulty = _pick(p.difficulties, options.get("difficulty"),
                           p.difficulties[len(p.difficulties) // 2].id, "difficulty").id
        try:
            total = int(options.get("questions", p.default_questions))
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
            raise PersonaError("questions must be a whole number") from None
        if not 1 <= total <= p.max_questions:
            raise PersonaError(f"questions must be between 1 and {p.max_questions}")
        questions = plan_questions(role, catalog.roles.get("behavioural"), kind, difficulty, total, rng)
        if not questions:
            raise PersonaError(f"the {role.label} question bank has no {kind} questions")
        corrections = _flag(options.get("corrections", False))
        system = p.prompts.system.format(role=role.label, interview_type=kind, difficulty=difficulty,
                                         total=len(questions))
        prompt = ", ".join(x for x in (p.stt_prompt, role.vocabulary) if x)
        return PersonaSession(
            p.id, p.kind,
            {"role": role.id, "interview_type": kind, "difficulty": difficulty, "questions": len(questions),
             "corrections": corrections, "record_audio": _flag(options.get("record_audio", False))},
            ConversationConfig(system_prompt=system, language="en", stt_prompt=prompt or None,
                               greeting=p.greeting.format(question=questions[0].text),
                               endpoint_silence_ms=p.endpoint_silence_ms),
            p, questions, role=role)
    assert isinstance(p, TeacherPersona)
    langs = list(catalog.languages.values())
    lang = _pick(langs, options.get("language"), p.default_language, "language")
    native = _pick(langs, options.get("native_language"), p.default_native_language, "native language")
    level = _pick(p.levels, options.get("level"), p.default_level, "level")
    topic = str(options.get("topic") or "").strip()[:120]
    system = p.prompts.system.format(language=lang.label, level=level.id, style=level.style, native=native.label,
                                     topic=f" (they chose: {topic})" if topic else "")
    return PersonaSession(
        p.id, p.kind, {"language": lang.id, "level": level.id, "native_language": native.id, "topic": topic,
                       "record_audio": _flag(options.get("record_audio", False))},
        ConversationConfig(system_prompt=system, language=lang.id, greeting=lang.greeting,
                           endpoint_silence_ms=p.endpoint_silence_ms),
        p, language=lang, native=native)
