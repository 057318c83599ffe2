"""The audio side of the end of turn: Smart Turn v3, a small model that hears whether speech sounds finished.

Words alone often cannot tell: "He was not an ill disposed" reads as neither finished nor
unfinished, yet its pitch and rhythm say "more to come". Smart Turn v3 (Daily's open model: a
Whisper-tiny encoder and a linear head, 8 MB in int8, BSD-2) reads the last 8 s of the utterance's
audio and gives the probability that the turn is complete, in ~45 ms on one CPU thread.

The model file ships inside the ``pipecat-ai`` wheel, so nothing is downloaded at run time. Parley
reads only that file, never imports pipecat (whose pins would fight livekit's): install it with
``pip install --no-deps pipecat-ai``, or point ``PARLEY_TURN_MODEL`` at any Smart Turn v3 ONNX file.

How its answer is used is ``pipeline/endpointing.py``'s (``with_audio``); the conversation asks it
only when a pause's transcript leaves the words undecided (``Conversation._ask_turn_model``).
Measured by ``bench/endpointing.py``.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from .frames import PIPELINE_RATE

log = logging.getLogger(__name__)

WINDOW_S = 8  # the model's input: the last 8 s of the utterance, zeros before a shorter one
_SAMPLES = WINDOW_S * PIPELINE_RATE
_N_FFT, _HOP, _N_MELS = 400, 160, 80


class TurnModel(Protocol):
    def probability(self, audio: np.ndarray) -> float:
        """P(the turn is complete) for an utterance's 16 kHz audio so far. Blocking."""
        ...


def bundled_model() -> Path | None:
    """The Smart Turn v3 ONNX file of an installed ``pipecat-ai`` (the newest one it has), or None.
    Located, not imported: pipecat's package initialisation pulls in its whole dependency tree."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "audio" / "turn" / "smart_turn" / "data"
    files = sorted(data.glob("smart-turn-v3*.onnx"))
    cpu = [f for f in files if "cpu" in f.name]
    return (cpu or files or [None])[-1]


def resolve(setting: str) -> Path | None:
    """``turn_model`` setting -> model file: "auto" (the bundled one if installed), "off", or a path."""
    if setting == "off":
        return None
    if setting == "auto":
        return bundled_model()
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ValueError(f"turn model {setting!r}: no such file")
    return path


def features(audio: np.ndarray) -> np.ndarray:
    """The model's input ``[80, 800]``: Whisper's log-mel of the last 8 s (zeros before a shorter
    utterance), after scaling the waveform to zero mean and unit variance, as it was trained
    (Hugging Face's ``WhisperFeatureExtractor(chunk_length=8, do_normalize=True)``)."""
    x = np.asarray(audio, np.float32)[-_SAMPLES:]
    if len(x) < _SAMPLES:
        x = np.concatenate([np.zeros(_SAMPLES - len(x), np.float32), x])
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), _N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    spec = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2
    mel = np.log10(np.maximum(_mel_filters() @ spec.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    return np.hanning(_N_FFT + 1)[:-1]


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    # Whisper's own filterbank (Slaney-style, as librosa and Hugging Face build it).
    from faster_whisper.feature_extractor import FeatureExtractor

    return FeatureExtractor.get_mel_filters(PIPELINE_RATE, _N_FFT, n_mels=_N_MELS).astype(np.float64)


class SmartTurn:
    """P(the turn is complete) for an utterance's audio. Thread-safe; one per model file and process."""

    def __init__(self, path: Path):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        # One thread: it runs once per pause, beside the STT's own threads and many rooms' loops.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(str(path), sess_options=opts,
                                                         providers=["CPUExecutionProvider"])
        except Exception as e:
            raise RuntimeError(f"cannot load the turn model {path}: {e}") from e
        inputs = [(i.name, i.shape) for i in self._session.get_inputs()]
        if len(inputs) != 1 or list(inputs[0][1][1:]) != [_N_MELS, WINDOW_S * PIPELINE_RATE // _HOP]:
            raise RuntimeError(f"{path} is not a Smart Turn v3 model (inputs {inputs})")
        self._input = inputs[0][0]
        self.path = path
        # ONNX Runtime sizes its memory arena on the first run (~50 MB, and the slowest run): at load,
        # not at someone's first pause (and the process's memory is then steady from the start).
        self.probability(np.zeros(PIPELINE_RATE, np.float32))

    def probability(self, audio: np.ndarray) -> float:
        """Blocking (~45 ms on one core): call it from a thread."""
        out = self._session.run(None, {self._input: features(audio)[None]})[0]
        return float(np.asarray(out).reshape(-1)[0])


_loaded: dict[Path, SmartTurn] = {}
_lock = threading.Lock()


def load(setting: str) -> SmartTurn | None:
    """The process's turn model for the ``turn_model`` setting; None when off or not installed."""
    path = resolve(setting)
    if path is None:
        if setting == "auto":
            log.info("no turn model installed (pip install --no-deps pipecat-ai): the end of turn "
                     "reads the words only")
        return None
    with _lock:
        model = _loaded.get(path)
        if model is None:
            model = _loaded[path] = SmartTurn(path)
            log.info("turn model %s loaded", path.name)
        return model
