"""The store, the same tests on SQLite and on a real PostgreSQL server (tests/pg.py)."""
from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from agent.store import open_store
from agent.store.models import Base, Session, Turn, User

BACKENDS = ["sqlite", "postgresql"]
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A URL to an empty database: a new SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'parley.db'}"
        return
    from pg import create_database, drop_database

    server = request.getfixturevalue("postgres_url")
    url = create_database(server)
    yield url
    drop_database(server, url)


@pytest.fixture
async def store(store_url):
    s = await open_store(store_url)
    yield s
    await s.close()


async def _set(store, model, row_id, **values) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(update(model).where(model.id == row_id).values(**values))


def _aware_utc(iso: str) -> datetime:
    dt = datetime.fromisoformat(iso)
    assert dt.tzinfo is not None and dt.utcoffset() == timedelta(0), iso
    return dt


# ---------------------------------------------------------------------------------------- migrations

def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from agent.store.db import MIGRATIONS

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


async def test_migrations_run_on_an_empty_database_and_are_idempotent(store_url):
    first = await open_store(store_url)
    try:
        async with first.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        assert {"users", "sessions", "turns", "evaluations", "alembic_version"} <= tables
        assert version == [head_revision()]
        uid = await first.user("tok")
    finally:
        await first.close()
    second = await open_store(store_url)  # already at head: nothing to do, nothing lost
    try:
        assert await second.find_user("tok") == uid
        async with second.engine.connect() as conn:
            assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all() == [head_revision()]
    finally:
        await second.close()


async def test_workers_starting_at_once_migrate_an_empty_postgres_database_once(postgres_url):
    """A fleet of agent workers starting together against one new database (the Kubernetes case)."""
    from pg import create_database, drop_database

    store_url = create_database(postgres_url)
    stores = await asyncio.gather(*(open_store(store_url) for _ in range(6)))
    try:
        async with stores[0].engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        assert version == [head_revision()]
        ids = await asyncio.gather(*(s.user("same-token") for s in stores))
        assert len(set(ids)) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))
        drop_database(postgres_url, store_url)


async def test_migration_matches_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def diff(sync_conn):
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


# ---------------------------------------------------------------------------------------- users

async def test_same_token_same_user_and_only_its_hash_is_stored(store):
    a = await store.user("token-a")
    assert await store.user("token-a") == a
    b = await store.user("token-b")
    assert b != a
    assert await store.find_user("token-a") == a
    assert await store.find_user("never-seen") is None
    # Two tabs of one browser racing to create the same user get the same id.
    ids = await asyncio.gather(*(store.user("token-c") for _ in range(8)))
    assert len(set(ids)) == 1 and ids[0] not in (a, b)
    async with store.engine.connect() as conn:
        hashes = (await conn.execute(select(User.token_hash))).scalars().all()
    assert sorted(hashes) == sorted(hashlib.sha256(t.encode()).hexdigest() for t in ("token-a", "token-b", "token-c"))
    assert not any(t in h for h in hashes for t in ("token-a", "token-b", "token-c"))


# ---------------------------------------------------------------------------------------- round trip

async def test_session_turns_and_evaluations_round_trip(store):
    before = datetime.now(timezone.utc)
    uid = await store.user("u")
    options = {"role": "backend", "language": "en", "level": "senior", "record_audio": True,
               "focus": ["system design", "café ☕"], "nested": {"a": [1, 2.5, None], "b": False}}
    sid = await store.start_session(uid, "room-1", "interviewer-alex", "interviewer", options)
    await store.add_turn(sid, 1, "agent", "Tell me about yourself.",
                         metrics={"voice_to_voice_ms": 812.5, "llm_ttft_ms": 240, "tts_ttfb_ms": None})
    await store.add_turn(sid, 2, "user", "I build APIs — mostly Python.", speech_s=4.25, pauses=[0.4, 1.2],
                         audio_path="/rec/a.wav")
    await store.add_turn(sid, 3, "agent", "Why that stack?", interrupted=True, metrics={"voice_to_voice_ms": 700})
    await store.add_turn(sid, 4, "user", "typed answer", typed=True)
    feedback = {"question_index": 0, "question": "Tell me about yourself.", "score": 7,
                "strengths": ["clear"], "missing": ["metrics", "impact"], "tip": "Quantify results."}
    delivery = {"question_index": 0, "wpm": 142.0, "speech_s": 4.25, "fillers": {"count": 2, "words": {"um": 2}}}
    await store.add_evaluation(sid, "feedback", feedback)
    await store.add_evaluation(sid, "delivery", delivery)
    await store.add_evaluation(sid, "correction", {"original": "I goed", "corrected": "I went"})
    result = {"overall_score": 7.5, "categories": {"communication": 8, "depth": 7}, "summary": "Good"}
    await store.end_session(sid, "completed", result)

    got = await store.get_session(uid, sid)
    assert got["id"] == sid and got["room"] == "room-1" and got["persona"] == "interviewer-alex"
    assert (got["kind"], got["role"], got["language"], got["level"]) == ("interviewer", "backend", "en", "senior")
    assert got["options"] == options
    assert got["status"] == "completed" and got["result"] == result and got["overall_score"] == 7.5
    assert got["turns"] == 4
    started, ended = _aware_utc(got["started_at"]), _aware_utc(got["ended_at"])
    after = datetime.now(timezone.utc)
    assert before - timedelta(seconds=1) <= started <= ended <= after + timedelta(seconds=1)
    t = got["transcript"]
    assert [x["seq"] for x in t] == [1, 2, 3, 4]
    assert [x["speaker"] for x in t] == ["agent", "user", "agent", "user"]
    assert t[0]["metrics"] == {"voice_to_voice_ms": 812.5, "llm_ttft_ms": 240, "tts_ttfb_ms": None}
    assert t[1]["text"] == "I build APIs — mostly Python." and t[1]["speech_s"] == 4.25
    assert t[1]["pauses"] == [0.4, 1.2] and t[1]["interrupted"] is False and t[1]["typed"] is False
    assert t[2]["interrupted"] is True and t[3]["typed"] is True and t[3]["pauses"] is None
    for x in t:
        assert started <= _aware_utc(x["at"]) <= after + timedelta(seconds=1)
    assert got["evaluations"] == [{"kind": "feedback", **feedback}, {"kind": "delivery", **delivery},
                                  {"kind": "correction", "original": "I goed", "corrected": "I went"}]

    rows, total = await store.list_sessions(uid)
    assert total == 1 and rows[0]["id"] == sid and rows[0]["turns"] == 4 and rows[0]["overall_score"] == 7.5
    assert rows[0]["started_at"] == got["started_at"] and rows[0]["ended_at"] == got["ended_at"]


async def test_foreign_keys_are_enforced(store):
    with pytest.raises(IntegrityError):
        await store.add_turn("no-such-session", 1, "user", "hello")


# ---------------------------------------------------------------------------------------- listing

async def test_list_sessions_pages_and_filters_with_the_right_total(store):
    uid, other = await store.user("me"), await store.user("someone else")
    specs = [  # persona, role, language, status
        ("interviewer-alex", "backend", None, "completed"),
        ("interviewer-alex", "backend", None, "active"),
        ("interviewer-alex", "frontend", None, "interrupted"),
        ("interviewer-sam", "backend", None, "completed"),
        ("teacher-lea", None, "fr", "completed"),
        ("teacher-lea", None, "fr", "active"),
        ("teacher-lea", None, "es", "completed"),
    ]
    ids = []
    for i, (persona, role, language, status) in enumerate(specs):
        kind = "teacher" if persona.startswith("teacher") else "interviewer"
        sid = await store.start_session(uid, f"r{i}", persona, kind, {"role": role, "language": language})
        await _set(store, Session, sid, started_at=T0 + timedelta(hours=i))
        if status != "active":
            await store.end_session(sid, status)
        for seq in range(i):
            await store.add_turn(sid, seq, "user", "x")
        ids.append(sid)
    await store.start_session(other, "r-other", "interviewer-alex", "interviewer", {"role": "backend"})

    newest_first = ids[::-1]
    seen = []
    for offset in (0, 3, 6):
        rows, total = await store.list_sessions(uid, limit=3, offset=offset)
        assert total == 7
        seen += [r["id"] for r in rows]
    assert seen == newest_first
    rows, total = await store.list_sessions(uid, limit=3, offset=9)
    assert rows == [] and total == 7
    rows, _ = await store.list_sessions(uid)
    assert [r["turns"] for r in rows] == [6, 5, 4, 3, 2, 1, 0]

    async def listed(**filters):
        rows, total = await store.list_sessions(uid, **filters)
        return [r["id"] for r in rows], total

    assert await listed(persona="interviewer-alex") == ([ids[2], ids[1], ids[0]], 3)
    assert await listed(persona="interviewer-alex", limit=2, offset=1) == ([ids[1], ids[0]], 3)
    assert await listed(role="backend") == ([ids[3], ids[1], ids[0]], 3)
    assert await listed(language="fr") == ([ids[5], ids[4]], 2)
    assert await listed(status="completed") == ([ids[6], ids[4], ids[3], ids[0]], 4)
    assert await listed(status="interrupted") == ([ids[2]], 1)
    assert await listed(persona="teacher-lea", status="completed", limit=1) == ([ids[6]], 2)
    assert await listed(role="backend", persona="interviewer-sam") == ([ids[3]], 1)
    assert await listed(persona="nobody") == ([], 0)


async def test_a_session_is_visible_only_to_its_user(store):
    me, other = await store.user("me"), await store.user("other")
    sid = await store.start_session(me, "r", "interviewer-alex", "interviewer", {"role": "backend"})
    await store.add_turn(sid, 1, "user", "private")
    await store.add_evaluation(sid, "feedback", {"question": "Q", "score": 5, "missing": ["x"]})
    assert (await store.get_session(me, sid))["transcript"][0]["text"] == "private"
    assert await store.get_session(other, sid) is None
    assert await store.get_session(me, "no-such-session") is None
    assert await store.list_sessions(other) == ([], 0)
    assert (await store.progress(other))["sessions"] == []
    assert await store.weaknesses(other, "backend") == []


async def test_mark_interrupted_flips_only_active_sessions(store):
    uid = await store.user("u")
    active = [await store.start_session(uid, f"a{i}", "p", "interviewer", {}) for i in range(2)]
    done = await store.start_session(uid, "d", "p", "interviewer", {})
    await store.end_session(done, "completed", {"overall_score": 6})
    done_before = await store.get_session(uid, done)
    gone = await store.start_session(uid, "g", "p", "interviewer", {})
    await store.end_session(gone, "interrupted")

    assert await store.mark_interrupted() == 2
    for sid in active:
        s = await store.get_session(uid, sid)
        assert s["status"] == "interrupted" and _aware_utc(s["ended_at"]) >= _aware_utc(s["started_at"])
    assert await store.get_session(uid, done) == done_before
    assert (await store.get_session(uid, gone))["status"] == "interrupted"
    assert await store.mark_interrupted() == 0


async def test_a_restart_marks_only_its_own_instances_sessions(store):
    uid = await store.user("u")
    mine = await store.start_session(uid, "m", "p", "interviewer", {}, owner="host-a:8000")
    theirs = await store.start_session(uid, "t", "p", "interviewer", {}, owner="host-b:8000")
    assert await store.mark_interrupted("host-a:8000") == 1
    assert (await store.get_session(uid, mine))["status"] == "interrupted"
    assert (await store.get_session(uid, theirs))["status"] == "active"  # another worker's live session


# ---------------------------------------------------------------------------------------- progress

async def _interview(store, uid, day, role, feedback, *, wpm=None, speech_s=None, fillers=None, latencies=(),
                     corrections=0):
    sid = await store.start_session(uid, f"room-{day}", "interviewer-alex", "interviewer", {"role": role})
    await _set(store, Session, sid, started_at=T0 + timedelta(days=day))
    for seq, ms in enumerate(latencies):
        await store.add_turn(sid, seq, "agent", "question?", metrics={"voice_to_voice_ms": ms})
    await store.add_turn(sid, 99, "user", "answer", speech_s=speech_s)
    for i, (question, score, missing) in enumerate(feedback):
        await store.add_evaluation(sid, "feedback", {"question_index": i, "question": question, "score": score,
                                                     "missing": missing})
    if wpm is not None:
        await store.add_evaluation(sid, "delivery", {"wpm": wpm, "speech_s": speech_s,
                                                     "fillers": {"count": fillers}})
    for _ in range(corrections):
        await store.add_evaluation(sid, "correction", {"original": "a", "corrected": "b"})
    await store.end_session(sid, "completed")
    return sid


async def test_progress_over_three_sessions(store):
    uid, other = await store.user("me"), await store.user("other")
    # Stored out of time order: the trend must follow started_at, not insertion order.
    s3 = await _interview(store, uid, 3, "backend", [("Q", 7, []), ("R", 6, []), ("C", 10, []), ("D", 9, [])],
                          wpm=150, speech_s=120, fillers=2, latencies=[600, 700, 650])
    s1 = await _interview(store, uid, 1, "backend", [("Q", 5, []), ("A", 3, [])],
                          wpm=110, speech_s=60, fillers=6, latencies=[900, 1100])
    s2 = await _interview(store, uid, 2, "backend", [("R", 8, []), ("B", 4, [])],
                          wpm=130, speech_s=30, fillers=1, latencies=[800], corrections=2)
    await _interview(store, uid, 4, "frontend", [("Q", 1, [])], wpm=90, speech_s=10, fillers=5)
    await _interview(store, other, 5, "backend", [("Q", 10, [])])

    p = await store.progress(uid, role="backend")
    points = p["sessions"]
    assert [x["session"] for x in points] == [s1, s2, s3]
    assert [_aware_utc(x["started_at"]) for x in points] == [T0 + timedelta(days=d) for d in (1, 2, 3)]
    assert [x["score"] for x in points] == [4, 6, 8]
    assert [x["wpm"] for x in points] == [110, 130, 150]
    assert [x["fillers_per_minute"] for x in points] == [6.0, 2.0, 1.0]
    assert [x["latency_ms"] for x in points] == [1000, 800, 650]
    assert [x["corrections"] for x in points] == [0, 2, 0]
    assert all(x["role"] == "backend" for x in points)
    assert p["questions"] == [
        {"question": "Q", "previous": 5, "latest": 7, "change": "improved", "session": s3},
        {"question": "R", "previous": 8, "latest": 6, "change": "worse", "session": s3},
    ]
    assert p["statements"] == [
        "Your average score improved from 4 to 8 over 3 sessions.",
        'Your answer to "Q" improved from 5 to 7.',
        'Your answer to "R" got worse: 8 last time, 6 now.',
    ]

    everything = await store.progress(uid)  # no filter: the frontend session too, and Q's latest is 1
    assert len(everything["sessions"]) == 4
    assert everything["questions"][0] == {"question": "Q", "previous": 7, "latest": 1, "change": "worse",
                                          "session": everything["sessions"][3]["session"]}
    assert everything["statements"][0] == "Your average score went down from 4 to 1 over 4 sessions."


async def test_weaknesses_are_the_most_frequent_missing_items_of_the_last_sessions(store):
    uid = await store.user("me")
    await _interview(store, uid, 1, "backend", [("Q", 3, ["ancient"] * 5)])  # older than the last three
    await _interview(store, uid, 2, "backend", [("Q", 5, ["metrics", "tradeoffs"]), ("R", 5, ["testing"])])
    await _interview(store, uid, 3, "backend", [("Q", 6, ["metrics"])])
    s4 = await _interview(store, uid, 4, "backend", [("Q", 7, ["metrics", "tradeoffs"])])
    await store.add_evaluation(s4, "delivery", {"missing": ["not feedback"] * 9})
    await _interview(store, uid, 5, "frontend", [("Q", 7, ["css"] * 9)])
    assert await store.weaknesses(uid, "backend") == ["metrics", "tradeoffs", "testing"]
    assert await store.weaknesses(uid, "backend", sessions=1) == ["metrics", "tradeoffs"]
    assert (await store.weaknesses(uid, "backend", sessions=10))[0] == "ancient"
    teacher = await store.start_session(uid, "t", "teacher-lea", "teacher", {"language": "fr"})
    await store.add_evaluation(teacher, "feedback", {"missing": ["subjunctive"]})
    assert await store.weaknesses(uid, None) == ["subjunctive"]  # role None matches sessions without a role


# ---------------------------------------------------------------------------------------- retention

async def test_delete_audio_older_than(store):
    uid = await store.user("u")
    sid = await store.start_session(uid, "r", "p", "interviewer", {"record_audio": True})
    now = datetime.now(timezone.utc)
    ages = {"/rec/old.wav": timedelta(days=30), "/rec/edge.wav": timedelta(days=7, hours=2),
            "/rec/recent.wav": timedelta(days=1), None: timedelta(days=40)}
    for seq, (path, age) in enumerate(ages.items()):
        await store.add_turn(sid, seq, "user", "answer", audio_path=path)
        async with store.engine.begin() as conn:
            await conn.execute(update(Turn).where(Turn.session_id == sid, Turn.seq == seq)
                               .values(created_at=now - age))
    # The cutoff in another zone than UTC: the same instant, so the same turns.
    cutoff = (now - timedelta(days=7)).astimezone(timezone(timedelta(hours=-5)))
    assert sorted(await store.delete_audio_older_than(cutoff)) == ["/rec/edge.wav", "/rec/old.wav"]
    assert await store.delete_audio_older_than(cutoff) == []
    async with store.engine.connect() as conn:
        left = (await conn.execute(select(Turn.seq, Turn.audio_path).where(Turn.session_id == sid)
                                   .order_by(Turn.seq))).all()
    assert [tuple(r) for r in left] == [(0, None), (1, None), (2, "/rec/recent.wav"), (3, None)]
    naive_utc = (now - timedelta(hours=1)).replace(tzinfo=None)
    assert await store.delete_audio_older_than(naive_utc) == ["/rec/recent.wav"]


# ---------------------------------------------------------------------------------------- concurrency

async def test_concurrent_writers_all_land(store):
    uid = await store.user("u")
    async with asyncio.timeout(60):
        sids = await asyncio.gather(*(store.start_session(uid, f"r{i}", "p", "interviewer", {"i": i})
                                      for i in range(20)))

        async def conversation(sid: str) -> None:
            for seq in range(5):
                await store.add_turn(sid, seq, "user" if seq % 2 else "agent", f"turn {seq}",
                                     metrics={"seq": seq})
            await store.add_evaluation(sid, "feedback", {"question": "Q", "score": 5})
            await store.end_session(sid, "completed", {"overall_score": 5})

        await asyncio.gather(*(conversation(sid) for sid in sids))
    rows, total = await store.list_sessions(uid, limit=100)
    assert total == 20 and len(set(sids)) == 20
    assert {r["id"] for r in rows} == set(sids)
    assert all(r["turns"] == 5 and r["status"] == "completed" for r in rows)
    for sid in sids:
        s = await store.get_session(uid, sid)
        assert [t["seq"] for t in s["transcript"]] == list(range(5)) and len(s["evaluations"]) == 1
