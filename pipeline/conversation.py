"""One conversation: audio frames and typed text in; events, history and reply audio out.

Data flows one way: ``push_audio`` -> VAD -> STT -> LLM -> sentences -> TTS -> ``Player``; the
transport pulls ``read_frame`` on its own clock. Every task this object starts is kept in
``_tasks`` and awaited by ``aclose``.

Barge-in is decided in ``_while_speaking``: the agent's audio pauses at the person's speech onset
(the VAD's first speech window, well inside the 200 ms budget), and only speech that lasts
``min_interruption_s`` cancels the reply; shorter sounds resume it.

The end of a turn is decided in ``_update_endpoint``: an interim transcript of everything said,
started as soon as the person goes quiet, tells ``pipeline.endpointing`` whether the words read as
finished, and the answer becomes the segmenter's endpoint silence for this utterance (the VAD never
sees text). The same interim transcript starts the reply early (``_start_preemptive``): the LLM and
TTS run during the endpoint silence and the final transcript, and their output is held back until
the final transcript says the same words (``_user_turn``); otherwise it is cancelled unheard.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import InputConverter, LeadingSilenceTrimmer, StreamResampler, float_to_int16
from .endpointing import Verdict, classify, endpoint_ms, same_words, with_audio
from .frames import (
    OUTPUT_RATE, AgentState, AudioFrame, BotInterrupted, BotTurnEnded, BotStartedSpeaking, BotStoppedSpeaking, BotText,
    ErrorEvent, Event, StateChanged, Transcript, TurnMetrics, UserStartedSpeaking, UserStoppedSpeaking,
)
from .echo import EchoGuard
from .llm import LLM, LLMError
from .player import PlaybackListener, Player, Segment
from .sentences import SentenceAggregator
from .stt import STT
from .tasks import TaskSet
from .tts import TTS, TTSError, Word
from .turn_model import TurnModel
from .turns import ConversationConfig, TurnOptions
from .vad import Segmenter, SpeechEnd, SpeechStart, VADOptions, heard_by

log = logging.getLogger(__name__)


@dataclass
class _Reply:
    id: int
    turn: int
    task: asyncio.Task | None = None
    text: list[str] = field(default_factory=list)  # clauses generated so far
    played: asyncio.Future | None = None  # resolved when the last frame has left the player
    started_playing: bool = False
    # metrics, time.monotonic()
    t_decided: float = 0.0  # end of turn decided (VAD endpoint, or text received)
    t_speech_end: float | None = None  # last voiced audio (None for typed turns)
    stt_ms: float | None = None
    stt_engine_ms: float | None = None  # the part of stt_ms spent waiting on the engine itself
    t_llm_request: float = 0.0
    t_first_token: float | None = None
    t_first_sentence: float | None = None
    t_tts_start: float | None = None
    tts_ttfb_ms: float | None = None
    endpoint_ms: int | None = None  # the endpoint silence that ended the turn
    # Preemptive replies: what it answers, and its output (segments, events) held back until the
    # final transcript confirms the words; None once it may play.
    user_text: str | None = None
    heard_until: float = 0.0  # stream time where the interim transcript's audio ends
    history_len: int = 0
    held: list | None = None


@dataclass
class _Interim:
    text: str
    language: str | None
    t_end: float  # stream time where the transcribed audio ends
    result: Any = None  # the STTResult, reused as the final when nothing was said after t_end


@dataclass
class PreemptiveStats:
    """LLM requests started on an interim transcript: ``used`` were played, ``discarded`` were
    cancelled (the final transcript differed, or the person went on talking): the extra cost."""

    started: int = 0
    used: int = 0
    discarded: int = 0


class Conversation:
    def __init__(
        self,
        *,
        stt: STT | None,
        llm: LLM,
        tts: TTS,
        config: ConversationConfig | None = None,
        vad_options: VADOptions | None = None,
        turn_options: TurnOptions | None = None,
        emit: Callable[[Event], None] = lambda e: None,
        name: str = "",
        turn_model: TurnModel | None = None,
    ):
        self.stt, self.llm, self.tts = stt, llm, tts
        self.turn_model = turn_model
        self.config = config or ConversationConfig()
        self.options = turn_options or TurnOptions()
        self.vad_options = vad_options or VADOptions()
        self.name = name
        self._emit = emit
        self._log = logging.LoggerAdapter(log, {"room": name})
        self._input = InputConverter()
        self.segmenter = Segmenter(self.vad_options)
        self.player = Player(PlaybackListener(self._on_segment_start, self._on_reply_start, self._on_reply_end))
        self.history: list[dict[str, Any]] = []
        self.metrics: list[TurnMetrics] = []
        self.state = AgentState.LISTENING
        self._tasks = TaskSet(name or "conversation", self._task_failed)
        self._reply: _Reply | None = None
        self._reply_seq = 0
        self._turn = 0
        self._barge_pending = False
        self.echo = EchoGuard(self.options.echo)
        self._echo_segment = False  # the current "speech" is the agent's own voice leaking back
        self._echo_checked_t = 0.0
        self._partial: tuple[asyncio.Task, float] | None = None  # (task, stream time its audio ends)
        self._last_partial_t = 0.0
        self._interim: _Interim | None = None  # the latest interim transcript of this utterance
        self._quiet_for: float | None = None  # the pause (its ``_heard_by``) already transcribed
        # ((text, P(complete)), verdict, endpoint ms) last decided
        self._eot: tuple[tuple[str | None, float | None], Verdict, int] | None = None
        self._sound: tuple[float, float] | None = None  # (pause heard_by, the turn model's P(complete))
        self._hearing: asyncio.Task | None = None  # the turn model on the latest pause
        self._asked_for: float | None = None  # the pause (its ``_heard_by``) the turn model was asked about
        self._preempt: _Reply | None = None  # a reply to the interim transcript, not yet confirmed
        self.preemptive = PreemptiveStats()
        self._discarded_since_reply = 0
        self._closed = False

    @property
    def turn(self) -> int:
        """The number of the latest turn (for logs and metrics)."""
        return self._turn

    # ------------------------------------------------------------------ inputs

    def push_audio(self, frame: AudioFrame) -> None:
        """Feed one transport frame (any rate, any channel count). Cheap and synchronous."""
        if self._closed:
            return
        for ev in self.segmenter.feed(self._input.convert(frame)):
            if isinstance(ev, SpeechStart):
                self._on_speech_start(ev)
            else:
                self._on_speech_end(ev)
        if self.segmenter.speaking:
            self._while_speaking()

    def push_text(self, text: str) -> None:
        """Typed input enters the same flow as a spoken turn."""
        text = text.strip()
        if self._closed or not text:
            return
        self._interrupt()
        self._discard(self._preempt)
        self._preempt = None
        self._turn += 1
        now = time.monotonic()
        self._emit(Transcript(text, final=True, typed=True))
        self._start_reply(text, _Reply(0, self._turn, t_decided=now))

    def read_frame(self) -> np.ndarray:
        """The next 20 ms of reply audio (int16 mono 48 kHz); the transport calls this on its clock."""
        frame = self.player.read_frame()
        self.echo.played(frame)
        return frame

    def respond(self) -> bool:
        """Let the agent speak without a new user message (a hint after a long silence, say).
        Refused while the agent is replying or the person is talking."""
        if self._closed or self._reply is not None or self.segmenter.speaking:
            return False
        self._turn += 1
        self._start_reply(None, _Reply(0, self._turn, t_decided=time.monotonic()))
        return True

    def start(self) -> None:
        """Speak the persona's greeting, if any."""
        if self.config.greeting and not self.history:
            self._turn += 1
            self._start_reply(None, _Reply(0, self._turn, t_decided=time.monotonic()), fixed=self.config.greeting)

    async def aclose(self) -> None:
        """Cancel and await everything this conversation started."""
        self._closed = True
        if self._reply is not None:
            self._finish_interrupted(self._reply)
        await self._tasks.aclose()
        self.player.clear()

    # ------------------------------------------------------------------ speech events

    def _on_speech_start(self, ev: SpeechStart) -> None:
        self._last_partial_t = self._echo_checked_t = self.segmenter.now
        self._interim = None
        self._eot = self._sound = None
        if (self._reply is not None or self.echo.echo_possible) and self.echo.is_echo(self.segmenter.segment_audio()):
            self._echo_segment = True  # the agent hearing itself: no one started speaking
            return
        self._person_started()

    def _person_started(self) -> None:
        self._emit(UserStartedSpeaking())
        if self._reply is not None:
            # Stop the agent's voice at once; decide later whether this was a real interruption.
            self._barge_pending = True
            self.player.pause()
        self._set_state(AgentState.USER_SPEAKING)

    def _while_speaking(self) -> None:
        o = self.options
        now = self.segmenter.now
        if self._echo_segment:
            if now - self._echo_checked_t < 0.1:  # a correlation every 100 ms is enough, and cheap
                return
            self._echo_checked_t = now
            if self.echo.is_echo(self.segmenter.segment_audio(), undecided=True):
                return
            self._echo_segment = False  # a person over the echo, or after it: speech after all
            self._person_started()
        # Measured on voiced audio only: the segment start includes the pre-roll, and the elapsed
        # time includes the endpoint silence, either of which made every "mm-hm" an interruption.
        if self._barge_pending:
            # While the browser's echo canceller converges, leaked echo can pass for speech.
            needed = o.min_interruption_s * (2 if self.echo.warming_up else 1)
            if self.segmenter.voiced_s >= needed:
                self._barge_pending = False
                self._interrupt()
            elif self.segmenter.silence_s >= o.backchannel_resume_s:
                self.player.resume()  # only an "mm-hm": carry on without waiting for the endpoint
            else:
                self.player.pause()  # (again) talking over the agent
        if self._preempt is not None and not self._covers(self._preempt.heard_until):
            self._discard(self._preempt)  # they went on talking: the reply answers half a sentence
            self._preempt = None
        if self.stt is not None:
            due = o.partial_interval_s > 0 and now - self._last_partial_t >= o.partial_interval_s
            # The moment the person goes quiet, transcribe everything they said (once per pause):
            # its words decide how long this silence must last and start the reply early.
            heard = round(self._heard_by(), 4)
            quiet = now >= heard - 1e-6
            wanted = (o.endpointing.enabled or o.preemptive_generation) and self._quiet_for != heard
            if quiet and wanted and self._partial is not None and self._partial[1] < heard - 1e-6:
                # A caption still decoding audio that stops before this pause: its text is about
                # to be superseded, and waiting for it put a whole decode (~100 ms on average on
                # a CPU, measured) between the pause and the turn's decision.
                self._cancel_partial()
            if self._partial is None and (due or (quiet and wanted)):
                pause = quiet and wanted
                if pause:
                    self._quiet_for = heard
                self._last_partial_t = now
                audio = self.segmenter.segment_audio()
                # The pause's decode decides the turn (and is kept as its final): a shared engine
                # serves it ahead of every room's captions and never drops it as stale.
                task = self._spawn(self._partial_transcript(audio, now, urgent=pause), "partial")
                self._partial = (task, now)
        self._update_endpoint()

    def _heard_by(self, ev: SpeechEnd | None = None) -> float:
        """Stream time by which a transcript has heard every word said so far (or in ``ev``)."""
        seg, o = self.segmenter, self.options
        last_voiced, sound_end = (ev.t, ev.sound_end) if ev else (seg.now - seg.silence_s, seg.sound_end)
        return heard_by(last_voiced, sound_end, o.partial_reuse_margin_s, o.pause_quiet_s)

    def _covers(self, t_end: float) -> bool:
        """Whether a transcript of the audio up to ``t_end`` heard every word so far."""
        return t_end >= self._heard_by() - 1e-6

    def _update_endpoint(self) -> None:
        """Set this utterance's endpoint silence from the words heard so far."""
        e = self.options.endpointing
        if not e.enabled or not self.segmenter.speaking:
            return
        interim = self._interim
        text = interim.text if interim is not None and self._covers(interim.t_end) else None
        p = self._sound[1] if self._sound is not None and self._covers(self._sound[0]) else None
        if self._eot is not None and self._eot[0] == (text, p):
            return
        last = self.history[-1] if self.history else None
        asked = last is not None and last["role"] == "assistant" and last["content"].rstrip().endswith("?")
        said = classify(text, (interim.language if interim else None) or self.config.language, after_question=asked)
        if p is None and text is not None and (said is Verdict.UNKNOWN or
                                               (said is Verdict.COMPLETE and e.audio_veto_below > 0)):
            self._ask_turn_model()
        verdict = with_audio(said, p, e)
        ms = endpoint_ms(verdict, e, self.vad_options.endpoint_silence_ms)
        self._eot = ((text, p), verdict, ms)
        self.segmenter.endpoint_ms = ms

    def _on_speech_end(self, ev: SpeechEnd) -> None:
        if self._echo_segment:
            self._echo_segment = False  # the agent's own voice: never a turn
            self._cancel_partial()
            return
        self._emit(UserStoppedSpeaking())
        if self._barge_pending:
            # Too short to be an interruption: a cough, a click, "mm-hm". Carry on speaking.
            self._barge_pending = False
            self._cancel_partial()
            self.player.resume()
            self._set_state(AgentState.SPEAKING if self._reply and self._reply.started_playing else AgentState.THINKING)
            return
        now = time.monotonic()
        self._turn += 1
        reply = _Reply(0, self._turn, t_decided=now, t_speech_end=now - (self.segmenter.now - ev.t),
                       endpoint_ms=self._eot[2] if self._eot else self.vad_options.endpoint_silence_ms)
        preempt, self._preempt = self._preempt, None
        interim, self._interim, self._eot, self._sound = self._interim, None, None, None
        reuse = None
        heard = self._heard_by(ev) - 1e-6
        if self._partial is not None and self._partial[1] >= heard:
            reuse = self._partial[0]  # already decoding everything that was said: its text is the final
            self._partial = None
        else:
            self._cancel_partial()
            if (self.options.reuse_interim_as_final and interim is not None and interim.result is not None
                    and interim.t_end >= heard):
                # The decode made when the silence began heard every word, with the same model and
                # options as a final: decoding again would add a whole decode to every turn.
                reuse = asyncio.get_running_loop().create_future()
                reuse.set_result(interim.result)
        self._set_state(AgentState.THINKING)
        self._spawn(self._user_turn(ev, reply, reuse, preempt), f"turn {self._turn}")

    def _ask_turn_model(self) -> None:
        """Once per pause, and only once its transcript left the words undecided: the model's 45 ms
        of CPU then never competes with that transcription, which the preemptive reply waits for."""
        pause = self._quiet_for
        if self.turn_model is None or pause is None or not self._covers(pause) or self._asked_for == pause:
            return
        self._asked_for = pause
        self._hearing = self._spawn(self._hear_pause(self.segmenter.segment_audio(), pause), "turn model")

    async def _hear_pause(self, audio: np.ndarray, heard: float) -> None:
        """How the utterance sounds at this pause (the turn model, in a thread: ~45 ms of CPU)."""
        try:
            p = await asyncio.to_thread(self.turn_model.probability, audio)
        except Exception as e:
            self._log.warning("turn model failed (the words decide alone): %s", e)
            return
        if self.segmenter.speaking and self._quiet_for == heard:  # still this utterance's pause
            self._sound = (heard, p)
            self._update_endpoint()

    async def _partial_transcript(self, audio: np.ndarray, t_end: float, urgent: bool = False):
        try:
            result = await self.stt.transcribe(audio, final=False, language=self.config.language,
                                               prompt=self.config.stt_prompt, urgent=urgent)
            if result is not None and result.text and self.segmenter.speaking:
                self._emit(Transcript(result.text, final=False, language=result.language))
                self._on_interim(_Interim(result.text.strip(), result.language, t_end, result))
            return result
        except Exception as e:
            # Interim text is best effort. A broken engine is reported once, by the final decode,
            # not as an "internal error" every partial_interval_s while the person talks.
            self._log.debug("partial transcript failed: %s", e)
            return None
        finally:
            if self._partial is not None and self._partial[0] is asyncio.current_task():
                self._partial = None

    def _on_interim(self, interim: _Interim) -> None:
        self._interim = interim
        self._update_endpoint()
        if self._covers(interim.t_end):
            self._start_preemptive(interim.text)

    def _start_preemptive(self, text: str) -> None:
        """Start the reply to ``text`` now, heard only if the final transcript says the same."""
        if not self.options.preemptive_generation or self._closed:
            return
        if self._preempt is not None and same_words(self._preempt.user_text, text):
            return
        self._discard(self._preempt)
        self._preempt = None
        if self._reply is not None or self._barge_pending:
            return  # talking over the agent: most of that is backchannel, never a turn of its own
        reply = _Reply(0, self._turn + 1, user_text=text, history_len=len(self.history), held=[],
                       heard_until=self._interim.t_end if self._interim else self.segmenter.now)
        self._reply_seq += 1
        reply.id = self._reply_seq
        reply.played = asyncio.get_running_loop().create_future()
        messages = [{"role": "system", "content": self.config.system_prompt}, *llm_messages(self.history),
                    {"role": "user", "content": text}]
        reply.task = self._spawn(self._run_reply(reply, None, messages), f"preemptive reply {reply.id}")
        self._preempt = reply
        self.preemptive.started += 1

    def _discard(self, reply: _Reply | None) -> None:
        """Cancel a preemptive reply that will not be heard (nothing of it reached the player)."""
        if reply is None:
            return
        if reply.task is not None:
            reply.task.cancel()
        self.preemptive.discarded += 1
        self._discarded_since_reply += 1

    def _adopt(self, pre: _Reply, text: str, turn: _Reply) -> None:
        """The final transcript confirmed the preemptive reply's words: it becomes this turn's reply."""
        self.history.append({"role": "user", "content": text})
        for name in ("t_decided", "t_speech_end", "stt_ms", "stt_engine_ms", "endpoint_ms"):
            setattr(pre, name, getattr(turn, name))
        self._reply = pre
        self.preemptive.used += 1
        if self.segmenter.speaking:
            self._barge_pending = True  # as in _start_reply: they started again meanwhile
            self.player.pause()
        if self.state is not AgentState.USER_SPEAKING:
            self._set_state(AgentState.THINKING)
        held, pre.held = pre.held or [], None
        for item in held:
            if isinstance(item, Segment):
                self.player.push(item)
            else:
                self._emit(item)

    def _cancel_partial(self) -> None:
        if self._partial is not None:
            self._partial[0].cancel()
            self._partial = None

    async def _user_turn(self, ev: SpeechEnd, reply: _Reply, reuse: asyncio.Task | None,
                         preempt: _Reply | None = None) -> None:
        try:
            preempt = await self._decide_turn(ev, reply, reuse, preempt)
        finally:
            self._discard(preempt)  # whatever the outcome, an unconfirmed early reply is never heard

    async def _decide_turn(self, ev: SpeechEnd, reply: _Reply, reuse: asyncio.Task | None,
                           preempt: _Reply | None) -> _Reply | None:
        """Transcribe the turn and answer it; returns the preemptive reply if it was not used."""
        audio = ev.audio
        if self.stt is None:
            return preempt
        result = None
        t_stt = time.monotonic()
        try:
            async with asyncio.timeout(self.options.stt_timeout_s):
                if reuse is not None:
                    result = await reuse
                if result is None:
                    result = await self.stt.transcribe(audio, final=True, language=self.config.language,
                                                       prompt=self.config.stt_prompt)
        except Exception as e:  # the model failed to load or decode: say so, keep listening
            self._log.exception("speech recognition failed")
            self._emit(ErrorEvent("stt", f"speech recognition failed: {e}"))
        reply.stt_ms = (time.monotonic() - reply.t_decided) * 1000
        reply.stt_engine_ms = (time.monotonic() - t_stt) * 1000
        text = result.text.strip() if result else ""
        if text and reply.turn != self._turn:
            # A newer utterance was already decided while this one was transcribed: keep the words,
            # and let the newer turn's reply answer both instead of starting one only to cut it off.
            self.history.append({"role": "user", "content": text})
            self._emit(Transcript(text, final=True, language=result.language, speech_s=ev.speech_s, pauses=ev.pauses,
                                    audio=ev.audio))
            return preempt
        if not text:
            if self._reply is None and not self.segmenter.speaking:
                self._set_state(AgentState.LISTENING)
            return preempt
        self._interrupt()  # a reply still thinking is superseded by this newer turn
        self._emit(Transcript(text, final=True, language=result.language, speech_s=ev.speech_s, pauses=ev.pauses,
                                    audio=ev.audio))
        if (preempt is not None and same_words(preempt.user_text, text) and preempt.turn == reply.turn
                and preempt.history_len == len(self.history) and not preempt.task.done()):
            self._adopt(preempt, text, reply)
            return None
        self._start_reply(text, reply)
        return preempt

    # ------------------------------------------------------------------ replies

    def _start_reply(self, user_text: str | None, reply: _Reply, fixed: str | None = None) -> None:
        if user_text is not None:
            self.history.append({"role": "user", "content": user_text})
        self._reply_seq += 1
        reply.id = self._reply_seq
        reply.played = asyncio.get_running_loop().create_future()
        self._reply = reply
        if self.segmenter.speaking:
            # The person started talking again while this turn was transcribed: the reply waits, as
            # if they had barged in at its first word (resumed after a backchannel, else cancelled).
            self._barge_pending = True
            self.player.pause()
        if self.state is not AgentState.USER_SPEAKING:
            self._set_state(AgentState.THINKING)
        reply.task = self._spawn(self._run_reply(reply, fixed), f"reply {reply.id}")

    async def _run_reply(self, reply: _Reply, fixed: str | None, messages: list[dict] | None = None) -> None:
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        pushed = False

        async def generate() -> None:
            try:
                if fixed is not None:  # a scripted line (the greeting): no LLM, same sentence flow
                    reply.t_llm_request = time.monotonic()
                    agg = SentenceAggregator()
                    for s in [*agg.push(fixed + " "), *agg.flush()]:
                        await self._queue_sentence(reply, s, sentences)
                    return
                nonlocal messages
                if messages is None:
                    messages = [{"role": "system", "content": self.config.system_prompt}, *llm_messages(self.history)]
                agg = SentenceAggregator()
                reply.t_llm_request = time.monotonic()
                try:
                    async for delta in self.llm.stream(messages):
                        if reply.t_first_token is None:
                            reply.t_first_token = time.monotonic()
                        for s in agg.push(delta):
                            await self._queue_sentence(reply, s, sentences)
                    for s in agg.flush():
                        await self._queue_sentence(reply, s, sentences)
                except LLMError as e:
                    self._log.warning("turn %d: %s", reply.turn, e)
                    self._reply_emit(reply, ErrorEvent("llm", str(e)))
                    for s in agg.flush():  # keep what was already said
                        await self._queue_sentence(reply, s, sentences)
                    if not reply.text:
                        await self._queue_sentence(reply, self.options.llm_fallback_line, sentences)
            finally:
                await sentences.put(None)

        async def speak() -> None:
            nonlocal pushed
            while (sentence := await sentences.get()) is not None:
                if await self._synthesize(reply, sentence):
                    pushed = True

        async with asyncio.TaskGroup() as tg:
            tg.create_task(generate())
            tg.create_task(speak())
        if pushed:
            self._push(reply, Segment(reply.id, "", complete=True, last=True))
            try:
                async with asyncio.timeout(self.options.max_reply_s):
                    await reply.played
            except TimeoutError:
                self._log.warning("turn %d: reply never finished playing", reply.turn)
        self._finish(reply)

    async def _queue_sentence(self, reply: _Reply, sentence: str, queue: asyncio.Queue) -> None:
        if reply.t_first_sentence is None:
            reply.t_first_sentence = time.monotonic()
        reply.text.append(sentence)
        self._reply_emit(reply, BotText(sentence, spoken=False))
        await queue.put(sentence)

    def _push(self, reply: _Reply, seg: Segment) -> None:
        if reply.held is not None:
            reply.held.append(seg)
        else:
            self.player.push(seg)

    def _reply_emit(self, reply: _Reply, ev: Event) -> None:
        if reply.held is not None:
            reply.held.append(ev)
        else:
            self._emit(ev)

    async def _synthesize(self, reply: _Reply, sentence: str) -> bool:
        """Speak one sentence into the player; on failure the text stays on screen. True if audio."""
        resampler = StreamResampler(OUTPUT_RATE)
        seg = Segment(reply.id, sentence)
        t0 = time.monotonic()
        # The reply's first sound starts without the engine's leading silence; later sentences
        # keep theirs, the pause between sentences.
        trim = LeadingSilenceTrimmer(OUTPUT_RATE) if reply.t_tts_start is None else None
        if reply.t_tts_start is None:
            reply.t_tts_start = t0
        pushed = False

        def add(pcm: np.ndarray, words) -> None:
            nonlocal pushed
            if trim is not None:
                pcm = trim.process(pcm)
                if trim.dropped:
                    shift = trim.dropped / OUTPUT_RATE
                    words = [Word(w.text, max(0.0, w.start - shift)) for w in words]
            seg.append(pcm, words)
            if len(seg.pcm) and not pushed:
                # Queued at its first audio so playback starts while the rest is synthesized.
                pushed = True
                self._push(reply, seg)

        try:
            async with asyncio.timeout(self.options.tts_timeout_s):
                rate = 24000
                async for chunk in self.tts.synthesize(sentence, self.config.language or "en", self.config.voice):
                    if reply.tts_ttfb_ms is None and len(chunk.pcm):
                        reply.tts_ttfb_ms = (time.monotonic() - t0) * 1000  # the engine's time, not our resampling
                    rate = chunk.sample_rate
                    add(float_to_int16(resampler.process(chunk.pcm, rate)), chunk.words)
                add(float_to_int16(resampler.process(np.zeros(0, np.float32), rate, last=True)), ())
                if trim is not None and not trim.done:
                    add(trim.flush(), ())  # a silent sentence is still a sentence
        except (TTSError, TimeoutError) as e:
            self._log.warning("turn %d: tts failed: %s", reply.turn, e)
            self._reply_emit(reply, ErrorEvent("tts", f"speech synthesis failed: {e}"))
            if not pushed:
                self._reply_emit(reply, BotText(sentence, spoken=False, tts_failed=True))
        finally:
            seg.complete = True  # never leave the player waiting on a sentence that will not grow
        return pushed

    # ------------------------------------------------------------------ playback callbacks (audio clock)

    def _on_reply_start(self, reply_id: int) -> None:
        reply = self._reply
        if reply is None or reply.id != reply_id:
            return
        reply.started_playing = True
        now = time.monotonic()
        self._emit(BotStartedSpeaking())
        if not self._barge_pending:
            self._set_state(AgentState.SPEAKING)
        m = TurnMetrics(reply.turn, stt_ms=reply.stt_ms, endpoint_ms=reply.endpoint_ms,
                        preemptive=reply.user_text is not None, llm_discarded=self._discarded_since_reply)
        self._discarded_since_reply = 0
        if reply.t_first_token is not None:
            m.llm_ttft_ms = (reply.t_first_token - reply.t_llm_request) * 1000
        m.tts_ttfb_ms = reply.tts_ttfb_ms
        if reply.t_speech_end is not None:
            m.voice_to_voice_ms = (now - reply.t_speech_end) * 1000

        def after_decision(t0: float, t1: float) -> float:
            # A preemptive reply's engines ran partly during the endpoint silence: only what
            # came after the turn was decided counts against the time since then.
            return max(t1 - max(t0, reply.t_decided), 0.0) * 1000

        # Engine time only: stt_ms also counts the hop that started this turn's task (ours).
        llm_ms = after_decision(reply.t_llm_request, reply.t_first_sentence or reply.t_llm_request)
        tts_ms = 0.0
        if reply.t_tts_start is not None and m.tts_ttfb_ms is not None:
            tts_ms = after_decision(reply.t_tts_start, reply.t_tts_start + m.tts_ttfb_ms / 1000)
        engines = (reply.stt_engine_ms or 0) + llm_ms + tts_ms
        m.pipeline_ms = max((now - reply.t_decided) * 1000 - engines, 0.0)
        self.metrics.append(m)
        self._emit(m)

    def _on_segment_start(self, seg: Segment) -> None:
        if self._reply is not None and seg.reply_id == self._reply.id:
            self._emit(BotText(seg.text, spoken=True))

    def _on_reply_end(self, reply_id: int) -> None:
        if self._reply is not None and self._reply.id == reply_id and not self._reply.played.done():
            self._reply.played.set_result(None)

    # ------------------------------------------------------------------ ending replies

    def _finish(self, reply: _Reply) -> None:
        """The reply was generated and played in full."""
        if self._reply is not reply:
            return
        self._reply = None
        full = " ".join(reply.text).strip()
        if full:
            self.history.append({"role": "assistant", "content": full})
            self._emit(BotTurnEnded(full))
        self.player.forget(reply.id)
        if reply.started_playing:
            self._emit(BotStoppedSpeaking())
        if not self.segmenter.speaking:
            self._set_state(AgentState.LISTENING)

    def _interrupt(self) -> None:
        """Cut the current reply off: silence now, cancel its work, keep only what was heard."""
        reply = self._reply
        if reply is None:
            return
        self._finish_interrupted(reply)
        if reply.task is not None and reply.task is not asyncio.current_task():
            reply.task.cancel()

    def _finish_interrupted(self, reply: _Reply) -> None:
        self._reply = None
        self._barge_pending = False
        heard = self.player.heard_text(reply.id)
        self.player.clear(reply.id)
        full = " ".join(reply.text).strip()
        if heard:
            self.history.append({"role": "assistant", "content": heard, "interrupted": True})
            self._emit(BotTurnEnded(heard, interrupted=True))
        if reply.started_playing:
            self._emit(BotInterrupted(spoken_text=heard, full_text=full))
            self._emit(BotStoppedSpeaking(interrupted=True))
        self._log.info("turn %d interrupted after %d words", reply.turn, len(heard.split()))  # no words in logs

    # ------------------------------------------------------------------ plumbing

    def _set_state(self, state: AgentState) -> None:
        if state is not self.state:
            previous, self.state = self.state, state
            self._emit(StateChanged(state, previous))

    def _spawn(self, coro: Coroutine, what: str) -> asyncio.Task:
        return self._tasks.spawn(coro, what)

    def _task_failed(self, task: asyncio.Task, exc: BaseException) -> None:
        self._emit(ErrorEvent("pipeline", f"internal error in {task.get_name()}: {exc}"))


def llm_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """History as the chat API wants it (our bookkeeping keys stripped)."""
    return [{"role": m["role"], "content": m["content"]} for m in history]

