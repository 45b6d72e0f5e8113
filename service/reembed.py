"""Re-embed a collection with a new model (e.g. after a LoRA fine-tune), recording the adapter used.

The work is :func:`index.reembed.reembed` (encode every item again, swap all vectors in at once with
``Collection.replace_vectors``); this adds the part that needs ``mm``: the collection's meta
``adapter`` records which adapter (if any) produced the vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from index.reembed import ReembedReport
from index.reembed import reembed as reembed_collection

if TYPE_CHECKING:
    from index.collection import Collection
    from index.protocol import Embedder

__all__ = ["ReembedReport", "reembed"]


def reembed(
    coll: Collection,
    embedder: Embedder,
    *,
    adapter: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> ReembedReport:
    """Encode every item of ``coll`` again with ``embedder``; ``adapter``: the LoRA adapter it carries."""
    report = reembed_collection(coll, embedder, batch_size=batch_size, progress=progress)
    if adapter is not None:
        from mm.adapter import adapter_id

        coll.set_meta("adapter", {"path": str(Path(adapter).resolve()), "id": adapter_id(adapter)})
    else:
        coll.set_meta("adapter", None)
    return report
