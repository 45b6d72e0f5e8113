"""The extractive backend's grounding rules: calibrated relevance, lexical evidence, the rules file."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest

from index.types import Hit, Item
from mm.calibration import Calibration, PairFit
from service.generation import ExtractiveGenerator, start_stream
from service.generation.backends.extractive import (
    RULES_FILE,
    Rules,
    asks_for_unnamed,
    content_words,
    fingerprint,
    load_rules,
    names,
)
from service.generation.prompts import DECLINE

STRICT = Rules(item_min=0.3, answer_min=0.6, margin=1.0, named=0.0)


def hit(id: int, score: float, caption: str, modality: str = "image") -> Hit:
    item = Item(id=id, modality=modality, uri=f"/lib/{id}.png", sha256=str(id), caption=caption)
    return Hit(id, score, item)


def cited(answer: str) -> list[int]:
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", answer)})


def calibration(a: float, b: float) -> Calibration:
    """Every modality pair mapped by ``sigmoid(a * cosine + b)``; a word match worth little."""
    pairs = {
        f"{s}->{d}": PairFit(a, b, 10, 5)
        for s in ("text", "image", "audio")
        for d in ("text", "image", "audio")
    }
    return Calibration(pairs, PairFit(0.1, -4.0, 10, 5), 0.2, "val")


# ----------------------------------------------------------------------------------------------------
# decisions read the calibrated relevance the search path gives, not the raw cosine


@pytest.fixture
def frog_collection(tmp_path):
    """Three frog items close to the query direction (cosine 0.9), a dog far from it (cosine 0.1)."""
    from index.collection import Collection

    coll = Collection.create(tmp_path / "c", dim=4, embedder_id="test")
    near = np.array([0.9, np.sqrt(1 - 0.81), 0.0, 0.0], dtype=np.float32)
    far = np.array([0.1, 0.0, np.sqrt(1 - 0.01), 0.0], dtype=np.float32)
    items = [
        Item(id=0, modality="image", uri="/lib/frog.png", sha256="a", caption="A frog."),
        Item(id=0, modality="audio", uri="/lib/frog.ogg", sha256="b", caption="A frog."),
        Item(id=0, modality="image", uri="/lib/frog2.png", sha256="c", caption="A frog, on a leaf."),
        Item(id=0, modality="image", uri="/lib/dog.png", sha256="d", caption="A dog."),
    ]
    coll.add(np.stack([near, near, near, far]), items)
    yield coll
    coll.close()


def grounded_answer(coll, cal: Calibration, rules: Rules) -> tuple[str, list]:
    from service.schemas import SearchQuery
    from service.search import QueryVector, rank

    query = SearchQuery(query="frog", k=4, mode="vector")
    qv = QueryVector(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32), modality="text")
    found = rank(query, qv, coll, cal)
    pieces, cites = start_stream(ExtractiveGenerator(rules=rules), "Which animal croaks?", found.hits)
    return "".join(pieces), cites


def test_extractive_answers_when_the_calibration_says_the_hits_are_relevant(frog_collection):
    text, cites = grounded_answer(frog_collection, calibration(10.0, -5.0), STRICT)  # P(0.9) = 0.98
    assert text.startswith("A frog") and text != DECLINE
    assert len(cites) == 3 and cited(text) == [1, 2, 3]  # the frog's three items, never the dog


def test_extractive_declines_when_calibrated_relevance_is_low_whatever_the_cosine(frog_collection):
    # the same cosines (0.9), a model whose calibration says such a cosine is rarely relevant (P = 0.12)
    text, cites = grounded_answer(frog_collection, calibration(10.0, -11.0), STRICT)
    assert text == DECLINE and cites == []


# ----------------------------------------------------------------------------------------------------
# lexical evidence: the question naming the concept


def test_content_words_and_naming():
    asked = content_words("Is there a sound of some goats?")
    assert {"sound", "goat"} <= asked and not asked & {"is", "there", "a", "of", "some"}
    assert names(asked, "goat") and not names(asked, "mountain goat")
    assert names(content_words("Which horses are brown?"), "horse")  # plural -> singular
    assert names(content_words("Do you have boxes?"), "box") and names(content_words("a glass"), "glasses")
    assert not names(content_words("Which big cat has stripes?"), "black cat")  # one word is not the concept
    assert not names(content_words("What is it?"), "")  # nothing to name


def test_naming_the_concept_counts_as_evidence():
    hits = [hit(1, 0.5, "A goat.", "audio"), hit(2, 0.35, "A bell.")]
    question = "Is there a sound of a goat?"
    unnamed = ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.7, margin=1.0, named=0.0))
    named = ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.7, margin=1.0, named=0.5))
    assert unnamed.select(question, hits) == []  # 0.5 alone is under 0.7
    assert [h.id for h in named.select(question, hits)] == [1]  # 1 - 0.5 * 0.5 = 0.75
    # naming needs the words of the question: the same hits for a question that does not name a goat
    assert named.select("Which animal bleats?", hits) == []


def test_a_wh_question_is_not_answered_by_what_it_names():
    # "What bird crows at dawn on a farm?" matched a farm picture by its words: a wh-question asks for
    # what it describes, so a concept sharing one of its words is passed over for the next one
    hits = [hit(1, 0.9, "A farm."), hit(2, 0.6, "A rooster.", "audio")]
    gen = ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.5, margin=1.0, named=0.0))
    assert [h.id for h in gen.select("What bird crows at dawn on a farm?", hits)] == [2]
    assert gen.select("Which farm animal gives us wool?", [hit(1, 0.9, "A farm.")]) == []  # declines
    assert gen.select("Which birds cannot fly?", [hit(3, 0.9, "Some birds.")]) == []  # a plural form too
    # a request asks for what it names
    assert [h.id for h in gen.select("Show me a farm.", hits)] == [1]
    assert [h.id for h in gen.select("Is there a picture of a farm?", hits)] == [1]
    assert [h.id for h in gen.select("a farm", hits)] == [1]
    assert asks_for_unnamed("Which farm animal gives us wool?") and asks_for_unnamed("how loud is it")
    assert not asks_for_unnamed("Do you have a picture of a giraffe?") and not asks_for_unnamed("")
    # about the thing it names (the page's own example question), not for another thing
    assert not asks_for_unnamed("what is the ocean like?")
    assert not asks_for_unnamed("What does a cat look like")
    assert asks_for_unnamed("What animal has stripes and looks like a horse?")
    assert not asks_for_unnamed("What are cats like?") and not asks_for_unnamed(
        "what would a frog sound like"
    )
    assert asks_for_unnamed("What long yellow fruit do monkeys like?")  # "like" the verb: asks for a fruit


# ----------------------------------------------------------------------------------------------------
# citations


def test_only_the_answers_items_are_cited_and_at_most_max_cited():
    hits = [
        hit(1, 0.9, "A frog."),
        hit(2, 0.45, "A toad."),  # clears item_min, but another concept: never cited
        hit(3, 0.8, "A frog.", "audio"),
        hit(4, 0.7, "The frog", "text"),
        hit(5, 0.6, "a Frog!"),
    ]
    gen = ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.6, margin=1.0, max_cited=3))
    pieces, cites = start_stream(gen, "What animal croaks?", hits)
    text = "".join(pieces)
    assert [c.id for c in cites] == [1, 3, 4]  # the frog's best three, best first
    assert cited(text) == [1, 2, 3]  # every citation returned is used, every [n] is one of them
    assert "toad" not in text.lower()


def test_a_close_runner_up_makes_it_decline():
    hits = [hit(1, 0.8, "A frog."), hit(2, 0.75, "A toad.")]
    assert ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.6, margin=1.5)).select("q", hits) == []
    assert ExtractiveGenerator(rules=Rules(item_min=0.3, answer_min=0.6, margin=1.0)).select("q", hits) != []


# ----------------------------------------------------------------------------------------------------
# the rules file: round trip, checks on load, a stale calibration


def test_rules_file_round_trips(tmp_path):
    cal = calibration(10.0, -5.0)
    rules = Rules(0.25, 0.65, 1.5, 0.3, 2, fingerprint(cal), "dev: accuracy 0.5")
    rules.save(tmp_path / RULES_FILE)
    assert load_rules(tmp_path, cal) == rules
    assert json.loads((tmp_path / RULES_FILE).read_text())["version"] == 1


def test_the_rewrite_floor_round_trips_and_older_files_load(tmp_path):
    rules = Rules(0.5, 0.5, 1.0, 0.0, 3, "", "dev", rewritten_min=0.3)
    rules.save(tmp_path / RULES_FILE)
    assert load_rules(tmp_path, None) == rules
    older = {k: v for k, v in rules.to_dict().items() if k != "rewritten_min"}  # a file from before it
    (tmp_path / RULES_FILE).write_text(json.dumps(older))
    assert load_rules(tmp_path, None).rewritten_min is None


def test_hits_a_rewrite_named_use_the_rewrite_floor_and_others_the_plain_rules():
    """A drum named by the rewrite, with items at 0.27-0.49, was declined under item_min 0.5."""
    drums = [hit(1, 0.45, "A drum."), hit(2, 0.4, "A snare drum.")]
    plain = ExtractiveGenerator(rules=Rules(item_min=0.5, answer_min=0.5, rewritten_min=0.3))
    assert plain.select("drum", drums) == []
    named = plain.for_rewritten()
    assert named.rules.item_min == 0.3 and named.rules.answer_min == 0.3 and named.rules.rewritten_min is None
    assert [h.id for h in named.select("drum", drums)] == [1]  # the concept "drum"; "snare drum" is another
    unset = ExtractiveGenerator(rules=Rules(item_min=0.5))
    assert unset.for_rewritten() is unset  # no floor of its own: the plain rules


def test_missing_rules_file_gives_the_defaults(tmp_path):
    assert load_rules(tmp_path, None) == Rules()
    assert load_rules(None, None) == Rules()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"version": 2}', "version"),
        ('{"version": 1, "item_min": 1.5}', "item_min"),
        ('{"version": 1, "answer_min": "high"}', "answer_min"),
        ('{"version": 1, "margin": -1}', "margin"),
        ('{"version": 1, "named": NaN}', "named"),
        ('{"version": 1, "max_cited": 0}', "max_cited"),
        ('{"version": 1, "rewritten_min": 2}', "rewritten_min"),
        ('{"version": 1, "itemmin": 0.2}', "unknown fields"),
    ],
)
def test_a_bad_rules_file_is_refused_with_its_path(tmp_path, content, message):
    (tmp_path / RULES_FILE).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_rules(tmp_path, None)
    assert str(tmp_path) in str(err.value)


def test_rules_tuned_for_another_calibration_warn(tmp_path, caplog):
    old, new = calibration(10.0, -5.0), calibration(12.0, -6.0)
    assert fingerprint(old) != fingerprint(new) and fingerprint(Calibration()) == ""
    # the no-match threshold is not part of what a score means: changing it keeps the rules' fingerprint
    import dataclasses

    assert fingerprint(dataclasses.replace(old, threshold=0.4)) == fingerprint(old)
    Rules(calibration=fingerprint(old)).save(tmp_path / RULES_FILE)
    with caplog.at_level(logging.WARNING, logger="service.generation.backends.extractive"):
        load_rules(tmp_path, old)
        assert not caplog.records
        load_rules(tmp_path, new)
    assert any("re-tune" in r.getMessage() for r in caplog.records)


def test_the_registry_reads_the_rules_beside_the_models_checkpoint(tmp_path):
    from mm.model import CONFIG_DIR
    from service.generation import Generators
    from service.settings import Settings

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(CONFIG_DIR / "tiny.json", ckpt / "config.json")
    (ckpt / "model.safetensors").write_bytes(b"")  # resolving the checkpoint reads no weights
    cal = calibration(10.0, -5.0)
    rules = Rules(0.2, 0.5, 1.25, 0.5, 2, fingerprint(cal))
    rules.save(ckpt / RULES_FILE)
    gens = Generators(Settings(collection=tmp_path / "coll", model=str(ckpt)), lambda i: None, cal)
    assert gens.get("extractive").rules == rules
    # a broken file is the server's fault: the backend is unavailable (503), not the request invalid (422)
    from service.generation import GeneratorUnavailable

    (ckpt / RULES_FILE).write_text('{"version": 1, "answer_min": 7}')
    fresh = Generators(Settings(collection=tmp_path / "coll", model=str(ckpt)), lambda i: None, cal)
    with pytest.raises(GeneratorUnavailable, match="answer_min"):
        fresh.get("extractive")


# ----------------------------------------------------------------------------------------------------
# retrieval for an answer, and the tuning the benchmark does


def test_generation_retrieves_the_questions_content_words_with_hybrid_search():
    from service.schemas import GenerateParams

    q = GenerateParams(query="What makes a croaking sound?", k=7).retrieval()
    assert q.query == "makes croaking sound" and q.mode == "hybrid" and q.k == 7


def test_tune_writes_the_best_dev_rules_that_load_back(tmp_path):
    from benchmarks.bench_generate import tune

    def item(id: int, score: float, label: str, modality: str = "image") -> Hit:
        uri = f"/lib/tuxpaint/{label}-{id}.png"
        return Hit(id, score, Item(id=id, modality=modality, uri=uri, sha256=str(id), caption=f"A {label}."))

    questions = [
        {"question": "Which animal croaks?", "answers": ["frog"]},
        {"question": "Who wrote War and Peace?", "answers": []},
    ]
    hits = [
        [item(1, 0.9, "frog"), item(2, 0.6, "frog", "audio"), item(3, 0.2, "dog")],
        [item(4, 0.35, "book"), item(5, 0.3, "pen")],  # weak, scattered: an answer here is false
    ]
    labels = {
        ("tuxpaint", h.item.uri.rsplit("/", 1)[1]): h.item.uri.rsplit("/", 1)[1].split("-")[0]
        for hs in hits
        for h in hs
    }
    cal = calibration(10.0, -5.0)
    rules, top = tune(
        questions, hits, labels, {"frog", "dog", "book", "pen"}, cal, tmp_path / RULES_FILE, "dev"
    )
    assert top[0]["accuracy"] == 1.0 and top[0]["false_answer_rate"] == 0.0
    assert rules.answer_min > 0.3  # declining the weak question needs a support above its 0.3-0.55
    assert load_rules(tmp_path, cal) == rules and rules.calibration == fingerprint(cal)


def test_the_no_match_threshold_keeps_nine_real_queries_in_ten():
    from benchmarks.bench_nomatch import choose, flagged

    real = np.linspace(0.05, 0.95, 100)  # top scores of 100 real queries
    t = choose(real, 0.9)
    assert flagged(real, t) == 0.1  # the 10 lowest are flagged, no more
    assert flagged(np.array([0.01, 0.02, 0.5]), t) == round(2 / 3, 4)  # unrelated ones under it are flagged
    assert flagged(real, None) == 0.0  # no threshold: nothing is flagged


def test_the_unrelated_queries_split_in_two_halves(tmp_path):
    from benchmarks.bench_nomatch import unrelated_queries

    path = tmp_path / "q.txt"
    path.write_text("# comment\na\n\nb\nc\n# another\nd\n")
    assert unrelated_queries(path) == (["a", "c"], ["b", "d"])
