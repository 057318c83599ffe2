"""FastAPI application: the web page, SmallWebRTC signaling (Pipecat-compatible) and the REST API."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from agent.config import Settings, get_settings
from agent.engines import Engines, build_engines
from agent.metrics import Metrics
from agent.ratelimit import KeyedLimiter
from agent.room import RoomError, RoomManager
from personas.catalog import get_catalog, list_personas, use_data_dir
from pipeline.metrics import summarize

from .auth import bearer, grant_for, require_room
from .headers import SecurityHeaders, content_security_policy
from .history import router as history_router
from .livekit_tokens import livekit_router
from .limits import BodySizeLimit

log = logging.getLogger(__name__)
STATIC = importlib.resources.files("signaling").joinpath("static")


class IceCandidate(BaseModel):
    candidate: str
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None


class OfferRequest(BaseModel):
    sdp: str = Field(description="The SDP offer")
    type: str = "offer"
    pc_id: str | None = Field(None, description="The connection to renegotiate or restart")
    restart_pc: bool = False
    requestData: dict[str, Any] | None = Field(
        None, description="Parley options: {room, persona, options: {role, interview_type, language, level, ...},"
                          " user_token}")


class OfferAnswer(BaseModel):
    sdp: str
    type: str
    pc_id: str
    room: str  # the room joined (chosen by the server when the offer named none)


class CandidatesRequest(BaseModel):
    pc_id: str
    candidates: list[IceCandidate] = Field(max_length=200)


async def _open_store(settings: Settings):
    """The database, migrated; sessions a killed process left 'active' are marked interrupted. A
    database that cannot be opened leaves conversations working, without history."""
    from agent.store import open_store

    try:
        store = await open_store(settings.database_url)
    except Exception as e:
        log.error("history disabled: cannot open the database: %s", e)
        return None
    if (n := await store.mark_interrupted(settings.instance_id)):
        log.warning("%d session(s) were cut off by a previous shutdown; marked interrupted", n)
    return store


async def _expire_audio_forever(store, retention_days: int) -> None:
    from agent.recorder import expire_audio

    while True:
        try:
            if (n := await expire_audio(store, retention_days)):
                log.info("deleted %d recording(s) past the %d-day retention", n, retention_days)
        except Exception as e:  # a database hiccup must not end the sweeps
            log.warning("recording retention sweep failed: %s", e)
        await asyncio.sleep(6 * 3600)  # the sweep's period, not a wait for an event


def _audio_out(room) -> dict[str, Any]:
    """The agent's outgoing audio: frames sent, sent late (> 20 ms) or re-anchored, and frames the
    player played short inside a reply."""
    voice = room.peer.voice if room.peer is not None else None
    out = {"player_underruns": room.conversation.player.underruns}
    if voice is not None:
        out.update(frames=voice.frames, late_frames=voice.late_frames, resyncs=voice.resyncs,
                   max_late_ms=round(voice.max_late_s * 1000, 1))
    return out


def create_app(settings: Settings | None = None, engines: Engines | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        use_data_dir(settings.personas_dir)
        get_catalog()  # a malformed persona file stops start-up with the file and field named
        eng = engines or build_engines(settings)
        app.state.engines = eng
        app.state.store = await _open_store(settings)
        app.state.metrics = Metrics(rooms=lambda: app.state.rooms.rooms.values(), stt=eng.stt)
        app.state.rooms = RoomManager(settings, eng, app.state.store, app.state.metrics)
        background = [asyncio.create_task(eng.warm_up(), name="stt warm-up")]
        if app.state.store is not None:
            background.append(asyncio.create_task(
                _expire_audio_forever(app.state.store, settings.audio_retention_days), name="audio retention"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await app.state.rooms.close_all()
            if app.state.store is not None:
                await app.state.store.close()
            if engines is None:
                await eng.aclose()

    app = FastAPI(title="Parley", version="0.1.0", lifespan=lifespan,
                  description="Real-time voice agent for practice conversations.")
    app.state.settings = settings
    # Outermost last: sizes are checked before anything else reads the body, and every answer,
    # refusals included, carries the security and CORS headers.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(settings.frame_ancestors, settings.livekit_url))
    signaling_limit = KeyedLimiter(settings.signaling_rate_per_min / 60, settings.signaling_burst)

    async def rate_limited(request: Request) -> None:
        """Per client address. Behind a reverse proxy run uvicorn with --proxy-headers so that
        this is the browser's address, not the proxy's."""
        wait = signaling_limit.check(request.client.host if request.client else "?")
        if wait is not None:
            raise HTTPException(429, "too many signaling requests from your address; slow down",
                                headers={"Retry-After": str(max(1, round(wait)))})

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A readable sentence instead of FastAPI's 422 list: clients show ``detail`` to people.
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(RoomError)
    async def room_error(request: Request, exc: RoomError) -> JSONResponse:
        headers = {"Retry-After": str(round(exc.retry_after_s))} if exc.retry_after_s is not None else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC.joinpath("index.html")))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.include_router(history_router)
    app.include_router(livekit_router(settings), dependencies=[Depends(rate_limited)])

    @app.get("/history", include_in_schema=False)
    async def history_page() -> FileResponse:
        return FileResponse(str(STATIC.joinpath("history.html")))

    @app.get("/sessions/{session_id}", include_in_schema=False)
    async def report_page(session_id: str) -> FileResponse:
        return FileResponse(str(STATIC.joinpath("report.html")))

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        eng: Engines = request.app.state.engines
        return {"status": "ok", "rooms": len(request.app.state.rooms.rooms), "stt": eng.stt_status,
                "llm": "offline personas" if eng.llm is None else settings.llm_model, "tts": eng.tts.name,
                "turn_model": getattr(eng.turn_model, "path", None) and eng.turn_model.path.name}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition: per-stage latency histograms, rooms, STT queue, errors."""
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/api/personas")
    async def personas() -> dict[str, Any]:
        return {"personas": list_personas()}

    @app.post("/api/offer", response_model=OfferAnswer, dependencies=[Depends(rate_limited)])
    async def offer(body: OfferRequest, request: Request,
                    room: str | None = Query(None), persona: str | None = Query(None),
                    role: str | None = None, interview_type: str | None = None,
                    language: str | None = None, level: str | None = None) -> dict[str, str]:
        """SmallWebRTC offer: answer with the agent's SDP. Room, persona and options come from
        ``requestData`` or the query string (the request data wins)."""
        data = body.requestData or {}
        if not isinstance(data.get("options", {}), dict):
            raise HTTPException(400, "requestData.options must be an object")
        options = {k: v for k, v in {"role": role, "interview_type": interview_type, "language": language,
                                     "level": level}.items() if v is not None}
        options.update(data.get("options") or {})
        room_id = data.get("room") or data.get("room_id") or room
        token = data.get("user_token")
        grant = grant_for(request, str(token) if token else None)
        if grant is not None:
            room_id = room_id or grant.room
            require_room(grant, str(room_id))
            token = grant.store_token
        return await request.app.state.rooms.offer(
            body.sdp, body.type, body.pc_id, body.restart_pc,
            str(room_id) if room_id is not None else None, data.get("persona") or persona, options,
            user_token=str(token) if token else None)

    @app.patch("/api/offer", dependencies=[Depends(rate_limited)])
    async def candidates(body: CandidatesRequest, request: Request) -> dict[str, str]:
        """Trickled ICE candidates for a connection created by POST /api/offer."""
        grant = grant_for(request)
        if grant is not None:
            known = request.app.state.rooms.peers.get(body.pc_id)
            if known is not None:
                require_room(grant, known[1].id)
        await request.app.state.rooms.add_candidates(body.pc_id, [c.model_dump() for c in body.candidates])
        return {"status": "ok"}

    @app.get("/api/rooms/{room_id}")
    async def room_info(room_id: str, request: Request) -> dict[str, Any]:
        grant = grant_for(request)
        require_room(grant, room_id)
        room = request.app.state.rooms.rooms.get(room_id)
        # A room shows its transcript only to whoever opened it (on open servers too, by their token).
        caller = grant.store_token if grant is not None else bearer(request)
        if room is None or (room.owner is not None and caller != room.owner):
            raise HTTPException(404, f"unknown room {room_id!r}")
        conv = room.conversation
        return {"room": room.id, "persona": room.persona.persona, "options": room.persona.options,
                "state": conv.state.value, "connected": room.peer is not None, "history": conv.history,
                "metrics": [dataclasses.asdict(m) for m in conv.metrics],
                "metrics_summary": summarize(conv.metrics), "audio_out": _audio_out(room)}

    return app
