"""agent/peer.py's own audio paths: the agent's voice pre-encoded for aiortc, received audio decoded
in the event loop, and aiortc's receive buffer shortened (bench/rooms.py and bench/transport.py
measure what they buy)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.jitterbuffer import JitterFrame

from agent import peer as P
from pipeline.player import SILENCE


def tone(n: int = 960, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * 32767 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.int16)


async def test_voice_encoder_sends_silence_as_one_cached_packet_and_flushes_after_speech():
    enc = P.VoiceEncoder()
    silence = P._silence_payload()
    assert bytes(enc.encode(SILENCE)) == silence
    assert bytes(enc.encode(np.zeros(960, np.int16))) == silence  # any silent frame, not just the constant
    speech = [bytes(enc.encode(tone())) for _ in range(5)]
    assert all(p != silence for p in speech)
    # The first silent frame after speech goes through the encoder (its look-ahead holds the end of
    # the last word); from the next one on, the cached packet again.
    assert bytes(enc.encode(SILENCE)) != silence
    assert bytes(enc.encode(SILENCE)) == silence


async def test_decode_in_loop_hands_the_track_mono_frames_and_ends_it_on_stop():
    enc, out = P.VoiceEncoder(), asyncio.Queue()
    dec = P._DecodeInLoop(out)
    for i in range(10):
        packet = enc.encode(tone())
        dec.put((None, JitterFrame(bytes(packet), i * 960)))
    frames = [out.get_nowait() for _ in range(out.qsize())]
    assert len(frames) == 10 and frames[3].pts == 3 * 960
    pcm = np.concatenate([P.audio_frame(f).pcm for f in frames])
    assert P.audio_frame(frames[0]).channels == 1 and P.audio_frame(frames[0]).sample_rate == 48000
    assert np.abs(pcm[960 * 2:]).max() > 3000  # the tone, through Opus and back
    dec.put((None, JitterFrame(b"\xff" * 3, 10 * 960)))  # garbage: counted and skipped
    assert dec.errors == 1
    waiter = asyncio.get_running_loop().run_in_executor(None, dec.get)  # aiortc's decoder thread
    dec.put(None)
    assert await asyncio.wait_for(waiter, 5) is None


async def test_the_peer_tunes_its_audio_receiver_before_it_starts(loopback_ice):
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client.addTransceiver("audio", direction="sendrecv")
    client.createDataChannel("chat")
    await client.setLocalDescription(await client.createOffer())
    peer = P.Peer("t", lambda f: None, lambda: SILENCE, lambda p, m: None, lambda p: None)
    try:
        await peer.answer(client.localDescription.sdp)
        receiver = next(t.receiver for t in peer.pc.getTransceivers() if t.kind == "audio")
        assert isinstance(receiver._RTCRtpReceiver__jitter_buffer, P._InOrderBuffer)
        decoder = receiver._RTCRtpReceiver__decoder_queue
        assert isinstance(decoder, P._DecodeInLoop) and decoder._sink == peer._deliver  # no queue, no task hop
    finally:
        await peer.close()
        await client.close()


def rtp(seq: int, data: bytes = b"x"):
    from aiortc.rtp import RtpPacket

    p = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(seq * 960) & 0xFFFFFFFF)
    p._data = data
    return p


def released(buffer, seqs: list[int]) -> list[list[int]]:
    """For each packet added, the sequence numbers (from RTP timestamps) released by that arrival."""
    out = []
    for seq in seqs:
        _, frame = buffer.add(rtp(seq))
        frames = [] if frame is None else [frame, *getattr(frame, "more", [])]
        out.append([f.timestamp // 960 for f in frames])
    return out


def test_aiortc_audio_buffer_keeps_280_ms_after_one_lost_packet():
    """Why agent/peer.py replaces it: the stock buffer releases one frame per arriving packet, so the
    backlog it builds while waiting out a lost packet never drains."""
    from aiortc.jitterbuffer import JitterBuffer

    buffer = JitterBuffer(capacity=16, prefetch=4)
    out = released(buffer, [s for s in range(60) if s != 10])
    lag = [arrived - r[0] for arrived, r in zip([s for s in range(60) if s != 10], out) if r]
    assert lag[:3] == [4, 4, 4] and lag[-1] == 14  # 80 ms in order; 280 ms for good after the loss


def test_in_order_buffer_releases_at_once_waits_out_reordering_and_skips_a_loss():
    b = P._InOrderBuffer()
    assert released(b, [100, 101, 102]) == [[100], [101], [102]]  # no wait in order
    assert released(b, [104, 103]) == [[], [103, 104]]  # reordered: held, then both at once
    # 105 lost: held while up to MAX_WAIT later packets arrive, then skipped; no backlog after.
    assert released(b, [106, 107, 108, 109, 110]) == [[], [], [], [106, 107, 108, 109], [110]]
    assert b.lost == 1
    assert released(b, [105, 110]) == [[], []] and b.late == 2  # too late, and a duplicate: dropped
    # Sequence numbers wrap at 2^16.
    b = P._InOrderBuffer()
    assert released(b, [65534, 65535, 65536, 65537]) == [[65534], [65535], [65536], [65537]]


async def test_decode_in_loop_decodes_frames_released_together_and_fills_lost_audio_with_silence():
    enc, out = P.VoiceEncoder(), asyncio.Queue()
    dec, buffer = P._DecodeInLoop(out), P._InOrderBuffer()
    payloads = [bytes(enc.encode(tone())) for _ in range(10)]
    for seq in [0, 1, 2, 4, 5, 6, 7, 8, 9]:  # 3 never arrives
        _, frame = buffer.add(rtp(seq, payloads[seq]))
        if frame is not None:  # (the receiver's TimestampMapper would subtract the first timestamp: 0 here)
            dec.put((None, frame))
    frames = [out.get_nowait() for _ in range(out.qsize())]
    assert [f.pts for f in frames] == [i * 960 for i in range(10)]  # the lost one filled in
    assert dec.filled == 960 and not np.abs(frames[3].to_ndarray()).any()


async def test_a_replys_first_audio_is_sent_at_once_and_the_pace_resumes_from_it():
    """An idle voice track waits up to 20 ms for its next slot; a reply's first audio wakes it, and
    the frames after keep 20 ms apart from the early one (RTP timestamps untouched)."""
    import time

    from pipeline.player import PlaybackListener, Player, Segment

    player = Player(PlaybackListener(lambda seg: None, lambda reply: None, lambda reply: None))
    track = P.AgentVoiceTrack(player.read_frame)
    player.on_ready = track.wake
    try:
        first = await track.recv()  # idle: silence, and the clock starts
        waiting = asyncio.create_task(track.recv())
        await asyncio.sleep(0)  # one turn of the loop: the task now waits for its slot
        assert track._waiter is not None and not waiting.done()
        seg = Segment(reply_id=1, text="Hello.")
        seg.append(tone(2 * 960))
        woken_at = time.monotonic()
        player.push(seg)
        packet = await asyncio.wait_for(waiting, 1)
        assert track.woken == 1 and packet.pts - first.pts == 960  # early, on the same RTP clock
        slot = track._start + track._pts / 48000
        assert slot <= woken_at + 0.005  # the slot moved to the wake-up
        assert player.frames_out == 2 and seg.pos == 960  # the reply's audio went out in that frame
        # Already playing: more audio does not wake the track again.
        player.push(Segment(reply_id=1, text="Again.", pcm=tone()))
        await asyncio.wait_for(track.recv(), 1)
        assert track.woken == 1
        assert track._start + track._pts / 48000 - slot == pytest.approx(0.02)  # 20 ms steps from it
    finally:
        track.stop()
        waiting.cancel()
