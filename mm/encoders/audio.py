"""Audio encoder: log-mel spectrogram -> patch embedding (AST, Gong et al. 2021), trained from scratch.

``prepare(clips)`` takes paths, bytes or ``(waveform, rate)`` pairs, decodes them with
:func:`mm.media.load_audio` to mono at ``cfg.sample_rate``, keeps the centre ``cfg.max_seconds``, and
returns ``{"mel": (B, n_mels, F) float, "frame_mask": (B, F) bool}``: per-clip standardised
``log(1e-6 + mel power)``, zero-padded to the longest clip with F a multiple of ``patch_time`` (a very
short clip still gives one patch). ``collate`` merges such batches.

Token layout: the (n_mels, F) plane is cut into ``Fb = n_mels / patch_freq`` bands by
``Tp = F / patch_time`` time steps; tokens are time-major, token ``i = t * Fb + f`` is band ``f`` of time
step ``t``, so neighbouring tokens are neighbouring in time (what a sliding-window attention needs).
A learned band embedding tells each token its frequency band; time position is left to the backbone.

Index letters: b batch, m mel bins, f frames, t tokens, c width.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.config import AudioEncoderConfig
from mm.encoders.base import Encoder, EncoderOutput, masked_mean

logger = logging.getLogger(__name__)

LOG_EPS = 1e-6


class LogMelPatchEncoder(Encoder):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if cfg.n_mels % cfg.patch_freq:
            raise ValueError(f"n_mels {cfg.n_mels} must be a multiple of patch_freq {cfg.patch_freq}")
        if cfg.n_fft // 2 + 1 < cfg.n_mels:
            raise ValueError(f"n_fft {cfg.n_fft} gives fewer frequency bins than n_mels {cfg.n_mels}")
        self.cfg = cfg
        self.out_dim = cfg.dim
        self.sample_rate = cfg.sample_rate
        self.n_bands = cfg.n_mels // cfg.patch_freq
        self.proj = nn.Conv2d(
            1, cfg.dim, (cfg.patch_freq, cfg.patch_time), stride=(cfg.patch_freq, cfg.patch_time)
        )
        self.band = nn.Parameter(torch.randn(self.n_bands, cfg.dim) * 0.02)
        self.norm = nn.LayerNorm(cfg.dim)
        # CPU-side feature extraction state: plain tensors, deliberately not buffers (not in the state
        # dict, not moved to the GPU with the module).
        self._fbank: Tensor | None = None
        self._window: Tensor | None = None

    def log_mel(self, wave: Tensor) -> Tensor:  # (N,) -> (n_mels, F) with F = N // hop + 1
        """Standardised log-mel spectrogram of one mono clip at ``cfg.sample_rate``."""
        import torchaudio.functional as AF

        c = self.cfg
        if self._fbank is None:
            self._fbank = AF.melscale_fbanks(
                c.n_fft // 2 + 1, 0.0, c.sample_rate / 2, c.n_mels, c.sample_rate, norm=None, mel_scale="htk"
            )  # (n_freq, n_mels)
            self._window = torch.hann_window(c.n_fft)
        n = wave.shape[0]
        if n <= c.n_fft // 2:  # reflect padding in the centred STFT needs more samples than n_fft // 2
            wave = F.pad(wave, (0, c.n_fft // 2 + 1 - n))
        spec = torch.stft(wave, c.n_fft, c.hop, window=self._window, center=True, return_complex=True)
        power = spec.abs().pow(2)  # (n_freq, F)
        mel = self._fbank.T @ power  # (n_mels, F)
        mel = mel[:, : n // c.hop + 1]  # frames that cover real samples only
        x = torch.log(mel + LOG_EPS)
        # Per-clip standardisation: loudness-invariant, and silence (std 0) maps to zeros.
        return (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-3)

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        from mm.media import load_audio

        if not isinstance(raw, (list, tuple)) or (len(raw) == 2 and isinstance(raw[1], int)):
            raise TypeError(
                "prepare expects a list of clips (paths, bytes or (waveform, rate)); wrap one in a list"
            )
        c = self.cfg
        mels = []
        for src in raw:
            wave = load_audio(src, target_rate=c.sample_rate, crop_seconds=c.max_seconds)
            mels.append(self.log_mel(torch.from_numpy(wave)))
        longest = max((m.shape[1] for m in mels), default=1)
        frames = -(-longest // c.patch_time) * c.patch_time  # round up to whole patches (>= 1 patch)
        mel = torch.zeros(len(mels), c.n_mels, frames)
        frame_mask = torch.zeros(len(mels), frames, dtype=torch.bool)
        for i, m in enumerate(mels):
            mel[i, :, : m.shape[1]] = m
            frame_mask[i, : m.shape[1]] = True
        return {"mel": mel, "frame_mask": frame_mask}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        mel, frame_mask = batch["mel"], batch["frame_mask"]  # (B, M, F), (B, F)
        pt = self.cfg.patch_time
        extra = -mel.shape[-1] % pt
        if extra:  # batches assembled by hand may not be whole patches
            mel, frame_mask = F.pad(mel, (0, extra)), F.pad(frame_mask, (0, extra))
        b = mel.shape[0]
        x = self.proj(mel.unsqueeze(1))  # (B, C, Fb, Tp)
        tp = x.shape[-1]
        tokens = x.permute(0, 3, 2, 1) + self.band  # (B, Tp, Fb, C), band embedding broadcast over time
        tokens = self.norm(tokens.reshape(b, tp * self.n_bands, -1))  # (B, T, C), T = Tp * Fb, time-major
        step_mask = frame_mask.view(b, tp, pt).any(-1)  # (B, Tp) a patch is real if any frame is
        mask = step_mask.repeat_interleave(self.n_bands, dim=1)  # (B, T)
        return EncoderOutput(tokens, mask, masked_mean(tokens, mask))


AUDIO_KINDS = ("logmel_patch", "whisper", "sfx")


def build_audio_encoder(cfg: AudioEncoderConfig) -> Encoder:
    """Audio encoder for ``cfg.kind``: one tower, or several (a list) combined into one token stream.

    "logmel_patch" is trained from scratch; "whisper" (:mod:`mm.encoders.whisper`) and "sfx"
    (:mod:`mm.encoders.sfx`) load packaged weights and stay frozen (Whisper unless ``whisper_trainable``).
    """
    kinds = cfg.kinds
    unknown = [k for k in kinds if k not in AUDIO_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"audio kind {cfg.kind!r}: choose one or more distinct of {list(AUDIO_KINDS)}")
    towers = {k: _build_tower(k, cfg) for k in kinds}
    if len(towers) == 1:
        return towers[kinds[0]]
    from mm.encoders.combined import CombinedEncoder

    return CombinedEncoder(towers, cfg.max_seconds)


def _build_tower(kind: str, cfg: AudioEncoderConfig) -> Encoder:
    if kind == "logmel_patch":
        return LogMelPatchEncoder(cfg)
    if kind == "whisper":
        from mm.encoders.whisper import WhisperAudioEncoder

        return WhisperAudioEncoder(
            cfg.whisper_model, cfg.whisper_pretrained, cfg.max_seconds, trainable=cfg.whisper_trainable
        )
    from mm.encoders.sfx import SFXAudioEncoder

    return SFXAudioEncoder(cfg.sfx_pretrained, cfg.max_seconds)
