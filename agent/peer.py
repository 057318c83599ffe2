"""The aiortc side of a browser session: offer/answer, the person's audio in, the agent's voice out.

``AgentVoiceTrack`` is paced on the audio clock: it asks the room for the next 20 ms exactly when the
frame is due, so nothing is buffered between the pipeline and Opus and a barge-in is heard as
silence in the very next frame. After a stall (a slow event loop) it re-anchors its clock instead
of bursting frames to catch up.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp

from pipeline.frames import OUTPUT_FRAME_SAMPLES, OUTPUT_RATE, AudioFrame

log = logging.getLogger(__name__)
TIME_BASE = fractions.Fraction(1, OUTPUT_RATE)


class SignalingError(ValueError):
    """The offer or candidate cannot be used: a client error (4xx)."""


class AgentVoiceTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, source: Callable[[], np.ndarray]):
        super().__init__()
        self._source = source
        self._start: float | None = None
        self._pts = 0
        self.resyncs = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += OUTPUT_FRAME_SAMPLES
            due = self._start + self._pts / OUTPUT_RATE
            if due > now:
                await asyncio.sleep(due - now)  # pacing to the audio clock, not waiting for an event
            elif now - due > 0.1:
                self._start = now - self._pts / OUTPUT_RATE
                self.resyncs += 1
        pcm = self._source()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUTPUT_RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        return frame


def audio_frame(frame: av.AudioFrame) -> AudioFrame:
    """aiortc's decoded frame (packed s16, usually stereo 48 kHz) as a pipeline frame."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray()
    if frame.format.is_planar:
        pcm = pcm.T
    if pcm.dtype != np.int16:
        pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    return AudioFrame(pcm.reshape(-1), frame.sample_rate, channels)


class Peer:
    """One RTCPeerConnection bound to a room. Owns the task that reads the person's audio."""

    def __init__(self, pc_id: str, on_audio: Callable[[AudioFrame], None], voice: Callable[[], np.ndarray],
                 on_message: Callable[["Peer", str | bytes], None], on_closed: Callable[["Peer"], None]):
        self.pc_id = pc_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.voice = AgentVoiceTrack(voice)
        self.channel = None
        self._on_audio, self._on_message, self._on_closed = on_audio, on_message, on_closed
        self._reader: asyncio.Task | None = None
        self._closed = False
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
        except (ValueError, TypeError, KeyError, IndexError, AssertionError) as e:
            raise SignalingError(f"invalid SDP offer: {e or type(e).__name__}") from e
        # The agent's voice goes on the first audio transceiver (mid 0), the one the client plays.
        audio = next((t for t in self.pc.getTransceivers() if t.kind == "audio"), None)
        if audio is None:
            raise SignalingError("the offer has no usable audio transceiver")
        if audio.sender.track is None:
            audio.sender.replaceTrack(self.voice)
        audio.direction = "sendrecv"
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        return self.pc.localDescription

    async def add_candidate(self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None) -> None:
        text = candidate.removeprefix("candidate:").strip()
        if not text:
            return  # end-of-candidates
        try:
            c = candidate_from_sdp(text)
        except (ValueError, IndexError) as e:
            raise SignalingError(f"invalid ICE candidate: {candidate[:80]!r}") from e
        c.sdpMid, c.sdpMLineIndex = sdp_mid, sdp_mline_index
        await self.pc.addIceCandidate(c)

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

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                self._on_audio(audio_frame(frame))
        except MediaStreamError:
            pass  # the remote track ended

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer %s: %s", self.pc_id, state)
        if state == "connected":
            self.connected.set()
        if state in ("failed", "closed"):
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.voice.stop()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.pc.close()
        self._on_closed(self)
