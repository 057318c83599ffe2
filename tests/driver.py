"""Drive a Conversation the way a transport does, on a compressed audio clock.

Each step pushes one 20 ms input frame (48 kHz stereo, like aiortc delivers) and pulls one 20 ms
output frame, so "time" is the frame count and tests measure latencies on the audio clock. When
nothing is queued to play, the driver waits for the next pipeline event instead of spinning.
"""
from __future__ import annotations

import asyncio

import numpy as np

from pipeline.audio import float_to_int16, resample_once
from pipeline.conversation import Conversation
from pipeline.frames import AudioFrame

FRAME_16K = 320


def to_frames(audio16k: np.ndarray) -> list[AudioFrame]:
    x48 = float_to_int16(resample_once(audio16k, 16000, 48000))
    x48 = np.concatenate([x48, np.zeros((-len(x48)) % 960, np.int16)])
    return [AudioFrame(np.repeat(x48[i : i + 960], 2), 48000, 2) for i in range(0, len(x48), 960)]


SILENT_FRAME = AudioFrame(np.zeros(1920, np.int16), 48000, 2)


class Driver:
    def __init__(self, conv: Conversation, log):
        self.conv, self.log = conv, log
        self.out: list[np.ndarray] = []  # every output frame, index = audio clock in frames
        push = conv.player.push

        def push_and_wake(segment):  # queued audio must wake run_until as an event does
            push(segment)
            log.notify()

        conv.player.push = push_and_wake
        log.clock = lambda: len(self.out)  # events emitted while frame N is pushed or read carry N

    @property
    def frame(self) -> int:
        return len(self.out)

    async def step(self, frame: AudioFrame = SILENT_FRAME) -> np.ndarray:
        self.conv.push_audio(frame)
        out = self.conv.read_frame()
        self.out.append(out)
        await asyncio.sleep(0)  # let the pipeline's tasks run between frames
        return out

    async def say(self, audio16k: np.ndarray, trailing_silence_s: float = 0.0) -> None:
        tail = np.zeros(int(trailing_silence_s * 16000), np.float32)
        for f in to_frames(np.concatenate([audio16k, tail])):
            await self.step(f)

    async def say_with_partials(self, audio16k: np.ndarray, trailing_silence_s: float = 0.0) -> None:
        """Like ``say``, but every interim decode (and the turn model on a pause) finishes before
        the next frame is pushed.

        On a real-time clock a partial decode (~0.1 s here) ends long before the next one is due
        (``partial_interval_s``), and the turn model (~45 ms) long before a pause could end the
        turn; the compressed clock would otherwise outrun them and end the utterance first, so
        this waits for them, as the person's clock would have.
        """
        tail = np.zeros(int(trailing_silence_s * 16000), np.float32)
        for f in to_frames(np.concatenate([audio16k, tail])):
            await self.step(f)
            if self.conv._partial is not None:
                await asyncio.wait_for(asyncio.shield(self.conv._partial[0]), 10)
            if self.conv._hearing is not None and not self.conv._hearing.done():
                await asyncio.wait_for(asyncio.shield(self.conv._hearing), 10)

    async def run_until(self, predicate, timeout: float = 20.0):
        """Keep the clock running (silence in) until ``predicate(events)`` holds."""
        async with asyncio.timeout(timeout):
            while not (result := predicate(self.log.events)):
                if self.conv.player.has_audio:
                    await self.step()
                else:
                    n = len(self.log.events)
                    await self.log.wait_for(lambda ev: len(ev) > n or self.conv.player.has_audio, timeout)
        return result

    def audio(self, start: int = 0, end: int | None = None) -> np.ndarray:
        return np.concatenate(self.out[start:end]) if self.out[start:end] else np.zeros(0, np.int16)
