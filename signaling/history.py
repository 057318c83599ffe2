"""REST API over stored sessions. A user only ever sees their own: anything else is a 404, never a
403 that would confirm the session exists."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from agent.store import Store

from .auth import bearer, grant_for

router = APIRouter(prefix="/api", tags=["history"])


def _store(request: Request) -> Store:
    store = request.app.state.store
    if store is None:
        raise HTTPException(503, "history is not available: the database could not be opened")
    return store


async def current_user(request: Request, store: Store = Depends(_store)) -> int | None:
    """The user behind ``Authorization: Bearer <token>``: the browser's anonymous token, or with
    access control on, the signed token's user. None for someone never seen, who has no history."""
    grant = grant_for(request)
    if grant is not None:
        return await store.find_user(grant.store_token)
    token = bearer(request)
    if not token:
        raise HTTPException(401, "send your user token as 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return await store.find_user(token)


@router.get("/sessions")
async def list_sessions(user: int | None = Depends(current_user), store: Store = Depends(_store),
                        persona: str | None = None, role: str | None = None, language: str | None = None,
                        status: str | None = Query(None, pattern="^(active|completed|interrupted)$"),
                        limit: int = Query(20, ge=1, le=100), offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict[str, Any]:
    """Your past sessions, newest first."""
    if user is None:
        return {"items": [], "total": 0, "limit": limit, "offset": offset}
    items, total = await store.list_sessions(user, persona=persona, role=role, language=language, status=status,
                                             limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


async def _own_session(session_id: str, user: int | None, store: Store) -> dict[str, Any]:
    found = await store.get_session(user, session_id) if user is not None else None
    if found is None:
        raise HTTPException(404, f"no session {session_id!r}")
    return found


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, user: int | None = Depends(current_user),
                      store: Store = Depends(_store)) -> dict[str, Any]:
    """One session: transcript, per-answer feedback and delivery, scorecard or summary."""
    return await _own_session(session_id, user, store)


@router.get("/sessions/{session_id}/export")
async def export_session(session_id: str, format: str = Query("json", pattern="^(json|markdown)$"),
                         user: int | None = Depends(current_user), store: Store = Depends(_store)) -> Response:
    """Download a session as JSON or Markdown."""
    s = await _own_session(session_id, user, store)
    if format == "json":
        body, media, ext = json.dumps(s, indent=2, ensure_ascii=False), "application/json", "json"
    else:
        body, media, ext = to_markdown(s), "text/markdown; charset=utf-8", "md"
    return Response(body, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="parley-{session_id}.{ext}"'})


@router.get("/progress")
async def progress(user: int | None = Depends(current_user), store: Store = Depends(_store),
                   persona: str | None = None, role: str | None = None, language: str | None = None) -> dict[str, Any]:
    """Trend over sessions (score, pace, fillers, latency) and answers that improved or got worse."""
    if user is None:
        return {"sessions": [], "questions": [], "statements": []}
    return await store.progress(user, persona=persona, role=role, language=language)


def to_markdown(s: dict[str, Any]) -> str:
    what = s["role"] or " ".join(x for x in (s["language"], s["level"]) if x)
    lines = [f"# Parley session: {s['persona']} ({what})", "",
             f"- Started: {s['started_at']}", f"- Ended: {s['ended_at'] or '-'}", f"- Status: {s['status']}"]
    result = s.get("result") or {}
    if result.get("overall_score") is not None:
        lines += [f"- Overall score: {result['overall_score']}/10"]
    feedback = {e.get("question_index"): e for e in s["evaluations"] if e["kind"] == "feedback"}
    if feedback:
        lines += ["", "## Feedback", ""]
        for i in sorted(k for k in feedback if k is not None):
            f = feedback[i]
            lines += [f"### {i + 1}. {f.get('question')}", "", f"Score: {f.get('score')}/10", ""]
            lines += [f"- Good: {g}" for g in f.get("good") or []]
            lines += [f"- Missing: {m}" for m in f.get("missing") or []]
            if f.get("better_answer"):
                lines += ["", f"Better answer: {f['better_answer']}"]
            lines.append("")
    for key, title in (("strengths", "Strengths"), ("improvements", "To improve"), ("suggestions", "Suggestions")):
        if result.get(key):
            lines += ["", f"## {title}", ""] + [f"- {x}" for x in result[key]]
    corrections = [e for e in s["evaluations"] if e["kind"] == "correction"]
    if corrections:
        lines += ["", "## Corrections", ""]
        lines += [f"- ~~{c['original']}~~ → {c['corrected']}: {c['explanation']}" for c in corrections]
    lines += ["", "## Transcript", ""]
    for t in s["transcript"]:
        who = "You" if t["speaker"] == "user" else "Agent"
        cut = " *(interrupted)*" if t["interrupted"] else ""
        lines.append(f"**{who}:** {t['text']}{cut}  ")
    return "\n".join(lines) + "\n"
