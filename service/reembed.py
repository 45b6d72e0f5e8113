"""Re-embed a whole collection with a new embedder (e.g. after a LoRA fine-tune), keeping its metadata.

Every stored item is encoded again from what the collection already holds: image and audio items from
their file (``uri``), text items from their text (``caption``). Ids, captions, tags, hashes and the rest
of the metadata stay as they are; nothing is re-discovered, re-hashed or re-decoded for metadata.

All vectors are computed first and then swapped in one SQLite transaction together with the new
embedder id, and the FAISS index is rebuilt from SQLite: a collection never holds vectors of two models,
and a crash part-way leaves the old, consistent collection. An item whose file can no longer be read
keeps no vector (it is recorded as an error, as ingest would), since its old vector belongs to the old
model. The collection's meta ``adapter`` records which adapter (if any) produced the vectors.

The collection exposes no public "replace vectors and embedder id" operation yet, so :func:`_swap` uses
its internals (write lock, store, index rebuild); ``Collection.replace_vectors`` would be the clean home.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
        encode = getattr(embedder, f"encode_{modality}")
        vecs = np.asarray(encode([p for _, p in ok]), dtype=np.float32)
        if vecs.shape != (len(ok), embedder.dim) or not np.isfinite(vecs).all():
            raise ValueError(f"embedder returned shape {vecs.shape} or non-finite values")
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
    adapter: str | Path | None = None,
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
    report = ReembedReport(old_embedder_id=coll.embedder_id, new_embedder_id=embedder.model_id)  # type: ignore[attr-defined]
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
    _swap(coll, by_id, results, report.new_embedder_id)
    if adapter is not None:
        from mm.lora import adapter_id

        coll.set_meta("adapter", {"path": str(Path(adapter).resolve()), "id": adapter_id(adapter)})
    else:
        coll.set_meta("adapter", None)
    coll.set_meta("reembedded_at", time.time())
    report.seconds = time.perf_counter() - t0
    log.info("re-embedded %d items (%d failed) in %.1fs", report.reembedded, report.failed, report.seconds)
    return report


def _swap(
    coll: Collection, items: dict[int, Item], results: dict[int, np.ndarray | str], new_id: str
) -> None:
    """One transaction: new vectors (errors drop theirs) + new embedder id; then rebuild FAISS."""
    now = time.time()
    config = {**coll._config, "embedder_id": new_id}
    with coll._writing():
        with coll.store.transaction() as conn:
            for id_, r in results.items():
                it = items[id_]
                if isinstance(r, str):
                    coll.store.update(conn, id_, dataclasses.replace(it, error=r, updated_at=now), None)
                else:
                    coll.store.update(conn, id_, dataclasses.replace(it, updated_at=now), r)
            coll.store.set_meta("config", config, conn=conn)
            gen = coll.store.bump_generation(conn)
        coll.embedder_id = new_id
        coll._config = config
        new = coll._rebuild_index()
        with coll._rw.write():
            coll._vindex = new
        coll.generation = gen
        coll.save()
