"""Several audio towers as one encoder: every tower's tokens feed the backbone, side by side.

``kind: ["whisper", "sfx"]`` in an audio config builds a :class:`CombinedEncoder` over those towers.
Each tower keeps its own width; token channels are laid out in disjoint slots (tower i's ``C_i``
channels at offset ``sum(C_<i)``, zeros elsewhere), so ``out_dim = sum(C_i)`` and the model's input
projection is, in effect, a separate linear map per tower with no extra parameters. Each row's real
tokens come first, tower 0's then tower 1's ..., padding after (the prefix layout of every encoder);
``pooled`` concatenates the towers' pooled vectors along channels.

``prepare`` decodes each clip once (at the highest rate a tower reads, centre-cropped) and hands
``(wave, rate)`` to every tower, which resamples as it needs; batch keys are ``"<tower>.<key>"``.

Index letters: b batch, t tokens, c channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.encoders.base import Encoder, EncoderOutput


class CombinedEncoder(Encoder):
    def __init__(self, towers: dict[str, Encoder], max_seconds: float):
        super().__init__()
        if len(towers) < 2:
            raise ValueError("a combined encoder needs at least two towers")
        self.towers = nn.ModuleDict(towers)
        self.out_dim = sum(t.out_dim for t in towers.values())
        self.max_seconds = max_seconds
        # a frozen tower from a package keeps its own external_weights flag (checkpoints skip it);
        # the combination itself holds nothing of its own
        self.frozen = all(t.frozen for t in towers.values())
        self.sample_rate = max(int(getattr(t, "sample_rate", 16000)) for t in towers.values())

    @property
    def weights_info(self) -> dict[str, Any]:
        return {k: t.weights_info for k, t in self.towers.items() if hasattr(t, "weights_info")}

    def train(self, mode: bool = True) -> CombinedEncoder:
        for t in self.towers.values():
            t.train(mode)
        self.training = mode and not self.frozen
        return self

    def prepare(self, raw: list[Any]) -> dict[str, Tensor]:
        from mm.media import load_audio

        if not isinstance(raw, (list, tuple)) or (len(raw) == 2 and isinstance(raw[1], int)):
            raise TypeError(
                "prepare expects a list of clips (paths, bytes or (waveform, rate)); wrap one in a list"
            )
        # decode once, at the highest rate a tower reads; each tower resamples to its own
        decoded = [
            (load_audio(src, target_rate=self.sample_rate, crop_seconds=self.max_seconds), self.sample_rate)
            for src in raw
        ]
        out: dict[str, Tensor] = {}
        for name, tower in self.towers.items():
            out |= {f"{name}.{k}": v for k, v in tower.prepare(decoded).items()}
        return out

    def _split(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        p = name + "."
        return {k[len(p) :]: v for k, v in batch.items() if k.startswith(p)}

    def collate(self, batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, tower in self.towers.items():
            merged = tower.collate([self._split(b, name) for b in batches])
            out |= {f"{name}.{k}": v for k, v in merged.items()}
        return out

    def encode(self, batch: dict[str, Tensor]) -> EncoderOutput:
        tokens, masks, pooled = [], [], []
        offset = 0
        for name, tower in self.towers.items():
            o = tower(self._split(batch, name))  # frozen towers run under no_grad themselves
            c = tower.out_dim
            pad = (offset, self.out_dim - offset - c)
            tokens.append(F.pad(o.tokens.float(), pad))  # (B, T_i, sum C)
            masks.append(o.mask)
            pooled.append(o.pooled.float())
            offset += c
        toks, mask = torch.cat(tokens, 1), torch.cat(masks, 1)  # (B, sum T_i, C), (B, sum T_i)
        # real tokens first in every row, in tower order (a stable sort of the mask), padding after: the
        # prefix layout every encoder gives (the training feature cache keeps tokens[:n_real])
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, T)
        toks = toks.gather(1, order.unsqueeze(-1).expand(-1, -1, toks.shape[-1]))
        mask = mask.gather(1, order)
        t = max(int(mask.sum(1).max()), 1)
        return EncoderOutput(toks[:, :t], mask[:, :t], torch.cat(pooled, 1))

    def forward(self, batch: dict[str, Tensor]) -> EncoderOutput:
        return self.encode(batch)  # each tower moves its inputs and handles its own freezing
