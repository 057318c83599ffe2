"""A real aiortc client that talks to Parley like a browser: SmallWebRTC offer, RTVI data channel,
a microphone track fed from a recording on the real-time audio clock, and the agent's audio recorded."""
from __future__ import annotations

import asyncio
import fractions
import json
import time
import uuid

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from pipeline.audio import float_to_int16, resample_once


class RecordingTrack(MediaStreamTrack):
    """Plays a 16 kHz recording as 48 kHz stereo 20 ms frames in real time, then silence."""

    kind = "audio"

    def __init__(self, audio16k: np.ndarray, lead_silence_s: float = 0.5):
        super().__init__()
        x = float_to_int16(resample_once(audio16k, 16000, 48000))
        self._pcm = np.concatenate([np.zeros(int(lead_silence_s * 48000), np.int16), x])
        self._pos = 0
        self._start: float | None = None
        self.finished = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._pos / 48000
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())  # real-time pacing of the fake microphone
        chunk = self._pcm[self._pos : self._pos + 960]
        if len(chunk) < 960:
            chunk = np.concatenate([chunk, np.zeros(960 - len(chunk), np.int16)])
            self.finished.set()
        frame = av.AudioFrame.from_ndarray(np.repeat(chunk, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self._pos, fractions.Fraction(1, 48000)
        self._pos += 960
        return frame

    def play(self, audio16k: np.ndarray) -> None:
        """Queue more speech right after what is playing now."""
        x = float_to_int16(resample_once(audio16k, 16000, 48000))
        head = self._pcm[: self._pos]
        # Past the end of what was queued, the track has been sending silence up to ``_pos``.
        head = np.concatenate([head, np.zeros(self._pos - len(head), np.int16)])
        self._pcm = np.concatenate([head, x])
        self.finished.clear()


class Client:
    def __init__(self, base_url: str, audio16k: np.ndarray, room: str | None = None, persona: str = "interviewer",
                 options: dict | None = None, user_token: str | None = None):
        self.base_url, self.room, self.persona, self.options = base_url, room or uuid.uuid4().hex[:8], persona, options or {}
        self.user_token = user_token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = RecordingTrack(audio16k)
        self.messages: list[dict] = []
        self.audio: list[np.ndarray] = []
        self.pc_id: str | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.channel = None

    async def connect(self, pc_id: str | None = None, restart: bool = False) -> None:
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("chat", ordered=True)
        self.channel.on("open", lambda: self.send("client-ready", {"version": "2.1.0", "about": {"library": "test"}}))
        self.channel.on("message", self._on_message)
        self.pc.on("track", lambda t: setattr(self, "_reader", asyncio.get_running_loop().create_task(self._read(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=20) as http:
            r = await http.post(f"{self.base_url}/api/offer", json={
                "sdp": self.pc.localDescription.sdp, "type": "offer", "pc_id": pc_id, "restart_pc": restart,
                "requestData": {"room": self.room, "persona": self.persona, "options": self.options,
                                "user_token": self.user_token}})
        r.raise_for_status()
        answer = r.json()
        self.pc_id = answer["pc_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    def send(self, type_: str, data: dict) -> None:
        self.channel.send(json.dumps({"label": "rtvi-ai", "type": type_, "id": uuid.uuid4().hex[:8], "data": data}))

    def _on_message(self, raw) -> None:
        self.messages.append(json.loads(raw))
        self._changed.set()

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                self.audio.append(frame.to_ndarray().reshape(-1))
        except MediaStreamError:
            pass

    def of(self, type_: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == type_]

    async def wait_for(self, predicate, timeout: float = 30.0):
        async with asyncio.timeout(timeout):
            while not (result := predicate(self)):
                self._changed.clear()
                await self._changed.wait()
        return result

    def bot_text(self) -> str:
        return " ".join(m["data"]["text"] for m in self.of("bot-output"))

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
