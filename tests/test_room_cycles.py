"""Rooms opened and closed thousands of times leave nothing behind: no task, thread, file
descriptor, Room object or memory growth.

Two scales: ~1500 in-process cycles through ``RoomManager.offer`` with a real SDP offer (a real
aiortc Peer answers it: ICE gathering binds sockets, a DTLS certificate is made), some with the
greeting in flight (real LLM HTTP stream and TTS cancelled mid-way) and some restarted (a second
peer for the same room); then ~100 full WebRTC cycles (ten rooms at a time) against the running server (ICE, DTLS, SCTP,
the RTVI handshake, the agent's voice) with clients that close, so that rooms close after their
grace period. Counts are taken after a warm-up, since first use fills caches (models, codecs, the
persona catalog) that live as long as the process.

PARLEY_ROOM_CYCLES and PARLEY_WEBRTC_CYCLES change the counts.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import uuid
import weakref

import psutil
import pytest

CHEAP_CYCLES = int(os.environ.get("PARLEY_ROOM_CYCLES", "1500"))
WEBRTC_CYCLES = int(os.environ.get("PARLEY_WEBRTC_CYCLES", "100"))
CLIENT_READY = json.dumps({"label": "rtvi-ai", "type": "client-ready", "id": "r", "data": {"version": "2.1.0"}})


def open_fds(ignore_ports: set[int] = frozenset()) -> set[str]:
    """What each descriptor points at (a socket, a file), so a failure says what leaked. Sockets to
    or from ``ignore_ports`` (the stand-in LLM server in this process: its client keeps a pool of
    keep-alive connections) are not counted."""
    sockets = {c.fd: c for c in psutil.Process().net_connections(kind="all")}
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        c = sockets.get(int(fd))
        ports = {a.port for a in (c.laddr, c.raddr) if a and not isinstance(a, str)} if c else set()
        if ports & ignore_ports:
            continue
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass  # the listing's own descriptor, closed already
    return out


DB_FILES = ("parley.db", "parley.db-wal", "parley.db-shm")
POOL_THREADS = 20  # the bound on what pools below may hold between them at any time


def pooled(thread: threading.Thread) -> bool:
    """Threads of process-wide pools that grow to a bound on demand, not one per room: the event
    loop's default executor (this test's own joins run there), SQLAlchemy's pool of aiosqlite
    connections (a thread each), the shared Whisper engine's batcher (started at the first speech)."""
    return (thread.name.startswith(("asyncio_", "whisper-"))
            or "_connection_worker_thread" in thread.name)


def stand_in(task: asyncio.Task) -> bool:
    """The stand-in LLM server's handler of one keep-alive connection (aiohttp, in this process)."""
    return getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start"


class Resources:
    def __init__(self, ignore_ports: set[int] = frozenset(), held=set) -> None:
        """``held``: the descriptors the engines keep by design at that moment (espeak-ng's spare
        processes' pipes: one process per recent voice, replaced at every sentence)."""
        gc.collect()
        self.ignore_ports = ignore_ports
        self.held = held
        self.tasks = set(asyncio.all_tasks())
        self.threads = set(threading.enumerate())
        self.fds = self._fds()
        self.rss = psutil.Process().memory_info().rss

    async def settle(self, timeout: float = 15.0) -> None:
        """Let what the cycles started finish (tasks and threads that end a few loop turns after a
        close): waits on them, with a timeout; whatever is still running afterwards has leaked."""
        me = asyncio.current_task()
        tasks = {t for t in asyncio.all_tasks() - self.tasks - {me} if not stand_in(t)}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        threads = [t for t in threading.enumerate() if t not in self.threads and not pooled(t)]
        for t in threads:
            await asyncio.to_thread(t.join, timeout)

    def _fds(self) -> set[str]:
        held = {str(fd) for fd in self.held()}
        return {f for f in open_fds(self.ignore_ports) if f.split("->")[0] not in held}

    def growth(self) -> dict:
        gc.collect()
        me = asyncio.current_task()
        known = {f.split("->")[0] for f in self.fds}
        fds = [f for f in self._fds() if f.split("->")[0] not in known]
        return {
            "tasks": sorted(f"{t.get_name()} {t.get_coro()!r:.120}" for t in asyncio.all_tasks() - self.tasks - {me}
                            if not stand_in(t)),
            "threads": sorted(t.name for t in set(threading.enumerate()) - self.threads if not pooled(t)),
            "pool_threads": sum(1 for t in threading.enumerate() if pooled(t)),
            "fds": sorted(f for f in fds if not f.endswith(DB_FILES)),
            # SQLite's files, open once per pooled connection (the pool grows with concurrency)
            "pool_fds": sum(1 for f in fds if f.endswith(DB_FILES)),
            "rss_mb": round((psutil.Process().memory_info().rss - self.rss) / 2**20, 1),
        }


def assert_no_leaks(growth: dict, rss_limit_mb: float) -> None:
    assert growth["tasks"] == [], f"tasks left running: {growth['tasks'][:20]}"
    assert growth["threads"] == [], f"threads left running: {growth['threads'][:20]}"
    assert growth["pool_threads"] <= POOL_THREADS, f"{growth['pool_threads']} threads in the shared pools"
    assert growth["fds"] == [], f"file descriptors left open: {growth['fds'][:20]}"
    assert growth["pool_fds"] <= 3 * POOL_THREADS, f"{growth['pool_fds']} more database files open"
    assert growth["rss_mb"] < rss_limit_mb, f"RSS grew {growth['rss_mb']} MB"


def fake_llm_port(llm) -> int:
    return int(llm.url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
def linux_proc():
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip(reason="counts open file descriptors through /proc/self/fd (Linux)")


async def offer_sdp() -> str:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="sendrecv")
    pc.createDataChannel("chat")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_thousands_of_room_cycles_leave_no_tasks_threads_fds_or_rooms(
        linux_proc, loopback_ice, tiny_whisper_path, fake_llm, tmp_path):
    from agent.config import Settings
    from agent.engines import Engines
    from agent.room import RoomManager
    from agent.store import open_store
    from pipeline.tts import EspeakTTS
    from pipeline_setup import llm, whisper

    settings = Settings(stt_model=str(tiny_whisper_path), stt_device="cpu", llm_base_url=fake_llm.url,
                        llm_api_key="test", llm_model="test-model", tts="espeak", max_rooms=10,
                        audio_dir=str(tmp_path / "audio"), _env_file=None)
    engines = Engines(stt=whisper(tiny_whisper_path), tts=EspeakTTS(), llm=llm(fake_llm.url), stt_status="ready")
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/parley.db")
    manager = RoomManager(settings, engines, store)
    sdp = await offer_sdp()
    fake_llm.behaviour.token_delay_s = 0.05  # replies stream for a while: closes cut them off
    rooms: list[weakref.ref] = []
    greeted = 0

    async def cycle(i: int) -> None:
        nonlocal greeted
        room_id = f"cycle-{i}"
        persona, options = ("teacher", {"language": "fr"}) if i % 3 else ("interviewer", {"role": "software-engineer-backend"})
        answer = await manager.offer(sdp, "offer", None, False, room_id, persona, options, user_token=f"user-{i % 7}")
        room = manager.rooms[room_id]
        rooms.append(weakref.ref(room))
        if i % 25 == 0:  # a page reload: a new connection for the same conversation
            answer = await manager.offer(sdp, "offer", answer["pc_id"], True, room_id, persona, options,
                                         user_token=f"user-{i % 7}")
        if i % 10 == 0:  # the greeting starts (the TTS), cut off by the close
            peer = manager.peers[answer["pc_id"]][0]
            room._on_message(peer, CLIENT_READY)
            greeted += 1
            if i % 20 == 0:  # and a typed turn whose LLM stream is still running at the close
                room._on_message(peer, json.dumps({"label": "rtvi-ai", "type": "send-text",
                                                   "data": {"content": "Tell me more."}}))
                await fake_llm.wait_requests(len(fake_llm.requests) + 1)
        await manager._drop(room)
        assert room.closed.is_set() and room_id not in manager.rooms

    try:
        warm_up = min(100, CHEAP_CYCLES // 5)
        for i in range(warm_up):
            await cycle(i)
        before = Resources(ignore_ports={fake_llm_port(fake_llm)}, held=engines.tts.spare_fds)
        objects0 = len(gc.get_objects())
        for i in range(warm_up, CHEAP_CYCLES):
            await cycle(i)
        await before.settle()
        growth = before.growth()
        growth["python_objects"] = len(gc.get_objects()) - objects0
        alive = [r() for r in rooms if r() is not None]
        assert manager.rooms == {} and manager.peers == {}
        assert alive == [], f"{len(alive)} closed rooms are still referenced: {gc.get_referrers(alive[0])[:3]!r:.500}"
        assert greeted >= CHEAP_CYCLES // 10
        assert growth["python_objects"] < 3000, f"{growth['python_objects']} more Python objects"
        # Python's allocator keeps freed arenas; what a leak of ~1 KB per room would show is > 1.5 MB.
        assert_no_leaks(growth, rss_limit_mb=24)
        print(f"{CHEAP_CYCLES} cycles: {growth}", file=sys.stderr)
    finally:
        await manager.close_all()
        await store.close()
        await engines.aclose()


@pytest.fixture
def no_rate_limits(monkeypatch):
    """Fifty offers in a few seconds from one address is this test, not an attack."""
    monkeypatch.setenv("PARLEY_SIGNALING_RATE_PER_MIN", "1000000")
    monkeypatch.setenv("PARLEY_SIGNALING_BURST", "1000000")


async def test_full_webrtc_room_cycles_leave_nothing_behind(linux_proc, no_rate_limits, parley_server, speech):
    from webrtc_client import Client

    rooms = parley_server.app_state.rooms
    rooms.settings.room_grace_s = 0.2  # rooms whose client left close at once: the cycles are the point
    audio = speech("en_goforward.wav")
    batch = 10
    closed: list[weakref.ref] = []

    async def cycle(n: int) -> None:
        clients = [Client(parley_server.url, audio, room=f"rt-{n}-{i}-{uuid.uuid4().hex[:4]}") for i in range(batch)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            await asyncio.gather(*(c.wait_for(lambda c: c.of("bot-ready")) for c in clients))
            opened = [rooms.rooms[c.room] for c in clients]
            closed.extend(weakref.ref(x) for r in opened for x in (r, r.peer, r.conversation))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        async with asyncio.timeout(20):  # the server sees each peer go, then the grace period ends
            await asyncio.gather(*(r.closed.wait() for r in opened))

    # Python objects, counted: the shared STT engine's native buffers grow in steps at its first
    # batches (tens of MB of RSS at a time that no room holds), which would drown a per-room leak;
    # a leaked room holds thousands of objects. (tracemalloc would slow the media paths fivefold.)
    for n in range(2):  # warm-up
        await cycle(n)
    before = Resources(ignore_ports={fake_llm_port(parley_server.llm)},
                       held=parley_server.app_state.engines.tts.spare_fds)
    objects0 = len(gc.get_objects())
    cycles = max(3, WEBRTC_CYCLES // batch)
    for n in range(2, cycles):
        await cycle(n)
    await before.settle()
    growth = before.growth()
    growth["python_objects"] = len(gc.get_objects()) - objects0
    print(f"{cycles * batch} WebRTC cycles: {growth}", file=sys.stderr)
    assert rooms.rooms == {} and rooms.peers == {}
    alive = [r() for r in closed if r() is not None]
    assert alive == [], f"{len(alive)} rooms, peers or conversations of closed rooms are still referenced"
    assert growth["python_objects"] < 3000, f"{growth['python_objects']} more Python objects"
    assert_no_leaks(growth, rss_limit_mb=120)  # a gross leak only: see above
