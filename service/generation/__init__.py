"""Answers grounded in retrieved items, from pluggable backends, streamed piece by piece.

Backends (``MM_GENERATOR`` or a per-request ``backend``; the names are ``service.settings.Backend``):

- ``extractive``: no model; a deterministic sentence naming each retrieved item with its citation.
- ``local``: the project's grounded decoder (``mm/lm.py``); items enter as prefix vectors + captions.
- ``openai``: any OpenAI-compatible endpoint (``MM_OPENAI_BASE_URL``, ``MM_OPENAI_API_KEY``,
  ``MM_OPENAI_MODEL``), streamed with httpx.
- ``gguf``: a local GGUF model through the optional ``llama-cpp-python`` (``MM_GGUF_PATH``, else the
  packaged Gemma 3 270M of the ``llm`` extra).

A backend that cannot answer (not installed, model missing, endpoint down) raises
:class:`GeneratorUnavailable` (HTTP 503); bad parameters raise ``ValueError`` (HTTP 422).
Every answer cites the items it was given (``service.schemas.Citation``).

One concept per module:

- ``base``: what every backend shares (the ``Generator`` protocol, ``GeneratorUnavailable``, parameter
  checks, the stop-string filter);
- ``prompts``: how retrieved items are put into words for a model;
- ``backends/``: one module per backend;
- ``rewrite``: the opt-in question rewriter (``MM_REWRITE``): the packaged small LM names the thing a
  question asks for, and that name is searched and answered;
- ``glosses``: WordNet's glosses (our reader) as the rewriter's evidence for a name;
- ``registry``: ``Generators``, the backends of one app (or one CLI run), built on first use;
- ``bridge``: ``iterate_in_thread``, a blocking generator driven from the event loop;
- ``usecases``: answering a question (start a backend in its thread, wait for its first piece, cite
  the items used), shared by ``POST /generate``, the WebSocket, the OpenAI-compatible API and ``mm ask``.

The items an answer is grounded in come from the one search path (``service.search.answer`` of the
request's ``SearchQuery``).
"""

from service.generation.backends.extractive import ExtractiveGenerator
from service.generation.backends.gguf import GGUFGenerator
from service.generation.backends.local import LocalGenerator
from service.generation.backends.openai import OpenAIGenerator
from service.generation.base import Generator, GeneratorUnavailable, check_params, with_stop
from service.generation.bridge import iterate_in_thread
from service.generation.registry import Generators
from service.generation.usecases import (
    Answer,
    answer_request,
    citations,
    generators_of,
    start_answer,
    start_stream,
)

__all__ = [
    "Answer",
    "answer_request",
    "ExtractiveGenerator",
    "GGUFGenerator",
    "Generator",
    "GeneratorUnavailable",
    "Generators",
    "LocalGenerator",
    "OpenAIGenerator",
    "check_params",
    "citations",
    "generators_of",
    "iterate_in_thread",
    "start_answer",
    "start_stream",
    "with_stop",
]
