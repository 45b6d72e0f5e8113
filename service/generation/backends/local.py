"""The ``local`` backend: the project's grounded decoder (``mm/lm.py``), loaded on first use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.generation.base import GeneratorUnavailable

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
        prompt = lm.build_prompt(question, [h.item.caption for h in items])
        max_new = min(max_tokens, lm.cfg.max_len - 1)
        return lm.generate(prompt, prefix, max_new_tokens=max_new, temperature=temperature, stop=stop, seed=0)
