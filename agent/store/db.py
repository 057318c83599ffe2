"""The store: async SQLAlchemy over SQLite (WAL) or PostgreSQL, migrated with Alembic at open.

Every write is its own short transaction, made when the thing it records is complete (a turn, a
piece of feedback), so a process killed mid-session loses at most the turn in progress.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, median
from typing import Any

from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from .models import Evaluation, Session, Turn, User, utcnow

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def default_url() -> str:
    from agent.config import data_dir

    path = data_dir() / "parley.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{path}"


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite:///) and pick the async drivers."""
    for plain, driver in (("postgres://", "postgresql+asyncpg://"), ("postgresql://", "postgresql+asyncpg://"),
                          ("sqlite://", "sqlite+aiosqlite://")):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_id() -> str:
    return secrets.token_hex(12)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _utc(dt: datetime) -> datetime:
    """Aware UTC. Naive datetimes are UTC: SQLite keeps no offset and gives them back naive."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _iso(dt: datetime | None) -> str | None:
    """ISO 8601 with the UTC offset, the same from SQLite and PostgreSQL."""
    return _utc(dt).isoformat() if dt is not None else None


MIGRATION_LOCK = 0x7061726C6579  # "parley": the advisory lock key migrations hold on PostgreSQL


def _upgrade(connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


class Store:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._session = async_sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def close(self) -> None:
        await self.engine.dispose()

    # ------------------------------------------------------------------ users

    async def user(self, token: str) -> int:
        """The user id for a browser's token, created on first sight."""
        digest = hash_token(token)
        async with self._session() as s:
            found = await s.scalar(select(User.id).where(User.token_hash == digest))
            if found is not None:
                return found
            s.add(user := User(token_hash=digest))
            try:
                await s.commit()
                return user.id
            except IntegrityError:  # two tabs of the same browser raced to create it
                await s.rollback()
                return await s.scalar(select(User.id).where(User.token_hash == digest))

    async def find_user(self, token: str) -> int | None:
        async with self._session() as s:
            return await s.scalar(select(User.id).where(User.token_hash == hash_token(token)))

    # ------------------------------------------------------------------ writes

    async def start_session(self, user_id: int, room: str, persona: str, kind: str, options: dict[str, Any],
                            session_id: str | None = None, owner: str | None = None) -> str:
        sid = session_id or new_session_id()
        async with self._session() as s:
            s.add(Session(id=sid, user_id=user_id, room=room, persona=persona, kind=kind,
                          role=options.get("role"), language=options.get("language"), level=options.get("level"),
                          options=options, status="active", owner=owner))
            await s.commit()
        return sid

    async def add_turn(self, session_id: str, seq: int, speaker: str, text: str, *, interrupted: bool = False,
                       typed: bool = False, speech_s: float | None = None, pauses: list[float] | None = None,
                       metrics: dict | None = None, audio_path: str | None = None) -> None:
        async with self._session() as s:
            s.add(Turn(session_id=session_id, seq=seq, speaker=speaker, text=text, interrupted=interrupted,
                       typed=typed, speech_s=speech_s, pauses=pauses, metrics=metrics, audio_path=audio_path))
            await s.commit()

    async def add_evaluation(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        async with self._session() as s:
            s.add(Evaluation(session_id=session_id, kind=kind, question_index=data.get("question_index"),
                             question=data.get("question"), score=data.get("score"), data=data))
            await s.commit()

    async def end_session(self, session_id: str, status: str = "completed", result: dict | None = None) -> None:
        values: dict[str, Any] = {"status": status, "ended_at": utcnow()}
        if result is not None:
            values["result"] = result
        async with self._session() as s:
            await s.execute(update(Session).where(Session.id == session_id).values(**values))
            await s.commit()

    async def set_result(self, session_id: str, result: dict[str, Any]) -> None:
        """The scorecard or summary, saved as soon as it exists (the session may go on)."""
        async with self._session() as s:
            await s.execute(update(Session).where(Session.id == session_id).values(result=result))
            await s.commit()

    async def mark_interrupted(self, owner: str | None = None) -> int:
        """At start-up: sessions this server instance left 'active' belonged to a process that died.
        With ``owner``, other instances' live sessions on a shared database are left alone."""
        q = update(Session).where(Session.status == "active")
        if owner is not None:
            q = q.where((Session.owner == owner) | Session.owner.is_(None))
        async with self._session() as s:
            result = await s.execute(q.values(status="interrupted", ended_at=utcnow()))
            await s.commit()
            return result.rowcount or 0

    async def delete_audio_older_than(self, cutoff: datetime) -> list[str]:
        """Forget recordings past their retention; returns the file paths to delete.

        A naive ``cutoff`` is UTC. SQLite compares the stored UTC text, so the cutoff is converted
        to UTC first (an aware cutoff in another zone would otherwise be off by its offset).
        """
        cutoff = _utc(cutoff)
        async with self._session() as s:
            rows = (await s.execute(select(Turn.id, Turn.audio_path).where(
                Turn.audio_path.is_not(None), Turn.created_at < cutoff))).all()
            if rows:
                await s.execute(update(Turn).where(Turn.id.in_([r.id for r in rows])).values(audio_path=None))
                await s.commit()
            return [r.audio_path for r in rows]

    # ------------------------------------------------------------------ reads (always scoped to a user)

    async def list_sessions(self, user_id: int, *, persona: str | None = None, role: str | None = None,
                            language: str | None = None, status: str | None = None, limit: int = 20,
                            offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        q = select(Session).where(Session.user_id == user_id)
        for column, value in ((Session.persona, persona), (Session.role, role), (Session.language, language),
                              (Session.status, status)):
            if value is not None:
                q = q.where(column == value)
        async with self._session() as s:
            total = await s.scalar(select(func.count()).select_from(q.subquery()))
            rows = (await s.scalars(q.order_by(Session.started_at.desc()).limit(limit).offset(offset))).all()
            counts = dict((await s.execute(
                select(Turn.session_id, func.count()).where(Turn.session_id.in_([r.id for r in rows]))
                .group_by(Turn.session_id))).all()) if rows else {}
        return [self._summary(r, counts.get(r.id, 0)) for r in rows], total or 0

    @staticmethod
    def _summary(r: Session, turns: int) -> dict[str, Any]:
        return {"id": r.id, "room": r.room, "persona": r.persona, "kind": r.kind, "role": r.role,
                "language": r.language, "level": r.level, "status": r.status, "options": r.options,
                "started_at": _iso(r.started_at), "ended_at": _iso(r.ended_at),
                "turns": turns, "overall_score": (r.result or {}).get("overall_score")}

    async def get_session(self, user_id: int, session_id: str) -> dict[str, Any] | None:
        """One session with its transcript and feedback; None when it is not this user's."""
        async with self._session() as s:
            r = await s.scalar(select(Session).where(Session.id == session_id, Session.user_id == user_id))
            if r is None:
                return None
            turns = (await s.scalars(select(Turn).where(Turn.session_id == session_id).order_by(Turn.seq))).all()
            evals = (await s.scalars(select(Evaluation).where(Evaluation.session_id == session_id)
                                     .order_by(Evaluation.id))).all()
        out = self._summary(r, len(turns))
        out["result"] = r.result
        out["transcript"] = [{"seq": t.seq, "speaker": t.speaker, "text": t.text, "interrupted": t.interrupted,
                              "typed": t.typed, "has_audio": t.audio_path is not None, "speech_s": t.speech_s, "pauses": t.pauses, "metrics": t.metrics,
                              "at": _iso(t.created_at)} for t in turns]
        out["evaluations"] = [{"kind": e.kind, **e.data} for e in evals]
        return out

    async def progress(self, user_id: int, *, persona: str | None = None, role: str | None = None,
                       language: str | None = None) -> dict[str, Any]:
        """Per-session trend (score, pace, fillers, latency) and per-question changes, oldest first."""
        q = select(Session).where(Session.user_id == user_id)
        for column, value in ((Session.persona, persona), (Session.role, role), (Session.language, language)):
            if value is not None:
                q = q.where(column == value)
        async with self._session() as s:
            sessions = (await s.scalars(q.order_by(Session.started_at))).all()
            ids = [x.id for x in sessions]
            evals = (await s.scalars(select(Evaluation).where(Evaluation.session_id.in_(ids))
                                     .order_by(Evaluation.id))).all() if ids else []
            turns = (await s.scalars(select(Turn).where(Turn.session_id.in_(ids), Turn.speaker == "agent"))).all() \
                if ids else []
        by_session: dict[str, list[Evaluation]] = {}
        for e in evals:
            by_session.setdefault(e.session_id, []).append(e)
        latency: dict[str, list[float]] = {}
        for t in turns:
            v = (t.metrics or {}).get("voice_to_voice_ms")
            if v is not None:
                latency.setdefault(t.session_id, []).append(v)
        points = []
        for x in sessions:
            es = by_session.get(x.id, [])
            scores = [e.score for e in es if e.kind == "feedback" and e.score is not None]
            deliveries = [e.data for e in es if e.kind == "delivery"]
            wpms = [d["wpm"] for d in deliveries if d.get("wpm") is not None]
            speech = sum(d.get("speech_s") or 0 for d in deliveries)
            fillers = sum((d.get("fillers") or {}).get("count", 0) for d in deliveries)
            points.append({
                "session": x.id, "started_at": _iso(x.started_at), "role": x.role, "language": x.language,
                "score": round(mean(scores), 2) if scores else None,
                "wpm": round(mean(wpms), 1) if wpms else None,
                "fillers_per_minute": round(fillers / speech * 60, 2) if speech >= 1 else None,
                "latency_ms": round(median(latency[x.id]), 1) if latency.get(x.id) else None,
                "corrections": sum(1 for e in es if e.kind == "correction"),
            })
        questions = _question_changes(by_session, [x.id for x in sessions])
        return {"sessions": points, "questions": questions, "statements": _statements(points, questions)}

    async def weaknesses(self, user_id: int, role: str | None, sessions: int = 3) -> list[str]:
        """What the last few sessions' feedback said was missing, most frequent first."""
        async with self._session() as s:
            ids = (await s.scalars(select(Session.id).where(Session.user_id == user_id, Session.role == role)
                                   .order_by(Session.started_at.desc()).limit(sessions))).all()
            evals = (await s.scalars(select(Evaluation).where(Evaluation.session_id.in_(ids),
                                                              Evaluation.kind == "feedback"))).all() if ids else []
        counts: dict[str, int] = {}
        for e in evals:
            for m in e.data.get("missing") or []:
                counts[m] = counts.get(m, 0) + 1
        return [m for m, _ in sorted(counts.items(), key=lambda kv: -kv[1])][:5]


def _question_changes(by_session: dict[str, list[Evaluation]], order: list[str]) -> list[dict[str, Any]]:
    """For each question answered more than once: the previous and the latest score."""
    history: dict[str, list[tuple[str, int]]] = {}
    for sid in order:
        for e in by_session.get(sid, []):
            if e.kind == "feedback" and e.question and e.score is not None:
                history.setdefault(e.question, []).append((sid, e.score))
    out = []
    for question, scores in history.items():
        if len(scores) >= 2:
            (_, before), (sid, after) = scores[-2], scores[-1]
            change = "improved" if after > before else "worse" if after < before else "same"
            out.append({"question": question, "previous": before, "latest": after, "change": change, "session": sid})
    return out


def _statements(points: list[dict[str, Any]], questions: list[dict[str, Any]]) -> list[str]:
    out = []
    scored = [p for p in points if p["score"] is not None]
    if len(scored) >= 2:
        first, last = scored[0]["score"], scored[-1]["score"]
        if last > first:
            out.append(f"Your average score improved from {first:g} to {last:g} over {len(scored)} sessions.")
        elif last < first:
            out.append(f"Your average score went down from {first:g} to {last:g} over {len(scored)} sessions.")
        else:
            out.append(f"Your average score held at {last:g} over {len(scored)} sessions.")
    for q in questions:
        if q["change"] == "improved":
            out.append(f"Your answer to \"{q['question']}\" improved from {q['previous']} to {q['latest']}.")
        elif q["change"] == "worse":
            out.append(f"Your answer to \"{q['question']}\" got worse: {q['previous']} last time, {q['latest']} now.")
    return out


async def open_store(url: str | None = None) -> Store:
    """Open (and migrate) the database; SQLite under the user's data directory by default."""
    url = normalize_url(url or default_url())
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_size=5, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            # WAL: readers never block the writer; synchronous=NORMAL in WAL mode survives a killed
            # process (only a power loss can drop the last commits).
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Several workers starting at once against one database would race through the same
            # migrations; the lock lasts until this transaction commits, so they take turns.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(_upgrade)
    return Store(engine)
