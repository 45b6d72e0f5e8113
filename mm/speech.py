"""Speech transcription: greedy Whisper decoding with language detection on the CPU, and a speech detector.

:class:`Transcriber` runs the packaged Whisper model (``base``: ~99 languages; ``tiny.en``) through
CTranslate2 (``pip install ctranslate2==4.8.5``), int8 by default, and returns a :class:`Transcript`
(text, language) or None for a clip without speech.

Window. Whisper was trained on 30 s windows; CTranslate2's own path encodes all 30 s (1.2 s for base
on 2 cores, most of a spoken query's time). We encode the clip padded with silence to ``window_seconds``
(10 s by default; never less than the clip + 1 s, never more than 30 s). Measured on espeak-ng sentences
and human single words: the clip's bare length makes Whisper loop ("7 7 7 7 ...", repeated sentences)
and garbles words, 5 s still hurts single words, 8-10 s transcribes like 30 s at a third of the cost.
``encoder="torch"`` computes the encoder output with our own module (:mod:`mm.encoders.whisper`) and
hands it to CTranslate2's decoder, which accepts any number of frames; ``"ct2"`` (default) uses
CTranslate2's int8 encoder, faster here than our fp32 one.

Speech detector (two stages; thresholds from Sonic Pi drums and Tux Paint animal sounds against
espeak-ng sentences and human Tux Paint words, see ``benchmarks/bench_audio.py``):

1. cheap, before any model runs (:func:`voiced_seconds`): at least ``min_voiced_seconds`` of voiced,
   non-silent audio (a normalised autocorrelation peak at 70-400 Hz). Cymbals, snares, noise and
   silence stop here.
2. after decoding: not (Whisper's no-speech probability > ``max_no_speech_prob`` and the mean token
   log-probability < ``no_speech_logprob``) (openai-whisper's own rule), the mean log-probability above
   ``min_avg_logprob`` (drums decode as "you" at about -2 to -3.5), and a transcript that is not a loop
   (animal calls come back as "ha ha ha ha", "BEEEEE", "Grrr! Grrr!").

Index letters: n samples, m mel bins, f frames, t encoder tokens, d width.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mm.encoders.whisper import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    packaged_model_dir,
    whisper_log_mel,
    whisper_package,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install ctranslate2==4.8.5"


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # ISO code ("en", "fr"); Whisper's detection, or "en" for English-only models
    language_prob: float
    no_speech_prob: float
    avg_logprob: float

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "language": self.language}


# A spoken query searches with normalise(clip + w * transcript): both unit vectors in the shared space.
# Measured on the demo collection (Tux Paint stamp images as targets; benchmarks/bench_audio.py, fusion):
# R@1 clip alone 0.19 / transcript alone 0.25 / fused w=1 0.35, w=2 0.37, w=4 0.31 for human recordings,
# 0.00 / 0.12 / 0.17, 0.22, 0.17 for espeak-ng captions; R@10 is best at w=0.5-1 and close at 2.
SPOKEN_TEXT_WEIGHT = 2.0


def fuse_spoken(clip: np.ndarray, transcript: np.ndarray, weight: float = SPOKEN_TEXT_WEIGHT) -> np.ndarray:
    """The query vector of a spoken query: ``normalise(clip + weight * transcript)``, ``(D,)`` float32."""
    v = np.asarray(clip, np.float32) + weight * np.asarray(transcript, np.float32)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class SpeechGate:
    """Thresholds of the speech detector (see the module docstring)."""

    min_voiced_seconds: float = 0.05
    max_no_speech_prob: float = 0.6  # Whisper's rule: no speech when above this ...
    no_speech_logprob: float = -1.0  # ... and the mean token log-probability is below this
    min_avg_logprob: float = -1.8  # a transcript this unsure is dropped whatever no_speech says
    max_repeat_ratio: float = 0.5  # a transcript of >= 2 words whose distinct words are <= this share
    # (a loop); 0 turns the loop check off


def voiced_seconds(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Seconds of voiced sound: 30 ms frames (10 ms hop) that are loud (RMS over 5% of the clip's
    loudest frame and over 1e-3) with a normalised autocorrelation peak > 0.5 at a 70-400 Hz lag."""
    frame, hop = int(0.03 * rate), int(0.01 * rate)
    w = np.asarray(wave, dtype=np.float32)
    if len(w) < frame:
        w = np.pad(w, (0, frame - len(w)))
    frames = np.lib.stride_tricks.sliding_window_view(w, frame)[::hop]  # (F, frame)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(1))
    loud = rms > max(rms.max() * 0.05, 1e-3)
    if not loud.any():
        return 0.0
    x = frames[loud] - frames[loud].mean(1, keepdims=True)
    n_fft = 1 << int(np.ceil(np.log2(2 * frame)))
    ac = np.fft.irfft(np.abs(np.fft.rfft(x, n_fft)) ** 2, n_fft)[:, :frame]  # (F', lag)
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    peak = ac[:, rate // 400 : rate // 70].max(1)
    return float((peak > 0.5).sum() * hop / rate)


_WORD = re.compile(r"\w+", re.UNICODE)


def is_loop(text: str, max_repeat_ratio: float = 0.5) -> bool:
    """A transcript that repeats itself: few distinct words among >= 2, or one letter held 4+ times."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 2 and len(set(words)) / len(words) <= max_repeat_ratio:
        return True
    return bool(re.search(r"(\w)\1{3,}", text))


class Transcriber:
    """Whisper speech recognition on the CPU: ``transcribe(clip) -> Transcript | None``.

    ``model``: "base" (multilingual) or "tiny.en", or a CTranslate2 Whisper folder. ``compute_type``:
    CTranslate2's ("int8", "float32", ...). ``threads``: intra-op threads (0: CTranslate2's default).
    ``languages``: restrict language detection to these codes (e.g. the languages the text tower reads);
    None: any of Whisper's. Synthetic or very short speech is sometimes detected as an unrelated language
    (espeak-ng English as Thai), which a restriction prevents. Thread-safe: calls are serialised.
    """

    def __init__(
        self,
        model: str | Path = "base",
        compute_type: str = "int8",
        threads: int = 2,
        window_seconds: float = 10.0,
        encoder: str = "ct2",
        gate: SpeechGate | None = None,
        languages: tuple[str, ...] | None = None,
    ):
        try:
            import ctranslate2
        except ImportError as e:
            raise ImportError(f"speech transcription needs CTranslate2: {INSTALL_HINT}") from e
        import tokenizers

        if encoder not in ("ct2", "torch"):
            raise ValueError(f"encoder must be 'ct2' or 'torch', got {encoder!r}")
        folder = Path(model) if Path(str(model)).is_dir() else packaged_model_dir(str(model))
        self.multilingual = (
            whisper_package(str(model)).multilingual if not Path(str(model)).is_dir() else None
        )
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(
            str(folder), device="cpu", compute_type=compute_type, intra_threads=threads
        )
        if self.multilingual is None:
            self.multilingual = bool(self.model.is_multilingual)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.window_samples = int(min(max(window_seconds, 0.0), 30.0) * SAMPLE_RATE)
        self.gate = gate or SpeechGate()
        self.encoder = encoder
        self.languages = tuple(languages) if languages else None
        self._net: Any = None
        if encoder == "torch":
            import torch

            from mm.encoders.whisper import load_whisper_encoder

            self._net = load_whisper_encoder(folder / "model.bin")
            self._torch = torch
        self._lock = threading.Lock()

    def features(self, wave: np.ndarray) -> np.ndarray:
        """(N,) 16 kHz -> (1, 80, F): the clip padded with silence to the window (>= clip + 1 s, <= 30 s)."""
        import torch

        n = min(max(self.window_samples, len(wave) + SAMPLE_RATE), WINDOW_SAMPLES)
        n = -(-n // 320) * 320  # whole encoder tokens
        feats = whisper_log_mel(torch.from_numpy(np.ascontiguousarray(wave[:WINDOW_SAMPLES])), pad_to=n)
        return np.ascontiguousarray(feats[None].numpy())

    def _encode(self, feats: np.ndarray) -> Any:
        if self._net is None:
            return self.model.encode(self._ct2.StorageView.from_array(feats))
        with self._torch.inference_mode():
            out, _ = self._net(self._torch.from_numpy(feats))
        return self._ct2.StorageView.from_array(np.ascontiguousarray(out.numpy()))

    def _detect(self, enc: Any) -> tuple[str, float]:
        """The most probable language (among ``languages`` when set) and its probability."""
        ranked = [(tok.strip("<|>"), float(p)) for tok, p in self.model.detect_language(enc)[0]]
        if self.languages is not None:
            ranked = [(code, p) for code, p in ranked if code in self.languages] or ranked
        return ranked[0]

    def transcribe(self, clip: Any, language: str | None = None) -> Transcript | None:
        """Text and language of the speech in ``clip`` (path, bytes or (wave, rate)), or None without speech.

        ``language`` ("en", "fr", ...) skips detection. Clips longer than 30 s are cut to their first 30 s.
        """
        from mm.media import load_audio

        wave = load_audio(clip, target_rate=SAMPLE_RATE)[:WINDOW_SAMPLES]
        if voiced_seconds(wave) < self.gate.min_voiced_seconds:
            return None
        with self._lock:
            enc = self._encode(self.features(wave))
            if language is not None:
                lang, lang_prob = language, 1.0
            elif self.multilingual:
                lang, lang_prob = self._detect(enc)
            else:
                lang, lang_prob = "en", 1.0
            prompt = ["<|startoftranscript|>"]
            if self.multilingual:
                prompt += [f"<|{lang}|>", "<|transcribe|>"]
            prompt.append("<|notimestamps|>")
            seconds = len(wave) / SAMPLE_RATE
            r = self.model.generate(
                enc,
                [prompt],
                beam_size=1,
                max_length=min(224, 8 + int(10 * seconds)),  # ~3 tokens/s is fast speech; loops stop here
                return_scores=True,
                return_no_speech_prob=True,
            )[0]
        text = self.tokenizer.decode(r.sequences_ids[0]).strip()
        t = Transcript(text, lang, float(lang_prob), float(r.no_speech_prob), float(r.scores[0]))
        g = self.gate
        if (
            not text
            or (t.no_speech_prob > g.max_no_speech_prob and t.avg_logprob < g.no_speech_logprob)
            or t.avg_logprob < g.min_avg_logprob
            or (g.max_repeat_ratio > 0 and is_loop(text, g.max_repeat_ratio))
        ):
            logger.debug(
                "no speech: %r (no_speech %.2f, logprob %.2f)", text, t.no_speech_prob, t.avg_logprob
            )
            return None
        return t
