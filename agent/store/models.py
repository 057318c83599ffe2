"""Tables. Times are UTC; JSON columns hold what the pipeline and personas already shape as dicts."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    """An anonymous person, known by a random token their browser keeps (only its hash is stored)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random: unguessable in URLs
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    room: Mapped[str] = mapped_column(String(64))
    persona: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # interviewer | teacher
    role: Mapped[str | None] = mapped_column(String(64))
    language: Mapped[str | None] = mapped_column(String(8))
    level: Mapped[str | None] = mapped_column(String(16))
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | completed | interrupted
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict | None] = mapped_column(JSON)  # the scorecard or the teacher's summary
    # The server instance that runs it (host/mode): a restart only marks its own sessions interrupted.
    owner: Mapped[str | None] = mapped_column(String(128))
    turns: Mapped[list[Turn]] = relationship(order_by="Turn.seq", cascade="all, delete-orphan")
    evaluations: Mapped[list[Evaluation]] = relationship(order_by="Evaluation.id", cascade="all, delete-orphan")
    __table_args__ = (Index("ix_sessions_user_started", "user_id", "started_at"),)


class Turn(Base):
    __tablename__ = "turns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    speaker: Mapped[str] = mapped_column(String(8))  # user | agent
    text: Mapped[str] = mapped_column(Text)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    typed: Mapped[bool] = mapped_column(Boolean, default=False)
    speech_s: Mapped[float | None] = mapped_column(Float)
    pauses: Mapped[list | None] = mapped_column(JSON)
    metrics: Mapped[dict | None] = mapped_column(JSON)  # latencies of the reply (agent turns)
    audio_path: Mapped[str | None] = mapped_column(String(512))  # opt-in recording of the user's answer
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Evaluation(Base):
    """Per-answer feedback and the delivery of that answer; corrections for the teacher."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # feedback | delivery | correction | vocabulary
    question_index: Mapped[int | None] = mapped_column(Integer)
    question: Mapped[str | None] = mapped_column(Text, index=True)
    score: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
