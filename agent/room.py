"""Rooms: one conversation each, reachable by one peer at a time.

A room outlives its peer connections: a page reload or an ICE restart attaches a new peer to the
same conversation. A room with no peer closes after a grace period; every task it started is
cancelled and awaited.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import time
import uuid
from typing import Any

from personas.catalog import PersonaSession, build
from personas.runtime import make_runtime
from pipeline.tasks import TaskSet
from pipeline import frames as F

from . import rtvi
from .config import Settings
from .engines import Engines
from .metrics import Metrics
from .recorder import Recorder
from .store import Store
from .peer import Peer, SignalingError
from .ratelimit import TokenBucket
from .session import SilenceHint, build_conversation, open_recorder

log = logging.getLogger(__name__)
ROOM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RoomError(Exception):
    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Room:
    def __init__(self, room_id: str, persona: PersonaSession, settings: Settings, engines: Engines,
                 on_empty: "callable", recorder: Recorder | None = None, metrics: Metrics | None = None,
                 owner: str | None = None):
        self.id = room_id
        # Whoever opened the room (their user token); only they can connect to it again.
        self.owner = owner
        self.persona = persona
        self.settings = settings
        self.engines = engines
        self.created = time.time()
        self.peer: Peer | None = None
        self._on_empty = on_empty
        self._client_ready = False
        self._greeted = False
        self._grace: asyncio.Task | None = None
        self._tasks = TaskSet(room_id)
        self._closed = False
        # Two seconds' worth of burst: a client sends a handful of messages at once when it connects.
        self._messages = TokenBucket(settings.max_messages_per_s, 2 * settings.max_messages_per_s)
        self._flooded = False
        self.recorder = recorder
        self.metrics = metrics
        # The persona is the conversation's LLM: it decides each turn and calls the real one.
        self.runtime = make_runtime(persona, engines.llm, engines.llm, self._on_persona)
        self.conversation = build_conversation(persona, settings, engines, self.runtime, self._on_event, room_id)
        self.conversation.player.on_ready = self._voice_ready
        self._hint = SilenceHint(self.runtime, self.conversation, lambda: self.peer is not None)
        self._log = logging.LoggerAdapter(log, {"room": room_id})
        self.closed = asyncio.Event()
        self._spawn(self._lifetime(), "lifetime")

    # -- peers

    def new_peer(self, pc_id: str) -> Peer:
        return Peer(pc_id, self.conversation.push_audio, self.conversation.read_frame,
                    self._on_message, self._on_peer_closed, self.settings.peer_media_timeout_s)

    def _voice_ready(self) -> None:
        if self.peer is not None:
            self.peer.voice.wake()

    async def attach(self, peer: Peer) -> None:
        old, self.peer = self.peer, peer
        self._client_ready = False
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if old is not None and old is not peer:
            await old.close()
        self._spawn(self._expect_connected(peer), "connect")

    async def _expect_connected(self, peer: Peer) -> None:
        """A client that never completes ICE must not hold a room forever."""
        try:
            await asyncio.wait_for(peer.connected.wait(), self.settings.connect_timeout_s)
        except TimeoutError:
            self._log.warning("peer %s did not connect within %.0fs", peer.pc_id, self.settings.connect_timeout_s)
            await peer.close()

    async def _lifetime(self) -> None:
        await asyncio.sleep(self.settings.max_session_s)  # the session's hard limit, not a wait for an event
        self._log.info("session reached its %.0fs limit", self.settings.max_session_s)
        self.send(rtvi.error("the session reached its time limit", fatal=True))
        await self._on_empty(self)

    def _spawn(self, coro, what: str) -> asyncio.Task:
        return self._tasks.spawn(coro, what)

    def _on_peer_closed(self, peer: Peer) -> None:
        if self.metrics is not None:
            self.metrics.peer_closed(peer)
        if peer is self.peer and not self._closed:
            self.peer = None
            self._grace = asyncio.get_running_loop().create_task(self._close_after_grace(), name=f"{self.id}:grace")

    async def _close_after_grace(self) -> None:
        await asyncio.sleep(self.settings.room_grace_s)  # a reconnect within this window keeps the room
        self._grace = None
        await self._on_empty(self)

    # -- messages

    def send(self, msg: dict[str, Any]) -> None:
        if self.peer is not None and self._client_ready:
            self.peer.send(json.dumps(msg))

    def _on_event(self, ev: F.Event) -> None:
        for msg in rtvi.from_event(ev):
            self.send(msg)
        if isinstance(ev, (F.TurnMetrics, F.ErrorEvent)):
            self._log_event(ev)
            if self.metrics is not None:
                self.metrics.observe(ev)
        if self.recorder is not None:
            self.recorder.on_event(ev)
        self.runtime.on_event(ev)
        self._hint.on_event(ev)

    def _log_event(self, ev: F.TurnMetrics | F.ErrorEvent) -> None:
        """One line per turn and per error, as key=value pairs; the adapter adds the room id."""
        if isinstance(ev, F.TurnMetrics):
            fields = " ".join(f"{k}={getattr(ev, k):.1f}" for k in ("stt_ms", "llm_ttft_ms", "tts_ttfb_ms",
                                                                    "voice_to_voice_ms", "pipeline_ms")
                              if getattr(ev, k) is not None)
            self._log.info("turn=%d metrics %s", ev.turn, fields)
        else:
            self._log.warning("turn=%d error source=%s: %s", self.conversation.turn, ev.source, ev.message)

    def _on_persona(self, payload: dict[str, Any]) -> None:
        self.send(rtvi.server_message(payload))
        if self.recorder is not None:
            self.recorder.on_persona(payload)

    async def _end_session(self, peer: Peer, request_id: str | None) -> None:
        result = await self.runtime.finish()
        peer.send(json.dumps(rtvi.message("server-response", {"t": "end-session", "d": result}, request_id)))

    def _on_message(self, peer: Peer, raw: str | bytes) -> None:
        if not self._messages.take():
            if not self._flooded:  # said once per flood, not once per dropped message
                self._flooded = True
                peer.send(json.dumps(rtvi.error(
                    f"too many messages: at most {self.settings.max_messages_per_s:g} a second; some were dropped")))
            return
        self._flooded = False
        try:
            msg = rtvi.parse(raw, self.settings.max_message_bytes)
        except rtvi.BadMessage as e:
            peer.send(json.dumps(rtvi.error(str(e))))
            return
        if msg is None:
            return
        match msg.type:
            case "client-ready":
                self._client_ready = True
                about = {"library": "parley", "room": self.id, "persona": self.persona.persona, **self.persona.options}
                if self.recorder is not None:
                    about["session_id"] = self.recorder.session_id  # for the report page link
                peer.send(json.dumps(rtvi.bot_ready(about)))
                peer.send(json.dumps(rtvi.server_message({"type": "state", "state": self.conversation.state.value})))
                if self.engines.stt_status.startswith("error"):
                    peer.send(json.dumps(rtvi.server_message({
                        "type": "notice", "text": "Speech recognition is unavailable on this server "
                        f"({self.engines.stt_status.removeprefix('error: ').splitlines()[0]}); you can still type."})))
                if not self._greeted:
                    self._greeted = True
                    self.conversation.start()
            case "send-text":
                content = msg.data.get("content")
                if isinstance(content, str) and content.strip():
                    self.conversation.push_text(content)
                else:
                    peer.send(json.dumps(rtvi.message("error-response", {"error": "send-text needs a non-empty 'content'"}, msg.id)))
            case "disconnect-bot":
                self._spawn(peer.close(), "disconnect")
            case "client-message" if msg.data.get("t") == "end-session":
                self._spawn(self._end_session(peer, msg.id), "end-session")
            case "client-message":
                peer.send(json.dumps(rtvi.message("error-response", {"error": f"unknown client message {msg.data.get('t')!r}"}, msg.id)))
            case _:  # as Pipecat's own server answers a type it does not handle
                peer.send(json.dumps(rtvi.message("error-response", {"error": f"unsupported message type {msg.type[:40]!r}"}, msg.id)))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hint.cancel()
        if self._grace is not None and self._grace is not asyncio.current_task():
            self._grace.cancel()
            await asyncio.gather(self._grace, return_exceptions=True)
        await self._tasks.aclose()
        if self.peer is not None:
            peer, self.peer = self.peer, None
            await peer.close()
        await self.conversation.aclose()
        await self.runtime.aclose()
        if self.recorder is not None:
            await self.recorder.close("completed")
        self.closed.set()
        self._log.info("room closed after %d turns", sum(1 for m in self.conversation.history if m["role"] == "user"))


_heap_frozen = False


def freeze_startup_heap() -> None:
    """Once per process, before the first room: what start-up loaded (modules, models, the persona
    catalog) lives as long as the process, and the cyclic collector re-scanned all of it in every
    full collection: 90-130 ms with the event loop stopped at 30 rooms (bench/rooms.py), every room's
    voice late at once. ``gc.freeze()`` moves it out of the collector's sight (17 ms after)."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


class RoomManager:
    def __init__(self, settings: Settings, engines: Engines, store: Store | None = None,
                 metrics: Metrics | None = None):
        freeze_startup_heap()
        self.settings = settings
        self.engines = engines
        self.store = store
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}
        self.peers: dict[str, tuple[Peer, Room]] = {}
        self._lock = asyncio.Lock()

    async def offer(self, sdp: str, type_: str, pc_id: str | None, restart: bool, room_id: str | None,
                    persona: str | None, options: dict[str, Any], user_token: str | None = None) -> dict[str, str]:
        if not isinstance(sdp, str) or not sdp.strip():
            raise RoomError(400, "the offer needs a non-empty 'sdp'")
        async with self._lock:  # one signaling change at a time keeps room/peer maps consistent
            known = self.peers.get(pc_id) if pc_id else None
            if known is not None and not restart and not known[0].closed:
                peer, room = known  # renegotiation on the live connection
                return await self._answer(peer, room, sdp, type_, fresh=False)
            if known is not None:
                room = known[1]  # a restart: a new connection for the same conversation
            else:
                room = self.rooms.get(room_id or "") if room_id else None
                if room is None:
                    room = await self._create_room(room_id, persona, options, user_token)
            if room.owner != user_token:
                # Not a 404: the name is taken, and saying so lets the person pick another.
                raise RoomError(409, f"room {room.id!r} is in use by someone else; choose another room name")
            peer = room.new_peer(pc_id or uuid.uuid4().hex)
            return await self._answer(peer, room, sdp, type_, fresh=True)

    async def _answer(self, peer: Peer, room: Room, sdp: str, type_: str, fresh: bool) -> dict[str, str]:
        try:
            answer = await peer.answer(sdp, type_)
        except SignalingError as e:
            if fresh:
                await peer.pc.close()
                if room.peer is None and not room.conversation.history:
                    await self._drop(room)
            raise RoomError(400, str(e)) from e
        if fresh:
            self.peers[peer.pc_id] = (peer, room)
            await room.attach(peer)
        return {"sdp": answer.sdp, "type": answer.type, "pc_id": peer.pc_id, "room": room.id}

    async def _create_room(self, room_id: str | None, persona: str | None, options: dict[str, Any],
                           user_token: str | None) -> Room:
        if room_id is not None and not ROOM_ID.match(room_id):
            raise RoomError(400, "room ids are 1-64 letters, digits, '.', '_' or '-'")
        if len(self.rooms) >= self.settings.max_rooms:
            raise RoomError(503, f"the server is full ({self.settings.max_rooms} rooms); try again later",
                            retry_after_s=30)
        try:
            session = build(persona, options)
        except ValueError as e:
            raise RoomError(400, str(e)) from e
        room_id = room_id or uuid.uuid4().hex[:12]
        recorder = None
        if self.store is not None:
            # Without a token the conversation is still saved, under a fresh anonymous user.
            session, recorder = await open_recorder(self.store, self.settings, room_id, session, user_token)
        room = Room(room_id, session, self.settings, self.engines, self._drop, recorder, self.metrics,
                    owner=user_token)
        self.rooms[room.id] = room
        log.info("room %s opened (%s %s)", room.id, session.persona, session.options)
        return room

    async def add_candidates(self, pc_id: str, candidates: list[dict[str, Any]]) -> None:
        entry = self.peers.get(pc_id)
        if entry is None:
            raise RoomError(404, f"unknown pc_id {pc_id!r}")
        peer = entry[0]
        if peer.closed:
            raise RoomError(409, f"connection {pc_id!r} is closed; send a new offer")
        for c in candidates:
            if not isinstance(c, dict) or not isinstance(c.get("candidate"), str):
                raise RoomError(400, "each candidate needs a 'candidate' string")
            try:
                await peer.add_candidate(c["candidate"], c.get("sdp_mid"), c.get("sdp_mline_index"))
            except SignalingError as e:
                raise RoomError(400, str(e)) from e

    async def _drop(self, room: Room) -> None:
        dropped = self.rooms.get(room.id) is room
        if dropped:
            del self.rooms[room.id]
        for pc_id in [k for k, (_, r) in self.peers.items() if r is room]:
            del self.peers[pc_id]
        await room.close()
        if dropped and self.metrics is not None:
            self.metrics.room_closed(room)

    async def close_all(self) -> None:
        await asyncio.gather(*(self._drop(r) for r in list(self.rooms.values())), return_exceptions=True)
