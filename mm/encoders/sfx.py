"""Sound-effects encoder: the aisfx 9-layer CNN (Ma & Lerch, ISMIR 2022), frozen, in our own module.

Weights: ``aisfx/models/checkpoint.pth`` of the PyPI package ``aisfx`` 0.1.2 (CC-BY-4.0: credit
"Representation Learning for the Automatic Indexing of Sound Effects Libraries", A. B. Ma and
A. Lerch), a ``torch.save`` of ``(state_dict, datasets)``; we read it with ``weights_only=True`` (the
datasets dict holds numpy integers, allow-listed) and keep the ``embedding_net.*`` tensors. The
package's own code (numpy 1.23, librosa 0.9) is never imported: install it with ``--no-deps``.

Network (``EmbeddingNet('max', 3, 1, 64)`` in aisfx): four blocks of two 3x3 conv + BatchNorm + ReLU
with 64, 128, 256, 512 channels, 2x2 max-pooling after the first three; input ``(B, T, 96)`` log-mel
frames, time-major. aisfx averages the last map over frequency and takes the max over time: one 512-d
vector per 100-frame block (2.3 s).

Input (aisfx's librosa path): 44.1 kHz mono, peak-normalised, power STFT (n_fft 2048 = window, hop
1024, Hann, zero-padded centre frames), 96 HTK mel bands 0-22.05 kHz each summing to 1,
``log10(10000 x + 1)``, divided by 9.4578 (the paper's dataset-wide maximum; its minimum is 0).

Tokens: the CNN runs over the whole clip at once (it is convolutional); the frequency-averaged last map
gives one 512-d token per 8 frames (~186 ms). Clips shorter than one block are zero-padded to 100 frames,
as aisfx pads its blocks, and that padding counts as real (the network saw it in training).
``pooled`` is the max over real tokens: aisfx's embedding for a clip of one block.

Index letters: b batch, t time frames, f mel bins, c channels.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.encoders.base import Encoder, EncoderOutput
from mm.encoders.packaged import PackagedWeights

logger = logging.getLogger(__name__)

WEIGHTS = PackagedWeights(
    package="aisfx",
    version="0.1.2",
    module="aisfx",
    folder="models",
    sha256={"checkpoint.pth": "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"},
)
INSTALL_HINT = "pip install --no-deps aisfx==0.1.2"
SAMPLE_RATE = 44100
N_FFT = 2048
HOP = 1024
N_MELS = 96
SPEC_MAX = 9.457798957824707  # aisfx 'original' normalisation: (x - 0) / (max - 0)
BLOCK_FRAMES = 100  # aisfx's embedding block (2.3 s)
TIME_STRIDE = 8  # three 2x2 max-pools


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, pool: bool, lengths: Tensor | None = None) -> Tensor:
        x = _zero_past(F.relu(self.bn1(self.conv1(x))), lengths)
        x = _zero_past(F.relu(self.bn2(self.conv2(x))), lengths)
        return F.max_pool2d(x, 2) if pool else x


def _zero_past(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero the frames past each clip's length, (B, C, T, F): what the conv padding of a lone clip sees."""
    if lengths is None:
        return x
    keep = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    return x * keep[:, None, :, None].to(x.dtype)


class SFXNet(nn.Module):
    """(B, T, F) normalised log-mel -> (B, C, T // 8) frequency-averaged features; C = 8 * width."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv_block1 = ConvBlock(1, width)
        self.conv_block2 = ConvBlock(width, 2 * width)
        self.conv_block3 = ConvBlock(2 * width, 4 * width)
        self.conv_block4 = ConvBlock(4 * width, 8 * width)
        self.dim = 8 * width

    def forward(self, spec: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``lengths`` (B,) frames per clip: a clip in a padded batch gives what it gives alone."""
        x = spec.unsqueeze(1)  # (B, 1, T, F)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3):
            x = block(x, True, lengths)
            if lengths is not None:  # the pool floors: a lone clip's odd last frame is dropped
                lengths = lengths // 2
                x = _zero_past(x, lengths)
        x = self.conv_block4(x, False, lengths)  # (B, C, T/8, F/8)
        return x.mean(dim=3)  # (B, C, T/8)


def _load_checkpoint(path: Path) -> dict[str, Tensor]:
    """The ``(state_dict, datasets)`` tuple, unpickled with ``weights_only`` (numpy ints allow-listed)."""
    from numpy._core.multiarray import scalar

    # numpy 1 pickles name numpy.core, numpy 2 numpy._core: allow the one function under both names
    allowed = [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype, type(np.dtype(np.int64))]
    with torch.serialization.safe_globals(allowed):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj[0] if isinstance(obj, tuple) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected (state_dict, datasets) or a state dict, got {type(obj).__name__}")
    return state


def load_sfx_net(path: str | Path | None = None) -> tuple[SFXNet, dict[str, Any]]:
    """The CNN from an aisfx-format checkpoint (default: the package's, sha256-checked) + its origin."""
    if path is None:
        try:
            path = WEIGHTS.path("checkpoint.pth")
        except ImportError as e:
            raise ImportError(f"the sfx audio encoder needs the aisfx weights: {INSTALL_HINT}") from e
        info: dict[str, Any] = WEIGHTS.metadata()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sfx checkpoint at {path}")
        info = {"file": str(path)}
    state = _load_checkpoint(Path(path))
    prefix = "embedding_net."
    net_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not net_state:
        raise ValueError(f"{path} holds no embedding_net.* tensors; is it an aisfx checkpoint?")
    width = net_state["conv_block1.conv1.weight"].shape[0]
    net = SFXNet(width)
    missing, unexpected = net.load_state_dict(net_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the aisfx CNN: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return net.eval(), info


@functools.cache
def _mel_filters() -> Tensor:  # (n_freq, n_mels), each band's weights summing to 1 (librosa norm=1)
    import torchaudio.functional as AF

    fb = AF.melscale_fbanks(
        N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE, norm=None, mel_scale="htk"
    )
    return fb / fb.sum(0, keepdim=True).clamp_min(1e-12)


def sfx_log_mel(wave: Tensor) -> Tensor:
    """aisfx's input for one mono 44.1 kHz clip: (N,) -> (T, 96) with T = N // 1024 + 1, in [0, ~1]."""
    wave = wave.float()
    peak = wave.abs().max()
    if peak > 0:
        wave = wave / peak
    spec = torch.stft(
        wave,
        N_FFT,
        HOP,
        window=torch.hann_window(N_FFT),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    mel = _mel_filters().T @ spec.abs().pow(2)  # (96, T)
    return (torch.log10(mel * 10000.0 + 1.0) / SPEC_MAX).T.contiguous()


class SFXAudioEncoder(Encoder):
    """aisfx CNN (frozen): tokens (B, T', 512), one per 8 frames (~186 ms); pooled = max over time."""

    def __init__(self, pretrained: str | Path | None = None, max_seconds: float = 30.0):
        super().__init__()
        self.net, self.weights_info = load_sfx_net(pretrained)
        self.out_dim = self.net.dim
        self.sample_rate = SAMPLE_RATE
        self.max_seconds = float(max_seconds)
        self.external_weights = True
        self.freeze()

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        """``{"spec": (B, T, 96), "frame_mask": (B, T)}``, T >= 100 frames (zero-padded, masked)."""
        from mm.media import load_audio

        if not isinstance(raw, (list, tuple)) or (len(raw) == 2 and isinstance(raw[1], int)):
            raise TypeError(
                "prepare expects a list of clips (paths, bytes or (waveform, rate)); wrap one in a list"
            )
        specs = []
        for src in raw:
            wave = load_audio(src, target_rate=SAMPLE_RATE, crop_seconds=self.max_seconds)
            s = sfx_log_mel(torch.from_numpy(wave))
            if s.shape[0] < BLOCK_FRAMES:  # one aisfx block, zero-padded like its blocking()
                s = F.pad(s, (0, 0, 0, BLOCK_FRAMES - s.shape[0]))
            specs.append(s)
        frames = max(s.shape[0] for s in specs)
        spec = torch.zeros(len(specs), frames, N_MELS)
        frame_mask = torch.zeros(len(specs), frames, dtype=torch.bool)
        for i, s in enumerate(specs):
            spec[i, : s.shape[0]] = s
            frame_mask[i, : s.shape[0]] = True
        return {"spec": spec, "frame_mask": frame_mask}

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        spec, frame_mask = batch["spec"], batch["frame_mask"]  # (B, T, F), (B, T)
        lengths = frame_mask.sum(1)  # (B,)
        feats = self.net(spec, None if bool(frame_mask.all()) else lengths)  # (B, C, T')
        tokens = feats.transpose(1, 2)  # (B, T', C), T' = T // 8
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        mask = steps[None, :] < (lengths // TIME_STRIDE)[:, None]  # (B, T') the pools floor, as aisfx's
        pooled = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return EncoderOutput(tokens, mask, torch.nan_to_num(pooled, neginf=0.0))
