"""The front of ``parley serve --workers N``: one address, each room's signaling on one worker.

A room lives in one worker process (its peers, its pipeline, its recorder), so every request about
a room must reach that worker: ``POST /api/offer`` goes to the worker already holding the room (or
the connection, for a renegotiation), else to the least loaded one; ``PATCH /api/offer`` follows
the connection's ``pc_id``; ``/api/rooms/{id}`` follows the room. What the front learns comes from
the workers' own answers (an offer's answer names its room and connection). Everything else (pages,
history, personas, LiveKit tokens) reads the shared database and goes to any worker, in turn.
``/healthz`` and ``/metrics`` speak for the whole server: each worker's figures, labelled
``worker``.

The workers listen on Unix sockets only the front can reach and trust its ``X-Forwarded-For``, so
per-address limits see the browser's address. Those limits are counted per worker.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("parley.front")

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}
_ROOM_PATH = re.compile(r"^/api/rooms/([^/]+)$")
MAX_ROUTES = 100_000  # remembered rooms and connections (oldest forgotten first)
LOAD_POLL_S = 2.0


class _Routes:
    """Bounded memory of which worker holds a key (a room, a connection)."""

    def __init__(self, limit: int = MAX_ROUTES):
        self._map: OrderedDict[str, int] = OrderedDict()
        self.limit = limit

    def get(self, key: Any) -> int | None:
        if not isinstance(key, str) or key not in self._map:
            return None
        self._map.move_to_end(key)
        return self._map[key]

    def put(self, key: Any, worker: int) -> None:
        if isinstance(key, str) and key:
            self._map[key] = worker
            self._map.move_to_end(key)
            while len(self._map) > self.limit:
                self._map.popitem(last=False)

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key in self._map

    def forget_worker(self, worker: int) -> None:
        for key in [k for k, w in self._map.items() if w == worker]:
            del self._map[key]


class Front:
    def __init__(self, sockets: list[str], *, max_body_bytes: int, timeout_s: float = 30.0,
                 pids: Callable[[], list[int | None]] = lambda: [],
                 restarts: Callable[[], dict[str, int]] = lambda: {}):
        self.pids, self.restarts = pids, restarts
        self.clients = [httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://worker",
                                          timeout=timeout_s) for path in sockets]
        self.max_body_bytes = max_body_bytes
        self.rooms = _Routes()
        self.peers = _Routes()
        self.load = [0] * len(sockets)  # rooms per worker: polled, plus the offers placed since
        self._turn = itertools.count()

    def worker_gone(self, worker: int) -> None:
        """A worker process exited: its rooms and connections went with it."""
        self.rooms.forget_worker(worker)
        self.peers.forget_worker(worker)
        self.load[worker] = 0

    def _any(self) -> int:
        return next(self._turn) % len(self.clients)

    def _least_loaded(self) -> int:
        start = self._any()  # ties go round the workers
        order = [(start + k) % len(self.clients) for k in range(len(self.clients))]
        return min(order, key=lambda w: self.load[w])

    def route(self, request: Request, body: bytes) -> int:
        path = request.url.path
        if path == "/api/offer":
            try:
                data = json.loads(body) if body else {}
            except ValueError:
                data = {}
            if not isinstance(data, dict):
                data = {}
            if request.method == "PATCH":
                w = self.peers.get(data.get("pc_id"))
                return w if w is not None else self._any()  # unknown: a worker says so
            w = self.peers.get(data.get("pc_id"))
            if w is not None:
                return w
            extra = data.get("requestData") if isinstance(data.get("requestData"), dict) else {}
            room = (extra.get("room") or extra.get("room_id") or request.query_params.get("room")
                    or _token_room(request, extra.get("user_token")))
            w = self.rooms.get(room)
            if w is None:
                w = self._least_loaded()
                if isinstance(room, str) and room:
                    # Placed now, not when the answer comes: a second offer for the same room while
                    # the first is being answered must not open a namesake room in another worker.
                    self.rooms.put(room, w)
                    self.load[w] += 1  # until the next poll says how many rooms it really holds
            return w
        m = _ROOM_PATH.match(path)
        if m:
            w = self.rooms.get(m.group(1))
            return w if w is not None else self._any()
        return self._any()

    def learn(self, request: Request, worker: int, response: httpx.Response, content: bytes) -> None:
        if request.url.path != "/api/offer" or request.method != "POST" or response.status_code != 200:
            return
        try:
            answer = json.loads(content)
        except ValueError:
            return
        if isinstance(answer, dict):
            if answer.get("room") not in self.rooms:
                self.load[worker] += 1  # a room the worker named itself (the offer named none)
            self.rooms.put(answer.get("room"), worker)
            self.peers.put(answer.get("pc_id"), worker)

    async def _body(self, request: Request) -> bytes | None:
        """The request body, or None past the size limit (read no further than it)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def proxy(self, request: Request) -> Response:
        try:
            body = await self._body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        if body is None:
            return JSONResponse({"detail": f"request body larger than {self.max_body_bytes} bytes"}, 413)
        worker = self.route(request, body)
        # The front's own uvicorn already resolved the browser's address (FORWARDED_ALLOW_IPS):
        # the workers hear it from the front alone, never from a header the browser sent.
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in _HOP_BY_HOP | {"x-forwarded-for", "x-forwarded-proto"}]
        client = request.client.host if request.client else ""
        headers += [("x-forwarded-for", client), ("x-forwarded-proto", request.url.scheme)]
        try:
            upstream = await self.clients[worker].request(
                request.method, request.url.path, params=request.query_params.multi_items(), content=body,
                headers=headers)
        except httpx.TransportError as e:
            log.warning("worker %d unreachable for %s %s: %s", worker, request.method, request.url.path, e)
            return JSONResponse({"detail": "the agent process for this request is restarting; try again"}, 503,
                                headers={"Retry-After": "1"})
        content = upstream.content
        self.learn(request, worker, upstream, content)
        out = Response(content, status_code=upstream.status_code)
        out.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.multi_items()
                           if k.lower() not in _HOP_BY_HOP | {"content-encoding"}]
        out.raw_headers.append((b"content-length", str(len(content)).encode()))
        return out

    async def each(self, path: str) -> list[httpx.Response | None]:
        """GET ``path`` from every worker at once (None where one did not answer)."""
        async def one(client: httpx.AsyncClient) -> httpx.Response | None:
            try:
                return await client.get(path, timeout=5.0)
            except httpx.TransportError:
                return None

        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    async def healthz(self, request: Request) -> Response:
        workers = []
        pids = self.pids()
        for i, r in enumerate(await self.each("/healthz")):
            pid = {"pid": pids[i]} if i < len(pids) else {}
            if r is not None and r.status_code == 200:
                workers.append({"worker": i, **pid, **r.json()})
            else:
                workers.append({"worker": i, **pid, "status": "down"})
        up = [w for w in workers if w.get("status") == "ok"]
        body = {"status": "ok" if len(up) == len(workers) else ("degraded" if up else "down"),
                "rooms": sum(w.get("rooms", 0) for w in up), "workers": workers}
        return JSONResponse(body, status_code=200 if up else 503)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        texts = {i: r.text for i, r in enumerate(await self.each("/metrics")) if r is not None and r.status_code == 200}
        restarts = "".join(f'parley_process_restarts_total{{process="{_escape(name)}"}} {n}.0\n'
                           for name, n in self.restarts().items())
        own = ("# HELP parley_process_restarts_total Times the front started a child process again after it exited\n"
               "# TYPE parley_process_restarts_total counter\n" + restarts) if restarts else ""
        return Response(merge_metrics(texts) + own, media_type=CONTENT_TYPE_LATEST)

    async def poll_load(self) -> None:
        """Keep the rooms-per-worker figures true (rooms end without telling the front)."""
        while True:
            for i, r in enumerate(await self.each("/healthz")):
                if r is not None and r.status_code == 200:
                    self.load[i] = int(r.json().get("rooms", 0))
            await asyncio.sleep(LOAD_POLL_S)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


def _token_room(request: Request, body_token: Any) -> str | None:
    """The room a signed room token names, for routing only: the worker verifies the token."""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else body_token
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    try:
        import jwt

        room = jwt.decode(token, options={"verify_signature": False}).get("room")
    except Exception:  # noqa: BLE001 - not a token we can read: the worker will say so
        return None
    return room if isinstance(room, str) else None


def merge_metrics(texts: dict[int, str]) -> str:
    """Several processes' Prometheus expositions as one, each sample labelled with its worker."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for worker, text in texts.items():
        for fam in text_string_to_metric_families(text):
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                labels = {**s.labels, "worker": str(worker)}
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{inner}}} {_number(s.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        if kind == "counter":
            name += "_total"  # as prometheus_client writes a counter: its samples carry the suffix
        out.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def create_front(settings, n_workers: int, *, worker_argv=None, stt_worker: bool | None = None) -> Starlette:
    """The front app; its lifespan starts the worker processes and stops them. ``worker_argv`` and
    ``stt_worker``: see ``WorkerPool`` (the benchmarks run their own instrumented workers)."""
    from agent.workers import WorkerPool

    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await _migrate_once(settings)
        front: Front | None = None
        pool = WorkerPool(settings, n_workers,
                          stt_worker=_wants_stt_worker(settings) if stt_worker is None else stt_worker,
                          on_worker_exit=lambda i: front.worker_gone(i) if front is not None else None,
                          worker_argv=worker_argv)
        await pool.start()
        front = state["front"] = app.state.front = Front(
            pool.sockets, max_body_bytes=settings.max_body_bytes,
            pids=lambda: [w.proc.pid if w.proc else None for w in pool.workers],
            restarts=lambda: {c.name: c.restarts for c in ([pool.stt] if pool.stt else []) + pool.workers})
        poller = asyncio.create_task(front.poll_load(), name="worker load")
        log.info("front ready: %d agent workers%s", n_workers, ", one shared STT worker" if pool.stt else "")
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await front.aclose()
            await pool.stop()

    async def proxy(request: Request) -> Response:
        return await state["front"].proxy(request)

    async def healthz(request: Request) -> Response:
        return await state["front"].healthz(request)

    async def metrics(request: Request) -> Response:
        return await state["front"].metrics(request)

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(lifespan=lifespan, routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/{path:path}", proxy, methods=methods),
    ])


def _wants_stt_worker(settings) -> bool:
    """Share one Whisper among the workers unless a shared one is configured already."""
    return not settings.stt_worker


async def _migrate_once(settings) -> None:
    """Migrate the database before the workers open it: SQLite has no lock to make N processes
    migrating an empty file at once take turns (PostgreSQL's advisory lock does)."""
    from agent.store import open_store

    try:
        store = await open_store(settings.database_url)
    except Exception as e:
        log.error("cannot open the database (the workers will run without history): %s", e)
        return
    await store.close()
