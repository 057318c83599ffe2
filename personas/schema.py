"""The shape of persona data files. Unknown keys are errors: a typo must not silently drop a setting."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    label: str


class Level(Choice):
    style: str  # how the teacher speaks at this level


class Question(_Strict):
    text: str = Field(min_length=10)
    kind: Literal["technical", "behavioural"]
    difficulty: Literal["easy", "medium", "hard"]
    hint: str = Field(min_length=5)
    key_points: list[str] = Field(min_length=1, max_length=8)  # what a strong answer covers


class RoleBank(_Strict):
    """questions/<id>.yaml: one role's question bank."""

    id: str = Field(pattern=r"^[a-z0-9-]+$")
    label: str
    vocabulary: str = ""  # Whisper prompt terms for this role
    questions: list[Question] = Field(min_length=1)


class Language(_Strict):
    id: str = Field(pattern=r"^[a-z]{2,3}$")  # Whisper's language code
    label: str
    native_label: str
    greeting: str
    topics: list[str] = Field(min_length=1)


class LanguageList(_Strict):
    languages: list[Language] = Field(min_length=1)


class InterviewerPrompts(_Strict):
    system: str  # {role} {interview_type} {difficulty} {total}
    ask: str  # {n} {total} {question}
    follow_up: str  # {question} {answer}
    hint: str  # {question} {hint}
    closing: str
    corrections: str  # grammar and wording feedback for non-native speakers
    evaluate: str  # {role} {question} {kind} {key_points} {answer}
    scorecard: str  # {role} {summary}


class InterviewerPersona(_Strict):
    kind: Literal["interviewer"]
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    name: str
    description: str
    roles: Literal["all"] | list[str] = "all"
    default_role: str
    interview_types: list[Choice] = Field(min_length=1)
    difficulties: list[Choice] = Field(min_length=1)
    default_questions: int = Field(5, ge=1, le=25)
    max_questions: int = Field(25, ge=1, le=25)  # the hard cap
    max_follow_ups: int = Field(1, ge=0, le=3)  # per question
    hint_after_s: float = Field(20.0, gt=0)  # silence after a question before a hint
    endpoint_silence_ms: int | None = Field(None, ge=200, le=3000)  # end of an answer
    greeting: str  # {question}
    stt_prompt: str | None = None
    stuck_phrases: list[str] = Field(default_factory=list)
    prompts: InterviewerPrompts

    @model_validator(mode="after")
    def _defaults_fit(self) -> "InterviewerPersona":
        if self.default_questions > self.max_questions:
            raise ValueError("default_questions is over max_questions")
        return self


class TeacherPrompts(_Strict):
    system: str  # {language} {level} {style} {native} {topic}
    corrections: str  # {language} {level} {native} {utterance}
    summary: str  # {language} {level} {native} {corrections} {vocabulary}


class TeacherPersona(_Strict):
    kind: Literal["teacher"]
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    name: str
    description: str
    default_language: str
    default_native_language: str = "en"
    default_level: str
    endpoint_silence_ms: int | None = Field(None, ge=200, le=3000)  # learners pause to find words
    levels: list[Level] = Field(min_length=1)
    prompts: TeacherPrompts


Persona = Annotated[InterviewerPersona | TeacherPersona, Field(discriminator="kind")]
