"""The aiortc side of a browser session: offer/answer, the person's audio in, the agent's voice out.

``AgentVoiceTrack`` is paced on the audio clock: it asks the room for the next 20 ms exactly when the
frame is due, so nothing is buffered between the pipeline and Opus and a barge-in is heard as
silence in the very next frame. After a stall (a slow event loop) it re-anchors its clock instead
of bursting frames to catch up.

Where aiortc's defaults cost latency or CPU, the peer does it its own way (bench/transport.py and
bench/rooms.py measure both; every room moves 50 frames a second each way):
- out: the track hands aiortc Opus packets it encodes itself (aiortc's documented pre-encoded
  path) instead of raw frames. aiortc would otherwise compute an RFC 6465 audio level in pure
  Python (~90 us a frame), hop to a thread pool to encode stereo, and encode silence for the
  three quarters of the time the agent is quiet; here silence is one cached packet and speech is
  encoded mono in place (~80 us).
- in, buffering: aiortc's audio jitter buffer holds each packet until 4 later ones have arrived
  (80 ms before the pipeline hears the person) and, after a single lost packet, keeps 14 packets
  (280 ms) held for the rest of the call. Parley analyses that audio and does not play it out:
  ``_InOrderBuffer`` lets each packet go as soon as the ones before it have.
- in, decoding: each received frame is decoded in the event loop, to mono, instead of by a decoder
  thread per connection that wakes the loop through ``run_coroutine_threadsafe`` for every frame.
``FAST_PATHS = False`` restores aiortc's own paths for all of it.
"""
from __future__ import annotations

import asyncio
import fractions
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp

from pipeline.frames import OUTPUT_FRAME_SAMPLES, OUTPUT_RATE, AudioFrame
from pipeline.player import SILENCE

log = logging.getLogger(__name__)
TIME_BASE = fractions.Fraction(1, OUTPUT_RATE)
FAST_PATHS = True  # the pre-encoded voice, the in-order receive buffer and in-loop decoding above
VOICE_BITRATE = 48_000  # mono speech; aiortc's own encoder sends 96 kbit/s stereo


class SignalingError(ValueError):
    """The offer or candidate cannot be used: a client error (4xx)."""


class AgentVoiceTrack(MediaStreamTrack):
    """Counters: ``frames`` sent; ``late_frames`` handed to the encoder more than ``LATE_S`` after
    their slot on the audio clock (the event loop was too busy: the listener may hear a gap);
    ``resyncs``, stalls of more than ``RESYNC_S`` after which the clock was re-anchored;
    ``woken``, frames sent ahead of their slot because a reply's first audio was ready (``wake``)."""

    kind = "audio"
    LATE_S = 0.02
    RESYNC_S = 0.1

    def __init__(self, source: Callable[[], np.ndarray]):
        super().__init__()
        self._source = source
        self._start: float | None = None
        self._pts = 0
        self._encoder = VoiceEncoder() if FAST_PATHS else None
        self.frames = 0
        self.late_frames = 0
        self.max_late_s = 0.0
        self.resyncs = 0
        self.woken = 0
        self.source_errors = 0
        self._waiter: asyncio.Future | None = None

    def wake(self) -> None:
        """A reply's first audio is ready: send the next frame now, not at its slot up to 20 ms away.
        The clock moves with it (the RTP timestamps do not), so the frames after it keep their
        20 ms pace; to the listener this is one packet arriving early, which jitter buffers absorb."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def recv(self) -> av.Packet | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += OUTPUT_FRAME_SAMPLES
            due = self._start + self._pts / OUTPUT_RATE
            if due > now:
                # Pacing to the audio clock (a timer, as asyncio.sleep), unless ``wake`` ends it.
                loop = asyncio.get_running_loop()
                self._waiter = waiter = loop.create_future()
                timer = loop.call_later(due - now, _release, waiter)
                try:
                    woken = await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
                now = time.monotonic()
                if woken and now < due:
                    self._start -= due - now
                    due = now
                    self.woken += 1
            if now - due > self.RESYNC_S:
                self._start = now - self._pts / OUTPUT_RATE
                self.resyncs += 1
            late = now - due
            if late > self.LATE_S:
                self.late_frames += 1
            if late > self.max_late_s:
                self.max_late_s = late
        self.frames += 1
        try:
            pcm = self._source()
        except Exception:
            # A pipeline bug must cost this frame, not the track: aiortc stops a sender whose
            # track raises, and the room would be mute for good.
            self.source_errors += 1
            if self.source_errors == 1 or self.source_errors % 500 == 0:
                log.exception("the voice source failed (%d times); sending silence", self.source_errors)
            pcm = np.zeros(OUTPUT_FRAME_SAMPLES, np.int16)
        if self._encoder is not None:
            packet = self._encoder.encode(pcm)
        else:
            packet = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            packet.sample_rate = OUTPUT_RATE
        packet.pts = self._pts
        packet.time_base = TIME_BASE
        return packet


def _release(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _opus_encoder() -> av.CodecContext:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format = OUTPUT_RATE, "mono", "s16"
    codec.bit_rate = VOICE_BITRATE
    codec.options = {"application": "voip"}
    codec.time_base = TIME_BASE
    return codec


@functools.lru_cache(maxsize=1)
def _silence_payload() -> bytes:
    """One 20 ms Opus packet of digital silence, as a running encoder makes it."""
    codec = _opus_encoder()
    zeros = np.zeros((1, OUTPUT_FRAME_SAMPLES), np.int16)
    payload = b""
    for i in range(10):  # past the encoder's start-up
        frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
        frame.sample_rate, frame.pts = OUTPUT_RATE, i * OUTPUT_FRAME_SAMPLES
        for packet in codec.encode(frame):
            payload = bytes(packet)
    return payload


class VoiceEncoder:
    """20 ms int16 mono frames -> Opus packets (mono: an ``opus/48000/2`` receiver decodes both).

    Silence encodes to the same packet every time, so it is not encoded again: the player returns
    silence whenever the agent is quiet. The first silent frame after speech still goes through
    the encoder, which holds 6.5 ms of look-ahead: that flushes the end of the last word."""

    def __init__(self) -> None:
        self._codec = _opus_encoder()
        self._silence = _silence_payload()
        self._flush = False
        self._n = 0

    def encode(self, pcm: np.ndarray) -> av.Packet:
        silent = pcm is SILENCE or not pcm.any()
        if silent and not self._flush:
            return av.Packet(self._silence)
        self._flush = not silent
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = OUTPUT_RATE, self._n
        self._n += OUTPUT_FRAME_SAMPLES
        packets = self._codec.encode(frame)  # libopus answers every 20 ms frame with one packet
        return packets[0] if packets else av.Packet(self._silence)


class _Frames(JitterFrame):
    """What ``_InOrderBuffer`` releases at once: the first frame (whose timestamp the receiver maps)
    and the ones that became ready with it, with their RTP timestamps."""

    raw_timestamp: int
    more: list[JitterFrame]


class _InOrderBuffer:
    """Takes the place of aiortc's audio ``JitterBuffer`` in front of ``_DecodeInLoop``.

    Opus puts one frame in each RTP packet, so a packet can leave as soon as every earlier one has:
    in order, at once. A missing packet is waited for while up to ``MAX_WAIT`` later ones arrive
    (60 ms of reordering), then counted lost and skipped; whatever became ready leaves together
    (``_Frames.more``), so a loss never leaves a backlog behind."""

    MAX_WAIT = 3

    def __init__(self) -> None:
        self._next: int | None = None  # the sequence number due next
        self._held: dict[int, object] = {}
        self.lost = 0
        self.late = 0  # arrived after it was given up on (or duplicated): dropped

    def add(self, packet) -> tuple[bool, _Frames | None]:
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = (seq - self._next) & 0xFFFF
        if ahead >= 0x8000:
            self.late += 1
            return False, None
        if ahead > 3000:  # a minute ahead: no reordering does that, the sender started over
            self._held.clear()
            self._next = seq
        self._held[seq] = packet
        ready = []
        while self._held:
            p = self._held.pop(self._next, None)
            if p is None:
                if len(self._held) <= self.MAX_WAIT:
                    break
                first = min(self._held, key=lambda s: (s - self._next) & 0xFFFF)
                self.lost += (first - self._next) & 0xFFFF
                self._next = first
                continue
            ready.append(p)
            self._next = (self._next + 1) & 0xFFFF
        if not ready:
            return False, None
        out = _Frames(ready[0]._data, ready[0].timestamp)
        out.raw_timestamp = ready[0].timestamp
        out.more = [JitterFrame(p._data, p.timestamp) for p in ready[1:]]
        return False, out


class _DecodeInLoop:
    """Takes the place of the queue an aiortc receiver feeds its decoder thread: each frame leaving
    the jitter buffer is decoded here, on the event loop (``put`` is only called from
    ``RTCRtpReceiver._handle_rtp_packet``), and queued on the track at once. Audio lost on the way
    is replaced by as much silence (up to a second), so the pipeline's stream time keeps step with
    the clock. The decoder thread aiortc still starts waits in ``get`` until the receiver stops,
    then ends the track as usual."""

    MAX_FILL = OUTPUT_RATE

    def __init__(self, track_queue: asyncio.Queue, sink: Callable[[av.AudioFrame], None] | None = None):
        """``sink``: called with each decoded frame instead of queueing it for the track's reader
        (one task wake-up less per frame, and one loop iteration less of latency under load)."""
        self._out = track_queue
        self._sink = sink
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.sample_rate, self._codec.layout, self._codec.format = OUTPUT_RATE, "mono", "s16"
        self._stopped = threading.Event()
        self._next_pts: int | None = None
        self.errors = 0
        self.filled = 0  # samples of silence put in for lost audio

    def put(self, item) -> None:
        if item is None:
            self._stopped.set()
            return
        _codec, encoded = item
        self._decode(encoded.data, encoded.timestamp)
        for f in getattr(encoded, "more", ()):  # mapped like the first: same offset from its RTP timestamp
            self._decode(f.data, encoded.timestamp + ((f.timestamp - encoded.raw_timestamp) & 0xFFFFFFFF))

    def _decode(self, data: bytes, pts: int) -> None:
        if self._next_pts is not None and 0 < pts - self._next_pts <= self.MAX_FILL:
            gap = pts - self._next_pts
            fill = av.AudioFrame.from_ndarray(np.zeros((1, gap), np.int16), format="s16", layout="mono")
            fill.sample_rate, fill.pts, fill.time_base = OUTPUT_RATE, self._next_pts, TIME_BASE
            self._emit(fill)
            self.filled += gap
        packet = av.Packet(data)
        packet.pts, packet.time_base = pts, TIME_BASE
        try:
            frames = self._codec.decode(packet)
        except av.FFmpegError as e:  # a corrupt packet: skip it, keep the decoder's state
            self.errors += 1
            if self.errors in (1, 100, 10_000):
                log.warning("cannot decode a received Opus frame (%d so far): %s", self.errors, e)
            return
        for frame in frames:
            self._emit(frame)
            self._next_pts = pts + frame.samples

    def _emit(self, frame: av.AudioFrame) -> None:
        if self._sink is not None:
            self._sink(frame)
        else:
            self._out.put_nowait(frame)

    def get(self, *args, **kwargs):
        self._stopped.wait()
        return None


def _tune_receiver(receiver, sink: Callable[[av.AudioFrame], None] | None = None) -> None:
    """Before the receiver starts (no packet yet): ``_InOrderBuffer`` and ``_DecodeInLoop`` in place
    of aiortc's buffer and decoder thread. aiortc has no settings for either: its private
    attributes are checked and, if they are not what this was written against, left alone."""
    track = getattr(receiver, "_track", None)
    buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    if (FAST_PATHS and getattr(receiver, "_RTCRtpReceiver__decoder_thread", 0) is None
            and isinstance(buffer, JitterBuffer) and getattr(buffer, "_origin", 0) is None
            and isinstance(getattr(receiver, "_RTCRtpReceiver__decoder_queue", None), queue.Queue)
            and isinstance(getattr(track, "_queue", None), asyncio.Queue)):
        receiver._RTCRtpReceiver__jitter_buffer = _InOrderBuffer()
        receiver._RTCRtpReceiver__decoder_queue = _DecodeInLoop(track._queue, sink)


def audio_frame(frame: av.AudioFrame) -> AudioFrame:
    """A decoded frame (packed s16, mono from ``_DecodeInLoop``, stereo from aiortc's decoder) as a
    pipeline frame."""
    layout = frame.layout
    channels = getattr(layout, "nb_channels", None) or len(layout.channels)
    if frame.format.name == "s16":  # packed: a view of the frame's buffer, ~6x cheaper than to_ndarray()
        return AudioFrame(np.frombuffer(frame.planes[0], np.int16, frame.samples * channels), frame.sample_rate,
                          channels)
    pcm = frame.to_ndarray()
    if frame.format.is_planar:
        pcm = pcm.T
    if pcm.dtype != np.int16:
        pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    return AudioFrame(pcm.reshape(-1), frame.sample_rate, channels)


class Peer:
    """One RTCPeerConnection bound to a room. Owns the task that reads the person's audio."""

    def __init__(self, pc_id: str, on_audio: Callable[[AudioFrame], None], voice: Callable[[], np.ndarray],
                 on_message: Callable[["Peer", str | bytes], None], on_closed: Callable[["Peer"], None],
                 media_timeout_s: float = 15.0):
        self.pc_id = pc_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.voice = AgentVoiceTrack(voice)
        self.channel = None
        self._on_audio, self._on_message, self._on_closed = on_audio, on_message, on_closed
        self._reader: asyncio.Task | None = None  # with _DecodeInLoop it only sees the track end
        self._audio_errors = 0
        self._closed = False
        # A browser sends audio all the time, silence included; a peer that sends nothing for this
        # long has vanished (a closed laptop, a dead network) long before ICE consent gives up (30 s).
        self.media_timeout_s = media_timeout_s
        self.last_media = time.monotonic()
        self._watchdog: asyncio.Task | None = None
        self.channel_open = asyncio.Event()
        self.connected = asyncio.Event()
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, sdp: str, type_: str = "offer") -> RTCSessionDescription:
        if type_ != "offer":
            raise SignalingError(f"expected an SDP offer, got type {type_!r}")
        if "m=audio" not in sdp:
            raise SignalingError("the offer has no audio section: Parley needs the microphone track")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except (ValueError, TypeError, KeyError, IndexError, AssertionError, InvalidStateError) as e:
            raise SignalingError(f"invalid SDP offer: {e or type(e).__name__}") from e
        # The agent's voice goes on the first audio transceiver (mid 0), the one the client plays.
        audio = next((t for t in self.pc.getTransceivers() if t.kind == "audio"), None)
        if audio is None:
            raise SignalingError("the offer has no usable audio transceiver")
        for t in self.pc.getTransceivers():
            if t.kind == "audio":
                _tune_receiver(t.receiver, self._deliver if t is audio else None)
        if audio.sender.track is None:
            audio.sender.replaceTrack(self.voice)
        audio.direction = "sendrecv"
        try:
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
        except (ValueError, InvalidStateError) as e:  # a renegotiation whose media sections changed
            raise SignalingError(f"cannot answer this SDP offer: {e or type(e).__name__}") from e
        return self.pc.localDescription

    async def add_candidate(self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None) -> None:
        text = candidate.removeprefix("candidate:").strip()
        if not text:
            return  # end-of-candidates
        try:
            c = candidate_from_sdp(text)  # asserts on too few fields
        except (ValueError, IndexError, AssertionError) as e:
            raise SignalingError(f"invalid ICE candidate: {candidate[:80]!r}") from e
        c.sdpMid, c.sdpMLineIndex = sdp_mid, sdp_mline_index
        try:
            await self.pc.addIceCandidate(c)
        except (ValueError, InvalidStateError) as e:  # no mid or index, a bad address, a closed connection
            raise SignalingError(f"cannot use ICE candidate {candidate[:80]!r}: {e}") from e

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, text: str) -> bool:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
            return True
        return False

    def _on_datachannel(self, channel) -> None:
        self.channel = channel
        channel.on("message", lambda m: self._on_message(self, m))
        if channel.readyState == "open":
            self.channel_open.set()
        channel.on("open", self.channel_open.set)

    def _on_track(self, track) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(track), name=f"peer {self.pc_id} audio")

    def _deliver(self, frame: av.AudioFrame) -> None:
        """The person's audio, straight from ``_DecodeInLoop`` (inside aiortc's packet handling: an
        exception must not reach it)."""
        self.last_media = time.monotonic()
        try:
            self._on_audio(audio_frame(frame))
        except Exception:
            self._audio_errors += 1
            if self._audio_errors in (1, 100, 10_000):
                log.exception("peer %s: the pipeline failed on received audio (%d times)", self.pc_id,
                              self._audio_errors)

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                self.last_media = time.monotonic()
                self._on_audio(audio_frame(frame))
        except MediaStreamError:
            pass  # the remote track ended

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer %s: %s", self.pc_id, state)
        if state == "connected":
            self.connected.set()
            if self._watchdog is None:
                self.last_media = time.monotonic()
                self._watchdog = asyncio.get_running_loop().create_task(self._watch_media(),
                                                                        name=f"peer {self.pc_id} watchdog")
        if state in ("failed", "closed"):
            await self.close()

    async def _watch_media(self) -> None:
        while not self._closed:
            quiet = time.monotonic() - self.last_media
            if quiet >= self.media_timeout_s:
                log.warning("peer %s: no audio for %.1fs; the client is gone", self.pc_id, quiet)
                await self.close()  # which leaves this task, its caller, running to the end
                return
            await asyncio.sleep(self.media_timeout_s - quiet + 0.05)  # a timer: the next moment silence could end it

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.voice.stop()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.pc.close()
        self._on_closed(self)
