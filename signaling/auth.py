"""Optional access control: signed room tokens.

With ``PARLEY_AUTH_SECRET`` set, the signaling and data routes need a JWT signed with it (HS256)
whose claims are ``sub`` (the user), ``room`` (the one room it opens) and ``exp``; the audience is
``parley`` so that a token minted for another service sharing the secret (a LiveKit token, say) is
never accepted here. The embedding application mints tokens on its own server (`parley token`
shows how); the browser presents one as ``Authorization: Bearer`` or, on the offer, as
``requestData.user_token``. Without the secret, Parley is open as on a laptop and the anonymous
browser token only scopes history.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
from fastapi import HTTPException, Request

AUDIENCE = "parley"
ALGORITHM = "HS256"
LEEWAY_S = 5  # clocks of the minting server and this one may differ a little


@dataclass(frozen=True)
class Grant:
    user: str
    room: str

    @property
    def store_token(self) -> str:
        """The key of this user's history: namespaced so that no anonymous browser token can collide."""
        return f"jwt:{self.user}"


def mint(secret: str, user: str, room: str, ttl_s: float = 3600.0) -> str:
    now = int(time.time())
    claims = {"sub": user, "room": room, "aud": AUDIENCE, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Grant:
    """The grant in a valid token; HTTP 401 with the reason otherwise."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], audience=AUDIENCE, leeway=LEEWAY_S,
                            options={"require": ["exp", "sub", "room"]})
    except jwt.ExpiredSignatureError:
        raise _unauthorized("the token has expired") from None
    except jwt.PyJWTError as e:
        raise _unauthorized(f"invalid token: {e}") from None
    user, room = claims.get("sub"), claims.get("room")
    if not isinstance(user, str) or not user or not isinstance(room, str) or not room:
        raise _unauthorized("invalid token: 'sub' and 'room' must be non-empty strings")
    return Grant(user, room)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


def grant_for(request: Request, token: str | None = None, secret: str | None = None) -> Grant | None:
    """None when access control is off; the caller's grant when on (401 without a valid token).
    ``token`` is one found in the body, used when there is no Authorization header; ``secret``
    defaults to the app's settings."""
    secret = secret if secret is not None else request.app.state.settings.auth_secret
    if not secret:
        return None
    token = bearer(request) or token
    if not token:
        raise _unauthorized("this server needs a room token: send 'Authorization: Bearer <token>'")
    return verify(secret, token)


def require_room(grant: Grant | None, room_id: str) -> None:
    if grant is not None and grant.room != room_id:
        raise HTTPException(403, "this token is for another room")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
