"""Speech transcripts for ingest: the service's adapter from :class:`mm.speech.Transcriber` to the
``index.protocol.Transcribe`` callable (a decoded clip -> ``{"text", "language"}`` or None).

The recogniser (Whisper base through CTranslate2, int8) loads on the first clip that needs it, so runs
without audio never pay for it. Without CTranslate2 or the Whisper packages, ingest goes on without
transcripts after one warning naming what to install. ``MM_TRANSCRIBE=0`` turns transcription off
where a command does not say (``mm index --no-transcribe`` always does). ``MM_SPEECH_LANGUAGES=en,fr,...``
limits language detection to those codes (short or synthetic speech is otherwise sometimes taken for an
unrelated language: espeak-ng English for Thai).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)


def transcription_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given (a command-line switch), else ``MM_TRANSCRIBE`` (default on)."""
    if flag is not None:
        return flag
    return os.environ.get("MM_TRANSCRIBE", "1").strip().lower() not in ("0", "false", "no", "off")


class LazyTranscriber:
    """``transcribe(payload)`` for ingest; thread-safe (ingest calls it from its decode workers)."""

    def __init__(self, model: str = "base", **options: Any):
        self.model = model
        langs = [c.strip() for c in os.environ.get("MM_SPEECH_LANGUAGES", "").split(",") if c.strip()]
        self.options = ({"languages": tuple(langs)} if langs else {}) | options
        self._tr: Any = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._tr is None and self._unavailable is None:
                try:
                    from mm.speech import Transcriber

                    self._tr = Transcriber(self.model, **self.options)
                except (ImportError, OSError, ValueError) as e:  # ctranslate2 / Whisper package missing
                    self._unavailable = str(e)  # said once; later clips go without a transcript
                    log.warning("speech is not transcribed: %s", e)
            return self._tr

    def __call__(self, payload: Any) -> dict[str, str] | None:
        tr = self._get()
        if tr is None:
            return None
        heard = tr.transcribe(payload)
        return heard.to_dict() if heard is not None else None
