"""Tokens for joining a LiveKit room from the web page (livekit-client), when LiveKit is configured.

``POST /api/livekit/token`` checks the persona and options, then mints a join token for the room
whose room configuration dispatches the Parley agent (``PARLEY_LIVEKIT_AGENT_NAME``) with the persona
in the dispatch metadata: the first participant to join creates the room and brings the agent in,
and the agent talks with that participant. ``GET /api/livekit`` tells the page whether LiveKit is on:
the page (static/livekit.js) offers "Join via LiveKit" only when it answers 200, and then asks for a
token with its room, a per-tab identity, the persona, options and its history token.

Without ``PARLEY_LIVEKIT_URL``, ``PARLEY_LIVEKIT_API_KEY`` and ``PARLEY_LIVEKIT_API_SECRET`` both
routes answer 404 with the variables to set.
"""
from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from agent.config import Settings
from agent.room import ROOM_ID
from personas.catalog import build

from .auth import grant_for, require_room

TOKEN_TTL = timedelta(hours=2)


class TokenRequest(BaseModel):
    room: str | None = Field(None, description="Room name; a new one when omitted")
    identity: str | None = Field(None, description="Participant identity; a random one when omitted")
    name: str | None = Field(None, description="Display name")
    persona: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    user_token: str | None = Field(None, description="The page's anonymous history token")


class TokenResponse(BaseModel):
    url: str
    token: str
    room: str
    identity: str


def livekit_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api/livekit", tags=["livekit"])

    def configured() -> tuple[str, str, str]:
        if not (settings.livekit_url and settings.livekit_api_key and settings.livekit_api_secret):
            raise HTTPException(404, "LiveKit is not configured on this server: set PARLEY_LIVEKIT_URL, "
                                     "PARLEY_LIVEKIT_API_KEY and PARLEY_LIVEKIT_API_SECRET")
        return settings.livekit_url, settings.livekit_api_key, settings.livekit_api_secret

    @router.get("")
    async def livekit_info() -> dict[str, Any]:
        url, _, _ = configured()
        return {"url": url, "agent_name": settings.livekit_agent_name}

    @router.post("/token", response_model=TokenResponse)
    async def token(body: TokenRequest, request: Request) -> dict[str, str]:
        url, key, secret = configured()
        grant = grant_for(request, body.user_token, settings.auth_secret or "")
        if grant is not None:
            # A LiveKit token is a way into the room like an offer is: only for the room signed for.
            body = body.model_copy(update={"room": body.room or grant.room, "user_token": grant.store_token})
            require_room(grant, body.room)
        try:
            from livekit import api
        except ImportError:
            raise HTTPException(503, "LiveKit support is not installed on this server: "
                                     "pip install 'parley[livekit]'") from None
        for what, value in (("room", body.room), ("identity", body.identity)):
            if value is not None and not ROOM_ID.match(value):
                raise HTTPException(400, f"{what} must be 1-64 letters, digits, '.', '_' or '-'")
        try:
            session = build(body.persona, body.options)  # a bad persona is a 400 now, not a silent agent later
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        room = body.room or f"parley-{secrets.token_hex(6)}"
        identity = body.identity or f"user-{secrets.token_hex(6)}"
        metadata = {"persona": session.persona, "options": session.options, "participant": identity}
        if settings.livekit_agent_name:
            # Explicit dispatch by the token: when this participant creates the room, LiveKit brings the
            # agent in with this metadata, which only the agent sees.
            if body.user_token:
                metadata["user_token"] = body.user_token
            config = api.RoomConfiguration(agents=[api.RoomAgentDispatch(
                agent_name=settings.livekit_agent_name, metadata=json.dumps(metadata))])
        else:
            # Automatic dispatch (a worker with no agent name joins every room): the persona travels in
            # the room's metadata, which every participant can read, so no history token goes there.
            config = api.RoomConfiguration(metadata=json.dumps(metadata))
        jwt = (api.AccessToken(key, secret)
               .with_identity(identity)
               .with_name(body.name or identity)
               .with_ttl(TOKEN_TTL)
               .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                            can_publish_data=True))
               .with_room_config(config)
               .to_jwt())
        return {"url": url, "token": jwt, "room": room, "identity": identity}

    return router
