"""A local OpenAI-compatible chat-completions server (the real HTTP + SSE protocol) for tests.

Stands in for the paid LLM API only. Each test scripts its behaviour: the reply text, a status
code, a hang, a delay before the first token; every request body is recorded.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Behaviour:
    reply: str = "That is interesting. Tell me more about it."
    status: int = 200
    hang: bool = False  # accept the request and never answer
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    chunk_words: int = 1  # words per SSE chunk


@dataclass
class FakeLLM:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict] = field(default_factory=list)
    # Per-request replies, used in order before falling back to ``behaviour.reply``.
    script: list[str] = field(default_factory=list)
    reply_for: object = None  # optional callable(request) -> reply text
    # Optional callable(request) -> Behaviour or None: faults for some requests only (one room's, say).
    behaviour_for: object = None
    # Per-request HTTP statuses, used in order before falling back to ``behaviour.status``.
    statuses: list[int] = field(default_factory=list)
    # Indices (into ``requests``) of the requests whose client hung up before the reply ended.
    cancelled: list[int] = field(default_factory=list)
    port: int = 0  # 0: any free port
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> "FakeLLM":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        # A client that hangs up cancels its handler at once, so ``cancelled`` records it.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner:
            await self._runner.cleanup()

    async def _pause(self, seconds: float) -> None:
        """Simulated model latency (not a wait for an event); cut short when the server stops."""
        try:
            await asyncio.wait_for(self._release.wait(), seconds)
        except TimeoutError:
            pass

    async def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        """Until ``n`` requests have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_cancelled(self, n: int, timeout: float = 10.0) -> None:
        """Until ``n`` requests have been abandoned by their client."""
        async with asyncio.timeout(timeout):
            while len(self.cancelled) < n:
                self._hung_up.clear()
                await self._hung_up.wait()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self._arrived.set()
        index = len(self.requests) - 1
        try:
            return await self._answer(request, body)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.append(index)
            self._hung_up.set()
            raise

    async def _answer(self, request: web.Request, body: dict) -> web.StreamResponse:
        b = (self.behaviour_for(body) if callable(self.behaviour_for) else None) or self.behaviour
        if b.hang:
            await self._release.wait()
            return web.Response(status=503)
        status = self.statuses.pop(0) if self.statuses and b is self.behaviour else b.status
        if status != 200:
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}}, status=status)
        if callable(self.reply_for):
            text = self.reply_for(body)
        else:
            text = self.script.pop(0) if self.script else b.reply
        if not body.get("stream"):
            # A plain (structured-output) completion: one JSON body, no SSE.
            return web.json_response({
                "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "test"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if b.first_token_delay_s:
            await self._pause(b.first_token_delay_s)
        words = text.split(" ")
        for i in range(0, len(words), b.chunk_words):
            piece = " ".join(words[i : i + b.chunk_words]) + (" " if i + b.chunk_words < len(words) else "")
            await resp.write(_sse(body, {"content": piece}))
            if b.token_delay_s:
                await self._pause(b.token_delay_s)
        await resp.write(_sse(body, {}, finish="stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _sse(body: dict, delta: dict, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": body.get("model", "test"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def last_user(body: dict) -> str:
    """The person's latest words in a chat request (the persona appends its own instruction after them)."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
