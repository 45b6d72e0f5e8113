"""Byte-level tokenizer for the grounded decoder (``mm/lm.py``).

Ids 0-255 are the UTF-8 bytes; four specials follow. A byte vocabulary keeps the embedding and output
tables tiny (260 rows instead of open_clip's 49k BPE rows, which alone would exceed the checkpoint's
size budget at any useful width) and can spell any caption, name or language without unknown tokens.
"""

from __future__ import annotations

import codecs

PAD, BOS, EOS, SEP = 256, 257, 258, 259
N_SPECIAL = 4
VOCAB_SIZE = 256 + N_SPECIAL


class ByteTokenizer:
    """UTF-8 bytes <-> ids; :meth:`stream_decoder` turns a stream of ids into text pieces."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id, sep_id = PAD, BOS, EOS, SEP

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes of the non-special ids as text (invalid UTF-8 becomes U+FFFD)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @staticmethod
    def stream_decoder() -> StreamDecoder:
        return StreamDecoder()


class StreamDecoder:
    """Incremental decoding: a multi-byte character is emitted only once all its bytes have arrived."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < 256:
            return ""
        return self._dec.decode(bytes([token_id]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
