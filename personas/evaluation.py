"""Judging answers: structured LLM feedback (validated, retried, degraded to text) and the
rule-based fallback that needs no LLM."""
from __future__ import annotations

import json
import logging
import re
from statistics import mean
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from pipeline.llm import LLMError, StructuredLLM

from .delivery import Delivery, count_fillers
from .schema import Question

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class Star(BaseModel):
    situation: bool
    task: bool
    action: bool
    result: bool


class AnswerFeedback(BaseModel):
    score: int = Field(ge=1, le=10)
    good: list[str] = Field(max_length=6)
    missing: list[str] = Field(max_length=6)
    better_answer: str
    star: Star | None = None


class Correction(BaseModel):
    original: str
    corrected: str
    explanation: str


class Vocabulary(BaseModel):
    word: str
    meaning: str


class Corrections(BaseModel):
    corrections: list[Correction] = Field(max_length=5)
    vocabulary: list[Vocabulary] = Field(default_factory=list, max_length=5)


class ScorecardText(BaseModel):
    strengths: list[str] = Field(max_length=6)
    improvements: list[str] = Field(max_length=6)


class Suggestions(BaseModel):
    suggestions: list[str] = Field(max_length=6)


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    # Strict JSON-schema mode wants every property required and no extras.
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


_STR_LIST = {"type": "array", "items": {"type": "string"}}
_STAR = _obj({k: {"type": "boolean"} for k in ("situation", "task", "action", "result")})
SCHEMAS = {
    "answer_feedback": _obj({"score": {"type": "integer", "minimum": 1, "maximum": 10}, "good": _STR_LIST,
                             "missing": _STR_LIST, "better_answer": {"type": "string"},
                             "star": {"anyOf": [_STAR, {"type": "null"}]}}),
    "corrections": _obj({
        "corrections": {"type": "array", "items": _obj({k: {"type": "string"} for k in ("original", "corrected", "explanation")})},
        "vocabulary": {"type": "array", "items": _obj({k: {"type": "string"} for k in ("word", "meaning")})}}),
    "scorecard": _obj({"strengths": _STR_LIST, "improvements": _STR_LIST}),
    "suggestions": _obj({"suggestions": _STR_LIST}),
}


async def ask_structured(llm: StructuredLLM, prompt: str, model: type[M], name: str,
                         attempts: int = 2) -> tuple[M | None, str]:
    """A validated object, or None and the last raw text. Invalid output is retried once with the
    validation error shown to the model; LLM failures raise LLMError."""
    messages: list[dict] = [{"role": "system", "content": "You are a precise assistant. Answer only with JSON."},
                            {"role": "user", "content": prompt}]
    raw = ""
    for _ in range(attempts):
        raw = await llm.complete_json(messages, SCHEMAS[name], name)
        try:
            return model.model_validate_json(_strip_fences(raw)), raw
        except ValidationError as e:
            # Where and what, never the input: it is the model's words about what the person said.
            problems = [f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['type']}" for err in e.errors()[:3]]
            log.warning("invalid %s from the LLM: %s", name, "; ".join(problems))
            messages += [{"role": "assistant", "content": raw},
                         {"role": "user", "content": f"That did not match the schema ({e.errors()[0]['msg']}). "
                                                     "Answer again with JSON only."}]
    return None, raw


def _strip_fences(raw: str) -> str:
    # Some local models wrap JSON in a markdown fence even in JSON mode.
    m = re.search(r"```(?:json)?\s*(.*?)```", raw, re.S)
    return m.group(1) if m else raw


# ---------------------------------------------------------------------------- rule-based judging

_STOP = {"the", "and", "for", "with", "that", "this", "what", "your", "from", "into", "about", "when", "they", "their",
         "have", "then", "than", "more", "less", "other", "some", "each", "over", "under", "vs", "how", "why"}
_STAR_CUES = {
    "situation": r"\b(when i was|at my (last|previous)|we were|there was|situation|back in|a few years ago|in my (last|previous))\b",
    "task": r"\b(my (role|job|task|goal|responsibility)|i was (responsible|asked|tasked)|we needed to|i had to|the goal)\b",
    "action": r"\b(i (decided|built|wrote|talked|spoke|set up|organi[sz]ed|proposed|led|created|changed|started|asked|worked))\b",
    "result": r"\b(as a result|in the end|the result|outcome|we (reduced|increased|saved|shipped|delivered|won)|"
              r"(reduced|increased|improved|cut) .* by|percent|%|finally)\b",
}


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 3 and w not in _STOP}


def key_point_coverage(question: Question, answer: str) -> list[bool]:
    """A key point counts as covered when at least half of its content words appear (by stem)."""
    said = _stems(answer)
    covered = []
    for point in question.key_points:
        words = _stems(point)
        covered.append(bool(words) and len(words & said) * 2 >= len(words))
    return covered


def star_parts(answer: str) -> Star:
    text = answer.lower()
    return Star(**{part: bool(re.search(rx, text)) for part, rx in _STAR_CUES.items()})


OFFLINE_NOTE = "Scored with simple rules (no LLM is configured); connect an LLM for richer, specific feedback."


def heuristic_feedback(question: Question, answer: str, delivery: Delivery | None = None) -> dict[str, Any]:
    covered = key_point_coverage(question, answer)
    words = len(answer.split())
    ratio = sum(covered) / len(covered)
    score = 2 + 5 * ratio + (1 if words >= 40 else 0) + (1 if words >= 90 else 0)
    star = star_parts(answer) if question.kind == "behavioural" else None
    if star is not None:
        score += sum(star.model_dump().values()) / 4
    fillers = sum(count_fillers(answer).values())
    if delivery is not None and (delivery.fillers.get("per_minute") or 0) > 6:
        score -= 1
    score = int(max(1, min(10, round(score))))
    if words < 5:
        score = 1
    good = [f"You covered {p.lower()}." for p, c in zip(question.key_points, covered) if c]
    if words >= 40:
        good.append("The answer had enough substance.")
    missing = [f"Say something about {p.lower()}." for p, c in zip(question.key_points, covered) if not c]
    if words < 40:
        missing.append("Give a fuller answer with a concrete example (aim for one to two minutes).")
    if star is not None:
        missing += [f"Make the {part} clear (STAR)." for part, ok in star.model_dump().items() if not ok]
    if fillers >= 3:
        missing.append(f"Cut the filler words ({fillers} in this answer).")
    better = "A strong answer covers " + "; ".join(question.key_points) + "."
    if star is not None:
        better += " Structure it as Situation, Task, Action, Result, and end with a measurable result."
    return {"score": score, "good": good[:6], "missing": missing[:6], "better_answer": better,
            "star": star.model_dump() if star else None, "source": "heuristic", "note": OFFLINE_NOTE}


async def evaluate_answer(llm: StructuredLLM | None, prompt: str, question: Question, answer: str,
                          delivery: Delivery | None) -> dict[str, Any]:
    if llm is None:
        return heuristic_feedback(question, answer, delivery)
    try:
        parsed, raw = await ask_structured(llm, prompt, AnswerFeedback, "answer_feedback")
    except LLMError as e:
        fb = heuristic_feedback(question, answer, delivery)
        fb["note"] = f"The language model was unavailable ({e}); scored with simple rules."
        return fb
    if parsed is None:
        # Degrade to the model's text: still useful to read, scored by the rules.
        fb = heuristic_feedback(question, answer, delivery)
        fb["note"] = "The model's feedback was not in the expected format; here it is as text: " + _as_text(raw)
        return fb
    out = parsed.model_dump()
    if question.kind != "behavioural":
        out["star"] = None
    out.update(source="llm", note=None)
    return out


def _as_text(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)[:600]
    except (json.JSONDecodeError, TypeError):
        return raw.strip()[:600]


async def scorecard(llm: StructuredLLM | None, prompt_template: str, role: str,
                    results: list[dict[str, Any]], deliveries: list[Delivery]) -> dict[str, Any]:
    scored = [r for r in results if r.get("score") is not None]
    overall = round(mean(r["score"] for r in scored), 1) if scored else None
    wpms = [d.wpm for d in deliveries if d.wpm is not None]
    speech = sum(d.speech_s for d in deliveries)
    fillers = sum(d.fillers.get("count", 0) for d in deliveries)
    delivery = {"wpm": round(mean(wpms)) if wpms else None,
                "fillers_per_minute": round(fillers / speech * 60, 1) if speech >= 1 else None,
                "long_pauses": sum(d.long_pauses for d in deliveries)}
    card: dict[str, Any] = {
        "overall_score": overall,
        "questions": [{"question": r["question"], "score": r.get("score")} for r in results],
        "delivery": delivery,
    }
    strengths, improvements = _rule_summary(results, delivery)
    source, note = "heuristic", OFFLINE_NOTE if llm is None else None
    if llm is not None and results:
        summary = "; ".join(f"Q: {r['question']} | score {r.get('score')} | good: {r.get('good')} | "
                            f"missing: {r.get('missing')}" for r in results)
        try:
            parsed, _ = await ask_structured(llm, prompt_template.format(role=role, summary=summary),
                                             ScorecardText, "scorecard")
            if parsed is not None:
                strengths, improvements, source = parsed.strengths, parsed.improvements, "llm"
        except LLMError as e:
            note = f"The language model was unavailable ({e}); summary from simple rules."
    card.update(strengths=strengths, improvements=improvements, source=source, note=note)
    return card


def _rule_summary(results: list[dict[str, Any]], delivery: dict[str, Any]) -> tuple[list[str], list[str]]:
    strengths, improvements = [], []
    best = sorted((r for r in results if r.get("score")), key=lambda r: -r["score"])
    for r in best[:2]:
        if r["score"] >= 6:
            strengths.append(f"Solid answer to \"{r['question']}\" ({r['score']}/10).")
    for r in sorted((r for r in results if r.get("score")), key=lambda r: r["score"])[:2]:
        if r["score"] < 6 and r.get("missing"):
            improvements.append(f"On \"{r['question']}\": {r['missing'][0]}")
    wpm = delivery.get("wpm")
    if wpm is not None and 120 <= wpm <= 160:
        strengths.append(f"A clear speaking pace ({wpm} words per minute).")
    elif wpm is not None:
        improvements.append(f"Speak {'more slowly' if wpm > 160 else 'a little faster'}: {wpm} words per minute "
                            "(120-160 is easy to follow).")
    fpm = delivery.get("fillers_per_minute")
    if fpm is not None and fpm > 4:
        improvements.append(f"Fewer filler words: {fpm} per minute; pause silently instead.")
    elif fpm is not None:
        strengths.append("Few filler words.")
    if not strengths:
        strengths.append("You completed the interview: practising out loud is the hardest step.")
    if not improvements:
        improvements.append("Add measurable results to your examples.")
    return strengths, improvements
