"""``Generators``: the backends of one app (or one CLI run), each built on first use, then shared."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.generation.backends.extractive import ExtractiveGenerator, load_rules
from service.generation.backends.gguf import GGUFGenerator
from service.generation.backends.local import DEFAULT_LM_PATH, LocalGenerator
from service.generation.backends.openai import OpenAIGenerator
from service.generation.base import GeneratorUnavailable
from service.generation.rewrite import QuestionRewriter
from service.settings import BACKENDS

if TYPE_CHECKING:
    from mm.calibration import Calibration
    from service.generation.base import Generator
    from service.settings import Settings


def checkpoint_dir(model: str) -> Path | None:
    """The checkpoint directory a model name or path resolves to (None for an untrained config)."""
    from mm.errors import ConfigError
    from mm.model import resolve

    try:
        _, ckpt = resolve(model)
    except (ConfigError, FileNotFoundError, ValueError):
        return None
    if ckpt is None:
        return None
    return ckpt if ckpt.is_dir() else ckpt.parent


class Generators:
    """The backends of one app, built on first use and then shared across requests.

    ``calibration``: the embedder's (``mm.calibration``); the extractive backend's rules are read from
    beside the checkpoint of ``settings.model`` and checked against it (:func:`load_rules`).
    """

    def __init__(
        self,
        settings: Settings,
        vector_of: Callable[[int], np.ndarray | None],
        calibration: Calibration | None = None,
    ):
        self.settings = settings
        self.vector_of = vector_of
        self.calibration = calibration
        self._made: dict[str, Generator] = {}
        self._rewriter: QuestionRewriter | None = None
        self._lock = threading.Lock()
        s = settings
        self._build: dict[str, Callable[[], Generator]] = {  # one per name of service.settings.Backend
            "extractive": self._extractive,
            "local": lambda: LocalGenerator(s.lm_path or DEFAULT_LM_PATH, vector_of),
            "openai": lambda: OpenAIGenerator(
                s.openai_base_url, s.openai_api_key, s.openai_model, s.openai_timeout
            ),
            "gguf": lambda: GGUFGenerator(s.gguf_path),
        }
        assert tuple(self._build) == BACKENDS, "a backend of service.settings.Backend has no builder"

    def _extractive(self) -> Generator:
        try:
            rules = load_rules(checkpoint_dir(self.settings.model), self.calibration)
        except ValueError as exc:  # the server's files, not the request: 503, not 422
            raise GeneratorUnavailable("extractive", str(exc)) from exc
        return ExtractiveGenerator(rules=rules)

    def rewriter(self) -> QuestionRewriter:
        """The question rewriter (``service.generation.rewrite``), made on first use (its model loads on
        its first rewrite, or :meth:`QuestionRewriter.load`)."""
        with self._lock:
            if self._rewriter is None:
                self._rewriter = QuestionRewriter()
            return self._rewriter

    def rewrites(self, wanted: bool | None) -> bool:
        """Whether a request's question is rewritten: its own ``rewrite``, else ``MM_REWRITE``."""
        return wanted if wanted is not None else self.settings.rewrite != "off"

    @property
    def default(self) -> str:
        return self.settings.generator

    def get(self, name: str | None = None) -> Generator:
        name = name or self.default
        if name not in self._build:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        with self._lock:
            if name not in self._made:
                self._made[name] = self._build[name]()
            return self._made[name]
