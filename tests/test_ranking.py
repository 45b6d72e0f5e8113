"""One ranking across modalities and modes (service.ranking): calibrated, exact, fused with word matches."""

from __future__ import annotations

import numpy as np
import pytest

from index.collection import Collection
from index.types import Filter, Item
from mm.calibration import Calibration, PairFit
from service.ranking import rank_hits

DIM = 16
MODS = ("text", "image", "audio")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def coll(tmp_path):
    rng = np.random.default_rng(1)
    c = Collection.create(tmp_path / "c", dim=DIM, embedder_id="test")
    items, vecs = [], []
    for i in range(120):
        m = MODS[i % 3]
        items.append(Item(id=0, modality=m, uri=f"/m/{m}{i}.x", sha256=str(i), caption=f"thing number {i}"))
        vecs.append(rng.normal(size=DIM))
    items.append(Item(id=0, modality="image", uri="/m/red_circle.png", sha256="rc", caption="A red circle."))
    vecs.append(rng.normal(size=DIM))
    c.add(unit(np.stack(vecs)), items)
    yield c
    c.close()


# audio raw scores count for far less than image ones: raw order and calibrated order disagree
CAL = Calibration(
    {"text->image": PairFit(12.0, -2.0), "text->audio": PairFit(6.0, -4.0), "text->text": PairFit(9.0, -3.0)},
    lexical=PairFit(0.8, -1.0),
    threshold=0.5,
)


def brute_force(coll, q, n, cal, modalities=MODS):
    ids, vecs = coll.all_vectors()
    out = []
    for i, v in zip(ids.tolist(), vecs, strict=True):
        m = coll.get(i).modality
        if m in modalities:
            out.append((float(cal.score("text", m, float(v @ q))), i))
    return [i for _, i in sorted(out, key=lambda t: (-t[0], t[1]))[:n]]


@pytest.mark.parametrize("k,offset", [(1, 0), (5, 0), (10, 7), (40, 0)])
def test_calibrated_top_is_exact(coll, k, offset) -> None:
    rng = np.random.default_rng(k + offset)
    for _ in range(5):
        q = unit(rng.normal(size=DIM))
        got = rank_hits(coll, q, k=k, offset=offset, mode="vector", query_modality="text", calibration=CAL)
        assert [r.hit.id for r in got] == brute_force(coll, q, k + offset, CAL)[offset:]
        for r in got:  # the final score is the calibrated raw score, and both are reported
            assert r.hit.score == pytest.approx(float(CAL.score("text", r.hit.item.modality, r.raw)))


def test_filters_hold_under_calibration(coll) -> None:
    q = unit(np.random.default_rng(5).normal(size=DIM))
    got = rank_hits(
        coll,
        q,
        k=8,
        filter=Filter(modalities=["audio"]),
        query_modality="text",
        calibration=CAL,
        mode="vector",
    )
    assert {r.hit.item.modality for r in got} == {"audio"}
    assert [r.hit.id for r in got] == brute_force(coll, q, 8, CAL, modalities=("audio",))


def test_uncalibrated_vector_ranking_is_the_raw_ranking(coll) -> None:
    q = unit(np.random.default_rng(6).normal(size=DIM))
    got = rank_hits(coll, q, k=10, mode="vector", query_modality="text", calibration=Calibration())
    assert [r.hit.id for r in got] == [h.id for h in coll.search(q, k=10)[0]]
    assert all(r.hit.score == r.raw for r in got)


def test_hybrid_lifts_a_word_match_the_vectors_missed(coll) -> None:
    target = next(h for h in coll.lexical_search("red circle", k=1))
    far = -coll.vector(target.id)  # a query vector pointing away from the captioned item
    vector_only = rank_hits(coll, far, k=5, mode="vector", query_modality="text", calibration=CAL)
    assert target.id not in [r.hit.id for r in vector_only]
    hybrid = rank_hits(
        coll, far, k=5, mode="hybrid", text="a red circle", query_modality="text", calibration=CAL
    )
    top = hybrid[0]
    assert top.hit.id == target.id and top.words is not None and top.raw == pytest.approx(-1.0, abs=1e-5)
    p_vec = float(CAL.score("text", "image", top.raw))
    assert top.hit.score == pytest.approx(1 - (1 - p_vec) * (1 - float(CAL.lexical(top.words))))


def test_keyword_mode_returns_word_matches_only(coll) -> None:
    got = rank_hits(coll, None, k=5, mode="keyword", text="circle", query_modality="text", calibration=CAL)
    assert [r.hit.item.uri for r in got] == ["/m/red_circle.png"] and got[0].raw is None
    assert rank_hits(coll, None, k=5, mode="keyword", text="giraffe", calibration=CAL) == []


def test_uncalibrated_hybrid_is_reciprocal_rank_fusion(coll) -> None:
    target = next(h for h in coll.lexical_search("red circle", k=1))
    far = -coll.vector(target.id)
    got = rank_hits(coll, far, k=5, mode="hybrid", text="red circle", query_modality="text")
    vector = [h.id for h in coll.search(far, k=5)[0]]
    # the best word match (1/61) ties the best vector hit (1/61) and beats the second (1/62)
    assert [r.hit.id for r in got][:2] == [vector[0], target.id]  # a tie goes to the higher cosine
    assert [r.hit.id for r in got][2:] == vector[1:4]
    assert got[0].hit.score == pytest.approx(1 / 61)
