"""Named training recipes: the exact settings that produced a shipped checkpoint.

``mm train --recipe default --manifest corpus/manifest.jsonl --out DIR`` reproduces the shipped default
(seeded); flags given on the command line override the recipe's values.
"""

from __future__ import annotations

import copy
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # The shipped default (mm/checkpoints/default): the `small` config with the frozen USE-multilingual
    # text tower and Whisper base audio encoder, trained on the grown corpus (`mm samples build CORPUS
    # --sources all`: 49k rows, 39k for training) for 1,000 steps (4.0 epochs of the 32k source-weighted
    # rows; 48 min on the 2-core box with other work beside it, about 25 min alone). docs/results.md,
    # "Default model v2" and "v2.1".
    "default": {
        "model": "small",
        "overrides": {"text.kind": "use_multilingual", "text.dim": 512, "audio.kind": "whisper"},
        "max_steps": 1000,
        "batch_size": 128,
        "grad_accum": 1,
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 50,
        "bf16": False,  # measured: fp32 backward is faster than bf16 autocast on this CPU
        "seed": 0,
        "eval_every": 100,
        "ckpt_every": 100,
        # rows without an image borrow a same-label one (~4.9k more image-audio pairs): chosen on the
        # validation split (every audio direction +8-11 points R@10, text<->image within a point)
        "fill_views": ("image",),
        # CLDR's emoji names are half the corpus's training rows and crowd out the sources that carry
        # sounds (bench_sources' leave-one-out); seen at half rate, and the small sound sources more often:
        # on validation image->audio +6.8 points R@10, audio->image +2.7, text->audio -1.8, the others +0.4
        # to +1.0 (docs/results.md, "Default model v2.1")
        "source_weights": {"cldr": 0.5, "ktuberling": 2.0, "scratch": 3.0, "sonicpi": 2.0},
    },
}


def recipe_config(name: str) -> dict[str, Any]:
    """A copy of the recipe's TrainConfig keyword arguments (without manifest/out_dir)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
