"""The ``local`` backend: the project's grounded decoder (``mm/lm.py``), loaded on first use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.generation.base import GeneratorUnavailable
from service.generation.usage import Metered

if TYPE_CHECKING:
    from index.types import Hit

log = logging.getLogger(__name__)

DEFAULT_LM_PATH = Path(__file__).resolve().parents[3] / "mm" / "checkpoints" / "lm"


class LocalGenerator:
    """The grounded decoder of ``mm/lm.py``: prefix vectors of the first items + their captions."""

    name = "local"

    def __init__(self, path: str | Path, vector_of: Callable[[int], np.ndarray | None]):
        self.path = Path(path)
        self.vector_of = vector_of
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def max_items(self) -> int | None:
        return self._load().cfg.prefix_len

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from mm.errors import ConfigError
                from mm.lm import WEIGHTS_FILE, load_lm

                is_config = self.path.suffix == ".json"
                if not is_config and not (self.path / WEIGHTS_FILE).exists():
                    raise GeneratorUnavailable(
                        "local", f"no LM checkpoint at {self.path} (train one with benchmarks/train_lm.py)"
                    )
                try:
                    self._model = load_lm(self.path)
                except (ConfigError, OSError) as exc:
                    raise GeneratorUnavailable("local", str(exc)) from exc
            return self._model

    def stream(
        self, question: str, hits: list[Hit], *, max_tokens: int, temperature: float, stop: Sequence[str]
    ) -> Iterator[str]:
        lm = self._load()
        items = hits[: lm.cfg.prefix_len]
        vecs = [self.vector_of(h.id) for h in items]
        fit = [v for v in vecs if v is not None and v.shape[-1] == lm.cfg.embed_dim]
        prefix = None
        if vecs and len(fit) == len(vecs):
            prefix = np.stack(fit).astype(np.float32)  # (P', M)
        elif vecs:
            log.warning("item vectors do not match the LM's prefix width %d; captions only", lm.cfg.embed_dim)
        prompt, max_new = budget(
            lm.build_prompt(question, [h.item.caption for h in items]), max_tokens, lm.cfg.max_len
        )
        pieces = lm.generate(
            prompt, prefix, max_new_tokens=max_new, temperature=temperature, stop=stop, seed=0
        )
        n_prefix = 0 if prefix is None else min(len(prefix), lm.cfg.prefix_len)
        return Metered(pieces, len(prompt) + n_prefix, lambda text: len(lm.tokenizer.encode(text)))


MIN_ANSWER_SHARE = 4  # an answer may always take a quarter of the context, the prompt giving way


def budget(prompt: list[int], max_tokens: int, context: int) -> tuple[list[int], int]:
    """The prompt (cut to fit) and the new tokens allowed, both within ``context`` tokens.

    The prompt comes first: the answer gets what it leaves, up to ``max_tokens``; only when that is
    less than a quarter of the context (or of ``max_tokens``) does the prompt give way, losing the start
    of its item lines (BOS and the question at its end stay). A ``max_tokens`` as large as the context
    (OpenAI clients' defaults) thus no longer cuts the prompt down to its BOS.
    """
    floor = min(max_tokens, context // MIN_ANSWER_SHARE)
    max_new = max(min(max_tokens, context - len(prompt)), floor)
    room = context - max_new
    if len(prompt) > room:
        prompt = prompt[:1] + prompt[len(prompt) - room + 1 :]
    return prompt, max_new
