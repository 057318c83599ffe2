"""`parley livekit`: Parley's conversation in LiveKit rooms, as a LiveKit Agents worker.

livekit-agents does the worker's job: it registers with the LiveKit server, is dispatched into rooms,
runs each job in a thread of this process (so every room shares one Whisper, loaded once before
the worker registers; ``prewarm`` readies each job's engines), reports our load to the dispatcher and drains on SIGTERM. This module is the transport: the
person's microphone (``rtc.AudioStream``, 48 kHz) into ``Conversation.push_audio``, the agent's
voice out of ``Conversation.read_frame`` into a published ``rtc.AudioSource`` on a 20 ms clock, and
pipeline events as LiveKit's own conventions (what livekit-agents' room I/O writes), so LiveKit's
stock front ends and the Agents Playground work unchanged:

- transcripts on the ``lk.transcription`` text stream: the person's as one stream per update of a
  segment (``lk.transcription_final`` "false" then "true", same ``lk.segment_id``), the agent's as
  one delta stream per reply closed with ``lk.transcription_final`` "true"; both carry
  ``lk.transcribed_track_id`` (the speaker's microphone track) and are sent on behalf of the speaker;
- the agent's state in its participant attribute ``lk.agent.state`` (listening/thinking/speaking);
- typed messages on ``lk.chat`` become typed turns.

Parley's own extras: persona messages (feedback, corrections, scorecard) as JSON on the
``parley.persona`` text stream, and a ``parley.end_session`` RPC that returns the scorecard.

Room or job (dispatch) metadata is JSON: ``{"persona": ..., "options": {...}, "participant": ...,
"user_token": ...}``; the job's wins. The agent talks with ``participant`` (the token endpoint puts
the requesting identity there), else ``PARLEY_LIVEKIT_PARTICIPANT``, else the first person to join,
and hears nobody else unless ``PARLEY_LIVEKIT_LISTEN_ALL`` mixes every participant in.

No LiveKit type reaches ``pipeline/``: frames are converted at this boundary.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobProcess
from livekit.agents.types import (
    ATTRIBUTE_AGENT_STATE, ATTRIBUTE_TRANSCRIPTION_FINAL, ATTRIBUTE_TRANSCRIPTION_SEGMENT_ID,
    ATTRIBUTE_TRANSCRIPTION_TRACK_ID, TOPIC_CHAT, TOPIC_TRANSCRIPTION,
)
from livekit.agents.utils import shortuuid
from livekit.agents.voice import io
from livekit.agents.voice.transcription import find_micro_track_id

from personas.catalog import PersonaSession, build
from personas.runtime import make_runtime
from pipeline import frames as F
from pipeline.frames import OUTPUT_FRAME_SAMPLES, OUTPUT_RATE
from pipeline.tasks import TaskSet

from .config import Settings, get_settings
from .engines import Engines, build_engines
from .recorder import Recorder
from .session import SilenceHint, build_conversation, open_recorder

log = logging.getLogger(__name__)

TOPIC_PERSONA = "parley.persona"
RPC_END_SESSION = "parley.end_session"
AGENT_STATES = {F.AgentState.LISTENING: "listening", F.AgentState.USER_SPEAKING: "listening",
                F.AgentState.THINKING: "thinking", F.AgentState.SPEAKING: "speaking"}
FRAME_S = OUTPUT_FRAME_SAMPLES / OUTPUT_RATE
VOICE_LEAD_S = 0.08  # how far the voice runs ahead of real time, inside the source's 100 ms queue
STT_BACKLOG_FULL = 8  # transcriptions waiting for Whisper that make this worker "full"


# ---------------------------------------------------------------------------------------- metadata

@dataclass
class JobOptions:
    persona: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    participant: str | None = None
    user_token: str | None = None


def job_options(*metadata: str | None) -> JobOptions:
    """Persona and options from JSON metadata strings, later ones winning (room, then job)."""
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for raw in metadata:
        if not raw:
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("ignoring metadata that is not JSON: %.80r", raw)
            continue
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("options"), dict):
            options.update(data["options"])
        merged.update({k: v for k, v in data.items() if k != "options"})

    def text(key: str) -> str | None:
        return str(merged[key]) if merged.get(key) not in (None, "") else None

    return JobOptions(text("persona"), options, text("participant"), text("user_token"))


# ---------------------------------------------------------------------------------------- load

class _Load:
    """What this worker process is doing, read by LiveKit's dispatcher through ``worker_load``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # jobs run in threads, each on its own event loop
        self.rooms = 0
        self.stt: Any = None  # the process's shared STT engine (its queue is every room's)

    def add_room(self, n: int) -> None:
        with self._lock:
            self.rooms += n


LOAD = _Load()


def worker_load(max_rooms: int) -> float:
    """0..1: the larger of the share of rooms in use and how full the STT queue is."""
    rooms = LOAD.rooms / max(max_rooms, 1)
    backlog = getattr(LOAD.stt, "queue_depth", 0) / STT_BACKLOG_FULL
    return min(1.0, max(rooms, backlog))


# ---------------------------------------------------------------------------------------- audio

AudioInputFactory = Callable[[rtc.RemoteParticipant], AsyncIterator[rtc.AudioFrame]]


async def participant_audio(participant: rtc.RemoteParticipant) -> AsyncIterator[rtc.AudioFrame]:
    """A participant's microphone as 20 ms mono 48 kHz frames (follows track changes)."""
    stream = rtc.AudioStream.from_participant(participant=participant, track_source=rtc.TrackSource.SOURCE_MICROPHONE,
                                              sample_rate=OUTPUT_RATE, num_channels=1, frame_size_ms=20)
    try:
        async for event in stream:
            yield event.frame
    finally:
        await stream.aclose()


def pipeline_frame(frame: rtc.AudioFrame) -> F.AudioFrame:
    return F.AudioFrame(np.frombuffer(frame.data, dtype=np.int16), frame.sample_rate, frame.num_channels)


class AgentVoice(io.AudioOutput):
    """The agent's voice: an ``rtc.AudioSource`` published as the agent's microphone track."""

    def __init__(self, track_name: str = "parley-agent"):
        super().__init__(label="parley", capabilities=io.AudioOutputCapabilities(pause=False), sample_rate=OUTPUT_RATE)
        self.track_name = track_name
        self.source = rtc.AudioSource(OUTPUT_RATE, 1, queue_size_ms=100)
        self.publication: rtc.LocalTrackPublication | None = None

    async def publish(self, room: rtc.Room) -> rtc.LocalTrackPublication:
        track = rtc.LocalAudioTrack.create_audio_track(self.track_name, self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        self.publication = await room.local_participant.publish_track(track, options)
        return self.publication

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        await self.source.capture_frame(frame)

    def flush(self) -> None:
        super().flush()

    def clear_buffer(self) -> None:
        self.source.clear_queue()

    async def aclose(self) -> None:
        await self.source.aclose()


# ---------------------------------------------------------------------------------------- transcripts

class Transcription:
    """One speaker's transcript on ``lk.transcription``, sent on their behalf the way livekit-agents'
    room I/O writes it (voice/room_io/_output.py): the person's with ``update`` (one stream per update
    of a segment, the last marked final), the agent's with ``append`` and ``close`` (one stream per
    reply, closed with ``lk.transcription_final`` "true")."""

    def __init__(self, room: rtc.Room, identity: str):
        self.room, self.identity = room, identity
        self._segment: str | None = None
        self._writer: rtc.TextStreamWriter | None = None

    def _attributes(self, final: bool) -> dict[str, str]:
        attrs = {ATTRIBUTE_TRANSCRIPTION_FINAL: "true" if final else "false"}
        try:
            attrs[ATTRIBUTE_TRANSCRIPTION_TRACK_ID] = find_micro_track_id(self.room, self.identity)
        except ValueError:
            pass  # optional: the speaker publishes no microphone (typed input)
        return attrs

    async def _open(self, final: bool) -> rtc.TextStreamWriter:
        if self._segment is None:
            self._segment = shortuuid("SG_")
        return await self.room.local_participant.stream_text(
            topic=TOPIC_TRANSCRIPTION, sender_identity=self.identity,
            attributes={**self._attributes(final), ATTRIBUTE_TRANSCRIPTION_SEGMENT_ID: self._segment})

    async def update(self, text: str, final: bool) -> None:
        """The person's segment so far."""
        if self.room.isconnected():
            writer = await self._open(final)
            await writer.write(text)
            await writer.aclose()
        if final:
            self._segment = None

    async def append(self, text: str) -> None:
        """More of the agent's reply."""
        if not self.room.isconnected():
            return
        if self._writer is None:
            self._writer = await self._open(final=False)
        await self._writer.write(text)

    async def close(self) -> None:
        """The agent's reply is over."""
        writer, self._writer, self._segment = self._writer, None, None
        if writer is not None and self.room.isconnected():
            attrs = self._attributes(final=True)
            await writer.aclose(attributes=attrs)


# ---------------------------------------------------------------------------------------- the session

class LiveKitSession:
    """One conversation in one LiveKit room, with the participant ``identity``."""

    def __init__(self, room: rtc.Room, persona: PersonaSession, settings: Settings, engines: Engines, *,
                 identity: str, recorder: Recorder | None = None, listen_all: bool = False,
                 audio_input: AudioInputFactory = participant_audio, audio_output: io.AudioOutput | None = None,
                 on_done: Callable[[str], Any] = lambda reason: None,
                 owned: tuple[Callable[[], Awaitable[Any]], ...] = ()):
        """``on_done(reason)``: the conversation is over (the person left, the time limit); ``owned``:
        closers run last by ``aclose`` (the job's store and LLM client)."""
        self.room, self.persona, self.settings, self.identity = room, persona, settings, identity
        self.recorder, self.listen_all, self._owned = recorder, listen_all, owned
        self.name = room.name or "livekit"
        self._audio_input, self._on_done = audio_input, on_done
        self.output = audio_output or AgentVoice()
        self._log = logging.LoggerAdapter(log, {"room": self.name})
        self._tasks = TaskSet(f"{self.name}:livekit")
        self._outbox: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._inputs: dict[str, tuple[AsyncIterator[rtc.AudioFrame], asyncio.Task | None]] = {}
        self._mixer: rtc.AudioMixer | None = None
        self._state: str | None = None
        self._state_task: asyncio.Task | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._outbox_task: asyncio.Task | None = None
        self._started = self._closed = False
        self.runtime = make_runtime(persona, engines.llm, engines.llm, self._on_persona)
        self.conversation = build_conversation(persona, settings, engines, self.runtime, self._on_event, self.name)
        self._hint = SilenceHint(self.runtime, self.conversation, lambda: self.identity in self.room.remote_participants)
        self.user_text = Transcription(room, identity)
        self.agent_text = Transcription(room, room.local_participant.identity)

    async def start(self, subscribe_timeout_s: float = 5.0) -> None:
        self._started = True
        LOAD.add_room(1)
        self._set_state("initializing")
        room = self.room
        room.on("participant_connected", self._on_participant_connected)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.register_text_stream_handler(TOPIC_CHAT, self._on_chat)
        room.local_participant.register_rpc_method(RPC_END_SESSION, self._end_session)
        if self.listen_all:
            # 100 ms blocks: a participant who sends nothing only delays a block, never stalls the mix.
            self._mixer = rtc.AudioMixer(OUTPUT_RATE, 1, blocksize=OUTPUT_RATE // 10, stream_timeout_ms=100)
            self._tasks.spawn(self._read(self._mixer), "mixed audio")
        for p in list(room.remote_participants.values()):
            self._on_participant_connected(p)
        self._outbox_task = self._tasks.spawn(self._write_outbox(), "outbox")
        if isinstance(self.output, AgentVoice):
            publication = await self.output.publish(room)
            try:  # what is said before anyone subscribes is lost: the greeting waits for the listener
                await asyncio.wait_for(publication.wait_for_subscription(), subscribe_timeout_s)
            except TimeoutError:
                self._log.warning("nobody subscribed to the agent's voice within %.0fs", subscribe_timeout_s)
        self._tasks.spawn(self._speak(), "voice")
        self._tasks.spawn(self._lifetime(), "lifetime")
        self._set_state(AGENT_STATES[self.conversation.state])
        self.conversation.start()

    # -- audio

    def _listens_to(self, p: rtc.RemoteParticipant) -> bool:
        if p.identity == self.identity:
            return True
        return self.listen_all and p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    def _on_participant_connected(self, p: rtc.RemoteParticipant) -> None:
        if p.identity == self.identity and self._grace is not None:
            self._grace.cancel()  # back within the grace period (a page reload): same conversation
            self._grace = None
        if self._closed or not self._listens_to(p) or p.identity in self._inputs:
            return
        stream = self._audio_input(p)
        if self._mixer is not None:
            self._mixer.add_stream(stream)
            self._inputs[p.identity] = (stream, None)
        else:
            self._inputs[p.identity] = (stream, self._tasks.spawn(self._read(stream), f"audio {p.identity}"))
        self._log.info("listening to %s", p.identity)

    def _on_participant_disconnected(self, p: rtc.RemoteParticipant) -> None:
        entry = self._inputs.pop(p.identity, None)
        if entry is not None:
            stream, task = entry
            if self._mixer is not None:
                self._mixer.remove_stream(stream)
            if task is not None:
                task.cancel()
        if p.identity == self.identity and not self._closed:
            self._grace = asyncio.get_running_loop().call_later(
                self.settings.room_grace_s, self._on_done, "participant left")

    async def _read(self, frames: AsyncIterator[rtc.AudioFrame]) -> None:
        async for frame in frames:
            self.conversation.push_audio(pipeline_frame(frame))

    async def _speak(self) -> None:
        """The agent's voice on the audio clock: one 20 ms frame from the player per tick, a little
        ahead of real time (the source's queue absorbs the jitter; a barge-in clears it)."""
        start, n = time.monotonic(), 0
        while True:
            pcm = self.conversation.read_frame()
            await self.output.capture_frame(rtc.AudioFrame(pcm.tobytes(), OUTPUT_RATE, 1, len(pcm)))
            n += 1
            delay = start + n * FRAME_S - VOICE_LEAD_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the audio clock, not waiting for an event
            elif delay < -0.2:
                start = time.monotonic() - n * FRAME_S  # after a stall: re-anchor, don't burst

    async def _lifetime(self) -> None:
        await asyncio.sleep(self.settings.max_session_s)  # the session's hard limit, not a wait for an event
        self._log.info("session reached its %.0fs limit", self.settings.max_session_s)
        self._on_done("session time limit")

    # -- events out

    def _on_event(self, ev: F.Event) -> None:
        match ev:
            case F.Transcript(typed=False, text=text, final=final) if text.strip():
                self._send(lambda: self.user_text.update(text, final))
            case F.BotText(spoken=True, text=text) | F.BotText(tts_failed=True, text=text):
                self._send(lambda: self.agent_text.append(text + " "))
            case F.BotStoppedSpeaking() | F.BotTurnEnded():
                self._send(self.agent_text.close)
            case F.UserStartedSpeaking() if self.conversation.state is F.AgentState.SPEAKING:
                self.output.clear_buffer()  # what the source still holds must not play over the person
            case F.StateChanged(state=state):
                self._set_state(AGENT_STATES[state])
            case F.ErrorEvent(source=source, message=message):
                self._log.warning("%s error: %s", source, message)
        if self.recorder is not None:
            self.recorder.on_event(ev)
        self.runtime.on_event(ev)
        self._hint.on_event(ev)

    def _on_persona(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload)
        self._send(lambda: self.room.local_participant.send_text(text, topic=TOPIC_PERSONA))
        if self.recorder is not None:
            self.recorder.on_persona(payload)

    def _send(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Text streams go out in order, one at a time."""
        if not self._closed:
            self._outbox.put_nowait(op)

    async def _write_outbox(self) -> None:
        while (op := await self._outbox.get()) is not None:
            try:
                await op()
            except Exception as e:  # a dropped transcript must not end the conversation
                self._log.warning("failed to publish to the room: %s", e)

    def _set_state(self, state: str) -> None:
        if state == self._state or self._closed:
            return
        self._state = state

        async def publish() -> None:
            if self.room.isconnected():
                await self.room.local_participant.set_attributes({ATTRIBUTE_AGENT_STATE: state})

        if self._state_task is not None:
            self._state_task.cancel()  # only the latest state matters
        self._state_task = self._tasks.spawn(publish(), "state")

    # -- input from the room

    def _on_chat(self, reader: rtc.TextStreamReader, identity: str) -> None:
        if identity != self.identity and not self.listen_all:
            return

        async def read() -> None:
            self.conversation.push_text(await reader.read_all())

        self._tasks.spawn(read(), "chat")

    async def _end_session(self, data: rtc.RpcInvocationData) -> str:
        return json.dumps(await self.runtime.finish())

    # -- end

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hint.cancel()
        if self._grace is not None:
            self._grace.cancel()
        room = self.room
        room.off("participant_connected", self._on_participant_connected)
        room.off("participant_disconnected", self._on_participant_disconnected)
        room.unregister_text_stream_handler(TOPIC_CHAT)
        with contextlib.suppress(Exception):  # the room may be gone already
            room.local_participant.unregister_rpc_method(RPC_END_SESSION)
        await self.conversation.aclose()
        await self.runtime.aclose()
        self._outbox.put_nowait(self.agent_text.close)  # a reply cut off by the close still ends its stream
        self._outbox.put_nowait(None)
        if self._outbox_task is not None:
            await asyncio.wait({self._outbox_task}, timeout=5)  # let the last transcripts go out
        if self._mixer is not None:
            await self._mixer.aclose()
        await self._tasks.aclose()
        for stream, _ in self._inputs.values():
            if hasattr(stream, "aclose"):
                await stream.aclose()
        self._inputs.clear()
        await self.output.aclose()
        if self.recorder is not None:
            await self.recorder.close("completed")
        for close in self._owned:
            try:
                await close()
            except Exception as e:
                self._log.warning("closing %s failed: %s", getattr(close, "__qualname__", close), e)
        if self._started:
            LOAD.add_room(-1)
        self._log.info("conversation closed after %d turns",
                       sum(1 for m in self.conversation.history if m["role"] == "user"))


# ---------------------------------------------------------------------------------------- the job

def prewarm(settings: Settings, proc: JobProcess) -> None:
    """livekit-agents' prewarm, once per job executor (a thread here): this job's engines. Whisper is
    one model per process, shared by every room; ``serve`` loads it before the worker registers, so
    this finds it loaded (and loads it if not)."""
    engines = build_engines(settings)
    load = getattr(engines.stt, "load", None)  # the in-process Whisper (a remote STT loads elsewhere)
    if load is not None:
        try:
            load()
            engines.stt_status = "ready"
        except Exception as e:  # typed input keeps working; the error is in the log
            engines.stt_status = f"error: {e}"
            log.error("speech recognition unavailable: %s", e)
    proc.userdata["engines"] = engines
    LOAD.stt = engines.stt


async def run_job(ctx: JobContext, *, settings: Settings | None = None, engines: Engines | None = None,
                  store: Any = None, audio_input: AudioInputFactory = participant_audio,
                  audio_output: io.AudioOutput | None = None) -> LiveKitSession | None:
    """The entrypoint's work: join, find the person, start the conversation. The job ends (and
    ``LiveKitSession.aclose`` runs) when LiveKit shuts it down or the session asks to."""
    settings = settings or get_settings()
    own_engines = engines is None
    engines = engines or ctx.proc.userdata.get("engines") or build_engines(settings)
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    opts = job_options(ctx.room.metadata, ctx.job.metadata)
    try:
        persona = build(opts.persona, opts.options)
    except ValueError as e:
        log.error("room %s: cannot start %r: %s", ctx.room.name, opts.persona, e)
        ctx.shutdown(f"bad persona: {e}")
        return None
    identity = opts.participant or settings.livekit_participant
    participant = await ctx.wait_for_participant(identity=identity)
    owned = [engines.aclose] if own_engines else []
    if store is None:
        store = await _open_store(settings)
        if store is not None:
            owned.append(store.close)
    recorder = None
    if store is not None:
        persona, recorder = await open_recorder(store, settings, ctx.room.name, persona, opts.user_token)
    session = LiveKitSession(
        ctx.room, persona, settings, engines,
        identity=participant.identity, recorder=recorder, listen_all=settings.livekit_listen_all,
        audio_input=audio_input, audio_output=audio_output, on_done=ctx.shutdown, owned=tuple(owned))
    ctx.add_shutdown_callback(session.aclose)
    log.info("room %s: %s %s with %s", ctx.room.name, persona.persona, persona.options, participant.identity)
    await session.start()
    return session


async def _recover_sessions(settings: Settings) -> None:
    """Mark this worker's sessions a crash left active as interrupted. The worker names itself apart
    from a ``parley serve`` on the same host (whose restart would otherwise mark the worker's live
    sessions); several workers on one host each need their own PARLEY_INSTANCE."""
    if settings.instance is None:
        settings.instance = f"{socket.gethostname()}:livekit"
    store = await _open_store(settings)
    if store is None:
        return
    try:
        if (n := await store.mark_interrupted(settings.instance_id)):
            log.warning("%d session(s) were cut off by this worker's previous shutdown; marked interrupted", n)
    finally:
        await store.close()


async def _open_store(settings: Settings):
    from .store import open_store

    try:
        return await open_store(settings.database_url)
    except Exception as e:  # the conversation still works, without history
        log.error("history disabled: cannot open the database: %s", e)
        return None


def build_server(settings: Settings, *, health_host: str = "") -> AgentServer:
    """The livekit-agents server for Parley; its health check listens on ``health_host`` (all
    interfaces by default) at :8081, or a free port in development mode."""
    server = AgentServer(
        # Jobs in threads of this process, not processes: all rooms share one Whisper, and the load
        # function sees every room and the whole STT queue.
        job_executor_type=JobExecutorType.THREAD,
        setup_fnc=lambda proc: prewarm(settings, proc),
        load_fnc=lambda: worker_load(settings.max_rooms),
        load_threshold=1.0,  # worker_load reaches 1 at max_rooms or a full STT backlog
        num_idle_processes=2,
        initialize_process_timeout=120.0,
        drain_timeout=int(settings.max_session_s) + 60,  # a conversation in progress may finish
        ws_url=settings.livekit_url, api_key=settings.livekit_api_key, api_secret=settings.livekit_api_secret,
        host=health_host,
    )

    async def entrypoint(ctx: JobContext) -> None:
        await run_job(ctx, settings=settings)

    server.rtc_session(entrypoint, agent_name=settings.livekit_agent_name)
    return server


async def serve(settings: Settings, *, devmode: bool = False, unregistered: bool = False) -> None:
    """Run the worker until SIGTERM/SIGINT, then drain: no new rooms, the current ones finish (up to
    ``drain_timeout``). A second signal stops at once. ``unregistered``: don't connect to LiveKit
    (livekit-agents' own mode: health check and job threads only; for checks without a server)."""
    engines = build_engines(settings)
    LOAD.stt = engines.stt
    await engines.warm_up()  # Whisper before any job: the prewarms then find it loaded (errors are logged)
    await engines.aclose()
    await _recover_sessions(settings)
    server = build_server(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(server.run(devmode=devmode, unregistered=unregistered), name="livekit worker")
    try:
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if running.done():
            running.result()  # a configuration or connection error
            return
        log.info("draining: no new rooms; %d conversation(s) may finish", LOAD.rooms)
        stop.clear()
        drain = asyncio.create_task(server.drain())
        again = asyncio.create_task(stop.wait())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, again):
            task.cancel()
        await asyncio.gather(drain, again, return_exceptions=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.aclose()  # ends the job threads; run() returns
        await asyncio.gather(running, return_exceptions=True)


def run(settings: Settings, *, devmode: bool = False) -> None:
    """``parley livekit``: the worker, in the foreground."""
    needed = {"PARLEY_LIVEKIT_URL": (settings.livekit_url, "LIVEKIT_URL"),
              "PARLEY_LIVEKIT_API_KEY": (settings.livekit_api_key, "LIVEKIT_API_KEY"),
              "PARLEY_LIVEKIT_API_SECRET": (settings.livekit_api_secret, "LIVEKIT_API_SECRET")}
    missing = [name for name, (value, theirs) in needed.items() if not value and not os.environ.get(theirs)]
    if missing:
        raise SystemExit(f"parley livekit needs {', '.join(missing)} (or LiveKit's own LIVEKIT_* variables)")
    asyncio.run(serve(settings, devmode=devmode))
