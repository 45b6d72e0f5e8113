"""Re-embed a whole collection with another embedder, keeping its items and their metadata.

Every stored item is encoded again from what the collection already holds: image and audio items from
their file (``uri``), text items from their text (``caption``). Ids, captions, tags, hashes and the rest
of the metadata stay as they are; nothing is re-discovered, re-hashed or re-decoded for metadata.

All vectors are computed first and then swapped in at once with :meth:`Collection.replace_vectors`
(one SQLite transaction with the new embedder id, then the FAISS index rebuilt from SQLite): a collection
never holds vectors of two models, and a crash part-way leaves the old, consistent collection. An item
whose file can no longer be read keeps no vector (it is recorded as an error, as ingest would), since
its old vector belongs to the old model.

Like ingest, this needs only an :class:`~index.protocol.Embedder`; recording which LoRA adapter made the
vectors is the service's part (``service.reembed``), as adapters belong to ``mm``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.ingest import encode_checked

if TYPE_CHECKING:
    from index.collection import Collection
    from index.protocol import Embedder
    from index.types import Item

log = logging.getLogger(__name__)

PAGE = 1000  # items read from SQLite per page


@dataclass
class ReembedReport:
    reembedded: int = 0
    failed: int = 0
    old_embedder_id: str = ""
    new_embedder_id: str = ""
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)  # {"id", "uri", "error"}


def _payload(item: Item) -> Any:
    if item.modality == "text":
        if not item.caption:
            raise ValueError("text item has no stored text")
        return item.caption
    if not item.uri:
        raise ValueError(f"{item.modality} item has no file to re-encode")
    if not Path(item.uri).exists():
        raise FileNotFoundError(f"{item.uri} no longer exists")
    return item.uri


def _encode_group(embedder: Embedder, modality: str, items: list[Item]) -> dict[int, np.ndarray | str]:
    """id -> vector, or id -> error message; a failing batch is retried item by item."""
    ok: list[tuple[Item, Any]] = []
    out: dict[int, np.ndarray | str] = {}
    for it in items:
        try:
            ok.append((it, _payload(it)))
        except (OSError, ValueError) as e:
            out[it.id] = str(e)
    if not ok:
        return out
    try:
        vecs = encode_checked(embedder, modality, [p for _, p in ok])
        out.update({it.id: v for (it, _), v in zip(ok, vecs, strict=True)})
    except Exception as e:
        if len(ok) == 1:
            out[ok[0][0].id] = f"cannot encode {modality}: {e}"
        else:
            for it, _ in ok:
                out.update(_encode_group(embedder, modality, [it]))
    return out


def reembed(
    coll: Collection,
    embedder: Embedder,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> ReembedReport:
    """Encode every item of ``coll`` again with ``embedder`` and replace all vectors and the embedder id."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if int(embedder.dim) != coll.dim:
        raise ValueError(
            f"the new model embeds into {embedder.dim} dimensions, the collection holds {coll.dim}: "
            "re-embedding keeps the dimension; index into a new collection instead"
        )
    items: list[Item] = []
    while page := coll.items(limit=PAGE, offset=len(items)):
        items += page
    report = ReembedReport(old_embedder_id=coll.embedder_id, new_embedder_id=embedder.model_id)
    results: dict[int, np.ndarray | str] = {}
    bar = tqdm(total=len(items), desc="re-embed", disable=not progress)
    for modality in sorted({it.modality for it in items}):
        group = [it for it in items if it.modality == modality]
        for s in range(0, len(group), batch_size):
            results.update(_encode_group(embedder, modality, group[s : s + batch_size]))
            bar.update(len(group[s : s + batch_size]))
    bar.close()
    by_id = {it.id: it for it in items}
    for id_, r in results.items():
        if isinstance(r, str):
            report.errors.append({"id": str(id_), "uri": by_id[id_].uri, "error": r})
    report.failed = len(report.errors)
    report.reembedded = len(items) - report.failed
    coll.replace_vectors(
        {i: r for i, r in results.items() if not isinstance(r, str)},
        embedder_id=report.new_embedder_id,
        errors={i: r for i, r in results.items() if isinstance(r, str)},
    )
    coll.set_meta("reembedded_at", time.time())
    report.seconds = time.perf_counter() - t0
    log.info("re-embedded %d items (%d failed) in %.1fs", report.reembedded, report.failed, report.seconds)
    return report
