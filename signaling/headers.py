"""Security headers on every HTTP response, as plain ASGI middleware (no body buffering)."""
from __future__ import annotations

from urllib.parse import urlsplit



def _is_page(path: str) -> bool:
    """Parley's own documents, which get the content policy. (A policy only means something on a
    document; FastAPI's /docs load Swagger UI from a CDN with inline scripts and go without.)"""
    return path in ("/", "/history") or path.startswith("/sessions/")


def content_security_policy(frame_ancestors: str, livekit_url: str | None) -> str:
    connect = ["'self'"]
    if livekit_url:
        # livekit-client opens a WebSocket to the LiveKit server (and its HTTP twin for region pings).
        u = urlsplit(livekit_url)
        host = u.netloc
        secure = u.scheme in ("wss", "https")
        connect += [f"{'wss' if secure else 'ws'}://{host}", f"{'https' if secure else 'http'}://{host}"]
        if host.endswith(".livekit.cloud"):
            # LiveKit Cloud moves a client to another region's host when one fails.
            connect += ["wss://*.livekit.cloud", "https://*.livekit.cloud"]
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob: mediastream:",
        "connect-src " + " ".join(connect),
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        f"frame-ancestors {frame_ancestors}",
    ])


class SecurityHeaders:
    def __init__(self, app, csp: str):
        self.app = app
        self.common = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            # The page needs the microphone and nothing else a browser can grant.
            (b"permissions-policy", b"microphone=(self), camera=(), geolocation=(), payment=()"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        self.csp = [(b"content-security-policy", csp.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = self.common + self.csp if _is_page(scope.get("path", "")) else self.common

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
