"""The FAISS side of a collection: which index type to use, how to build it, and filtered search.

Every index is an ``IndexIDMap2`` (stable int64 ids = SQLite ids) over an inner-product index, so scores
are cosines of the normalised vectors. Type by size and memory budget (faiss wiki, "Guidelines to choose
an index"): exact ``Flat`` while small, ``HNSW`` while the graph fits in memory, then ``IVF-SQ8`` and
finally ``IVF-PQ`` trained on the stored vectors.

Indexes that cannot remove vectors under an id map (HNSW, IVF) get tombstones: the removed entry's id
in the IDMap is replaced by a negative sentinel, which a range selector hides at search time; the
collection rebuilds the index from SQLite when tombstones pile up.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivf", "other"]
_MAX_ID = 1 << 62
# a filter keeping at least this share of the items is applied after a wider unfiltered search
POST_FILTER_SHARE = 0.05


_search_threads: int | None = None  # None: FAISS's default (every core)
_threads_set = threading.local()


def set_search_threads(n: int | None) -> None:
    """FAISS's OpenMP threads for every search in this process from now on (None: FAISS's default). A server
    answering one query at a time wants 1: more only adds threads that spin while another process holds
    the cores. OpenMP keeps the count per calling thread, so each searching thread applies it on its
    first search (:func:`_apply_search_threads`), the event loop and every worker pool alike."""
    global _search_threads
    _search_threads = None if n is None else int(n)
    _threads_set.value = None
    _apply_search_threads()


def _apply_search_threads() -> None:
    if _search_threads is not None and getattr(_threads_set, "value", None) != _search_threads:
        _faiss().omp_set_num_threads(_search_threads)
        _threads_set.value = _search_threads


@dataclass(frozen=True)
class IndexPolicy:
    """When to switch index types and how hard to search. Stored in ``collection.json``."""

    flat_max: int = 20_000  # below this many vectors, exact search is fast enough
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80  # HNSW build breadth (faiss default 40 loses recall at M=32)
    ef_search: int = 128  # HNSW search breadth; >= 0.95 recall@10 on embedding-like data
    nprobe: int = 0  # IVF lists probed per query; 0 = nlist / 16, at least 8
    exact_max: int = 2048  # filtered sets this small are scored exactly from the stored vectors
    rescore: int = 4  # quantized (SQ/PQ) indexes: candidates per wanted hit, rescored from float32
    tombstone_ratio: float = 0.2  # rebuild an index that cannot delete once this share is dead
    lazy_save_mb: int = 64  # a FAISS file this large is not rewritten on every single write...
    save_every: int = 100  # ...but every this many writes (and on close); the change log covers the rest


def _nlist_for(n: int) -> int:
    """IVF list count ~ sqrt(n), a power of two (so it changes only when n grows 4x), 16..65536.

    The faiss wiki suggests 4-16 sqrt(n); on a small box k-means training is what bounds a rebuild
    (39 points x nlist centroids x nlist), and sqrt(n) lists of ~sqrt(n) vectors each keep both the
    training (~10 s at 1M, 2 cores) and a probe of a few dozen lists (with rescoring) cheap.
    """
    target = math.sqrt(max(n, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(target)))))


def _hnsw_bytes(n: int, dim: int, m: int) -> float:
    # vector + level-0 links (2M int32) + upper levels (~M/ (M-1) extra) + id maps
    return n * (4 * dim + 4 * 2 * m * 1.1 + 24)


def choose_spec(n: int, dim: int, memory_budget_mb: int, policy: IndexPolicy | None = None) -> str:
    """The FAISS factory string to use for ``n`` vectors of ``dim`` within ``memory_budget_mb``."""
    policy = policy or IndexPolicy()
    budget = memory_budget_mb * (1 << 20)
    if n < policy.flat_max:
        return "Flat"
    if _hnsw_bytes(n, dim, policy.hnsw_m) <= budget:
        return f"HNSW{policy.hnsw_m}"
    nlist = _nlist_for(n)
    if n * (dim + 24) <= budget:
        return f"IVF{nlist},SQ8"
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 64]
    fitting = [m for m in divisors if n * (m + 24) <= budget and m >= 4]
    if not fitting:
        m = min(m for m in divisors if m >= 4) if any(m >= 4 for m in divisors) else divisors[-1]
        log.warning(
            "%d vectors do not fit in %d MB even as IVF-PQ%d; raise the memory budget", n, memory_budget_mb, m
        )
    else:
        m = max(fitting)
    return f"IVF{nlist},PQ{m}"


def spec_tier(spec: str) -> tuple[int, int]:
    """Orders specs from cheapest to most compressed, so growth moves up and shrinking moves down."""
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", spec)) else 0
    if "PQ" in spec:
        return 3, nlist
    if "IVF" in spec:
        return 2, nlist
    if "HNSW" in spec:
        return 1, 0
    return 0, 0


def min_train_size(spec: str) -> int:
    """How many vectors ``spec`` needs before it can be trained (0 = no training)."""
    need = 0
    if m := re.search(r"IVF(\d+)", spec):
        need = int(m.group(1))
    if m := re.search(r"PQ(\d+)(?:x(\d+))?", spec):
        need = max(need, 2 ** int(m.group(2) or 8))
    return need


def train_threshold(spec: str) -> int:
    """Vectors a collection waits for before training ``spec`` (k-means wants ~39 points per centroid)."""
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", spec)) else 0
    return max(39 * nlist, min_train_size(spec))


def default_nprobe(nlist: int, policy: IndexPolicy | None = None) -> int:
    if policy is not None and policy.nprobe > 0:
        return min(policy.nprobe, nlist)
    # ~6% of the lists: with sqrt(n) lists and exact rescoring of 4k candidates, recall@10 stayed 1.0 on
    # resampled demo embeddings at 200k-1M (bench_scale) while a probe of nlist/8 cost twice the time
    return min(nlist, max(8, nlist // 16))


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a core dependency
        raise ImportError("collections need FAISS: pip install faiss-cpu") from e
    return faiss


def build_index(
    spec: str, dim: int, train_vectors: np.ndarray | None = None, policy: IndexPolicy | None = None
) -> faiss.Index:
    """An empty ``IndexIDMap2`` over ``index_factory(dim, spec, METRIC_INNER_PRODUCT)``, trained if needed.

    ``train_vectors`` (n, dim) float32 are required for IVF / PQ specs (at least :func:`min_train_size`).
    """
    faiss = _faiss()
    policy = policy or IndexPolicy()
    if spec.replace(" ", "").upper().startswith("IDMAP"):
        raise ValueError(f"index spec {spec!r}: leave out IDMap, ids are always mapped (IndexIDMap2)")
    try:
        inner = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"invalid FAISS index spec {spec!r} ({str(e).splitlines()[-1][:120]}); "
            'use a factory string like "Flat", "HNSW32", "IVF256,SQ8" or "IVF1024,PQ16"'
        ) from e
    hnsw = getattr(faiss.downcast_index(inner), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = policy.ef_construction
        hnsw.efSearch = policy.ef_search
    for part in (faiss.downcast_index(inner), faiss.try_extract_index_ivf(inner)):
        if hasattr(part, "do_polysemous_training"):
            # the factory turns it on for "PQ<m>" (no "np"): minutes of annealing for Hamming
            # pre-filtering that inner-product search never uses
            part.do_polysemous_training = False
    if not inner.is_trained:
        need = min_train_size(spec)
        if train_vectors is None or len(train_vectors) < max(need, 1):
            got = 0 if train_vectors is None else len(train_vectors)
            raise ValueError(f"index spec {spec!r} needs at least {need} vectors to train, got {got}")
        x = _as_matrix(train_vectors, dim)
        cap = max(train_threshold(spec), 50_000)
        if len(x) > cap:  # k-means quality saturates; training time does not
            x = x[np.random.default_rng(0).choice(len(x), cap, replace=False)]
        inner.train(x)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = default_nprobe(ivf.nlist, policy)
    return faiss.IndexIDMap2(inner)


def _as_matrix(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x


class VectorIndex:
    """One ``IndexIDMap2`` plus what it was built as (``spec``). Not locked: the collection guards it."""

    def __init__(self, index: faiss.Index, spec: str, policy: IndexPolicy | None = None):
        faiss = _faiss()
        assert isinstance(index, faiss.IndexIDMap2), "collections keep ids in an IndexIDMap2"
        self.index = index
        self.spec = spec
        self.policy = policy or IndexPolicy()
        self.dim = index.d
        inner = faiss.downcast_index(index.index)
        self.kind: Kind = (
            "hnsw"
            if hasattr(inner, "hnsw")
            else "ivf"
            if faiss.try_extract_index_ivf(inner) is not None
            else "flat"
            if isinstance(inner, faiss.IndexFlat)
            else "other"
        )
        self._ivf = faiss.try_extract_index_ivf(inner) if self.kind == "ivf" else None
        self.tombstones = int((self._id_map() < 0).sum())

    # construction -----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, spec: str, dim: int, ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy | None = None
    ) -> VectorIndex:
        """Train (if needed) on ``vectors`` (n, dim) and add them under ``ids`` (n,)."""
        vi = cls(build_index(spec, dim, vectors if len(vectors) else None, policy), spec, policy)
        if len(ids):
            vi.add(ids, vectors)
        return vi

    @classmethod
    def read(cls, path: str | Path, spec: str, policy: IndexPolicy | None = None) -> VectorIndex:
        faiss = _faiss()
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path} does not hold an IndexIDMap2")
        return cls(index, spec, policy)

    def write(self, path: str | Path) -> None:
        _faiss().write_index(self.index, str(path))

    # mutation ----------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def live(self) -> int:
        return self.ntotal - self.tombstones

    def _id_map(self) -> np.ndarray:
        return _faiss().vector_to_array(self.index.id_map)

    def live_ids(self) -> np.ndarray:
        ids = self._id_map()
        return ids[ids >= 0]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        x = _as_matrix(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        assert len(ids) == len(x) and (ids >= 0).all()
        self.index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids`` (absent ones are ignored), deleting or tombstoning as the index type allows."""
        faiss = _faiss()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        # Only a Flat inner index removes by shifting, which IndexIDMap2.remove_ids assumes when it
        # compacts its id map: an IVF removes in place, and every id after the removed one would then
        # name its neighbour's vector. Everything else gets tombstones.
        if self.kind == "flat":
            try:
                self.index.remove_ids(faiss.IDSelectorBatch(ids))
                return
            except RuntimeError:
                pass
        id_map = self._id_map()
        hit = np.flatnonzero(np.isin(id_map, ids))
        floor = min(int(id_map.min()), -1)
        id_map[hit] = floor - 1 - np.arange(len(hit), dtype=np.int64)  # distinct sentinels <= -2
        faiss.copy_array_to_vector(id_map, self.index.id_map)
        self.index.construct_rev_map()
        self.tombstones += len(hit)

    # search ------------------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Top ``k`` among ``allowed`` ids (all live ids when None) minus ``excluded``.

        queries (q, dim) -> scores (q, k), ids (q, k) padded with -1, and whether every row is full
        (``min(k, candidates)`` hits). Approximate indexes widen efSearch / nprobe until rows are full.
        """
        faiss = _faiss()
        _apply_search_threads()
        x = _as_matrix(queries, self.dim)
        n_cand = self.live if allowed is None else len(allowed)
        if excluded is not None and len(excluded):
            n_cand -= len(excluded) if allowed is None else int(np.isin(allowed, excluded).sum())
        want = min(k, max(n_cand, 0))
        no_excluded = excluded is None or not len(excluded)
        if allowed is None and no_excluded and self.tombstones:
            # a selector takes IVF scans off their batched SIMD path (~4x slower at 1M): search a little
            # wider without one and drop the tombstones' negative labels, if that fills every row
            got = self._search_wide(x, k, want, k + min(self.tombstones, max(k, 16)), None)
            if got is not None:
                return got
        share = n_cand / max(self.live, 1)
        if (
            allowed is not None
            and no_excluded
            and self.kind in ("ivf", "hnsw")
            and share >= POST_FILTER_SHARE
        ):
            # a filter keeping a large share: 2/share times wider without a selector, then keep the
            # allowed (a 10% filter at 1M: 3x faster than the selector path); else the selector path
            got = self._search_wide(x, k, want, min(self.ntotal, int(2 * k / share) + k), allowed)
            if got is not None:
                return got
        keep: list[object] = []  # selectors must outlive the search call
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            keep.append(sel)
        elif self.tombstones:
            sel = faiss.IDSelectorRange(0, _MAX_ID)
            keep.append(sel)
        if excluded is not None and len(excluded):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
            notsel = faiss.IDSelectorNot(batch)
            keep += [batch, notsel]
            sel = notsel if sel is None else faiss.IDSelectorAnd(sel, notsel)
            keep.append(sel)

        ef = max(self.policy.ef_search, k)
        nprobe = default_nprobe(self._ivf.nlist, self.policy) if self._ivf is not None else 0
        for _ in range(6):
            kw: dict[str, object] = {} if sel is None else {"sel": sel}
            if self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=int(ef), **kw)
            elif self.kind == "ivf":
                params = faiss.SearchParametersIVF(nprobe=int(nprobe), **kw)
            else:
                params = faiss.SearchParameters(**kw) if kw else None
            scores, labels = self.index.search(x, k, params=params)
            full = bool(((labels >= 0).sum(axis=1) >= want).all())
            if full or self.kind not in ("hnsw", "ivf"):
                break
            if self.kind == "hnsw":
                if ef >= max(self.ntotal, k):
                    break
                ef = min(ef * 4, max(self.ntotal, k))
            else:
                assert self._ivf is not None  # kind == "ivf"
                if nprobe >= self._ivf.nlist:
                    break
                nprobe = min(nprobe * 4, self._ivf.nlist)
        return scores, labels, full

    def _search_wide(
        self, x: np.ndarray, k: int, want: int, wide: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """Top ``k`` of the live (and ``allowed``) ids among an unfiltered search's top ``wide``; None if
        a row comes up short of ``want``."""
        faiss = _faiss()
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(max(self.policy.ef_search, wide)))
        elif self._ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=int(default_nprobe(self._ivf.nlist, self.policy)))
        else:
            params = None
        scores, labels = self.index.search(x, wide, params=params)
        ok = labels >= 0  # tombstones are negative
        if allowed is not None:
            ok &= np.isin(labels, allowed)
        if (ok.sum(axis=1) < want).any():
            return None
        # stable: kept hits keep their score order; the first k of each row are the answer
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        scores, labels = np.take_along_axis(scores, order, axis=1), np.take_along_axis(labels, order, axis=1)
        hit = np.take_along_axis(ok, order, axis=1)
        return np.where(hit, scores, -np.inf).astype(np.float32), np.where(hit, labels, -1), True
