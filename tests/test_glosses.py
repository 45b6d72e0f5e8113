"""The dictionary evidence for question rewriting (``service.generation.glosses``): our WordNet reader on
a hand-written database in WordNet 3.0's format, and on the installed one (Debian ``wordnet-base``, a
``make setup`` package) with questions of our own (in neither question set)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.generation import glosses as gl

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
NOUNS = [  # offset lexfile pos count words... pointers | gloss
    "00000100 05 n 01 animal 0 000 | a living organism that moves",
    "00000200 05 n 01 marsupial 0 001 @ 00000100 n 0000 | mammals whose females carry young in a pouch",
    '00000300 05 n 01 kangaroo 0 001 @ 00000200 n 0000 | leaping herbivorous marsupials; "a kangaroo hops"',
    "00000400 05 n 02 horse 0 Equus_caballus 0 001 @ 00000100 n 0000 | a hoofed herbivorous quadruped",
    "00000500 05 n 01 dog 0 001 @ 00000100 n 0000 | a domesticated descendant of the wolf",
    "00000600 11 n 01 neigh 0 000 | the characteristic sounds made by a horse",
    "00000700 06 n 01 horse 0 000 | a gymnastic apparatus used for vaulting",
]
VERBS = ["00000800 32 v 01 neigh 0 000 01 + 01 00 | make a characteristic sound, of a horse"]
INDEX_NOUN = [
    "animal n 1 0 1 0 00000100",
    "marsupial n 1 1 @ 1 0 00000200",
    "kangaroo n 1 1 @ 1 0 00000300",
    "horse n 2 1 @ 2 1 00000400 00000700",  # commonest sense first
    "equus_caballus n 1 1 @ 1 0 00000400",
    "dog n 1 1 @ 1 0 00000500",
    "neigh n 1 0 1 0 00000600",
]
INDEX_VERB = ["neigh v 1 0 1 0 00000800"]


def write_wordnet(root: Path, **override: list[str]) -> Path:
    files = {
        "data.noun": NOUNS,
        "data.verb": VERBS,
        "index.noun": INDEX_NOUN,
        "index.verb": INDEX_VERB,
        "noun.exc": ["mice mouse"],
        "verb.exc": ["ran run"],
    }
    files.update({k.replace("_", "."): v for k, v in override.items()})
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        header = "" if name.endswith(".exc") else HEADER
        (root / name).write_text(header + "\n".join(lines) + "\n", encoding="latin-1")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> gl.Glosses:
    return gl.Glosses.load(write_wordnet(tmp_path_factory.mktemp("wn")))


def test_synsets_lemmas_and_senses_in_wordnets_order(tiny):
    assert len(tiny.synsets) == 8
    assert tiny.knows("horse") and tiny.knows("Kangaroo") and not tiny.knows("neighs")
    first = tiny.noun_senses("horse")[0]
    assert first.lemmas == ("horse", "equus caballus")  # the animal, before the vaulting horse
    assert "pouch" in tiny.synsets[("n", "00000200")].gloss
    assert "hop" not in tiny.synsets[("n", "00000300")].gloss  # the example in quotes is not the gloss
    assert tiny.synonyms("horse") >= {gl.stem("horse"), gl.stem("equus caballus")}  # stemmed


def test_forward_counts_the_questions_words_in_the_names_and_its_hypernyms_glosses(tiny):
    asked = "Which animal leaps and carries its baby in a pouch?"
    assert tiny.forward(asked, "kangaroo") > 0  # "pouch" from marsupial, "leaping" from its own gloss
    assert tiny.forward(asked, "dog") == 0
    assert tiny.forward("What is a kangaroo?", "kangaroo") == 0  # the name itself is no evidence
    # rarer words count more: "pouch" (one gloss) over "herbivorous" (two)
    assert tiny.idf(gl.stem("pouch")) > tiny.idf(gl.stem("herbivorous"))


def test_reverse_counts_question_words_whose_gloss_names_the_candidate(tiny):
    assert tiny.reverse("What animal neighs?", "horse") > 0  # neigh: "... made by a horse"
    assert tiny.reverse("What animal neighs?", "dog") == 0
    assert tiny.reverse("What animal neighs?", "equus caballus") > 0  # a synonym of horse


def test_stem_is_the_same_on_both_sides():
    assert gl.stem("neighs") == gl.stem("neigh") == "neigh"
    assert gl.stem("flies") == "fly"
    assert gl.stem("mice", {"mice": "mouse"}) == "mouse"


def test_a_missing_dictionary_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        gl.Glosses.load(tmp_path)


def test_a_damaged_line_is_refused_with_its_place(tmp_path):
    root = write_wordnet(tmp_path, data_noun=[*NOUNS, "00000900 05 n zz horse"])
    with pytest.raises(ValueError, match=r"data\.noun:9: not a WordNet line"):
        gl.Glosses.load(root)
    root = write_wordnet(tmp_path / "b", index_noun=["horse n 2 0 2 0 00000400 notanumber"])
    with pytest.raises(ValueError, match=r"index\.noun:2"):
        gl.Glosses.load(root)


def test_a_file_larger_than_wordnets_is_not_read(tmp_path, monkeypatch):
    root = write_wordnet(tmp_path)
    monkeypatch.setattr(gl, "MAX_FILE_BYTES", 100)
    with pytest.raises(ValueError, match="more than WordNet"):
        gl.Glosses.load(root)


# the installed WordNet -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordnet() -> gl.Glosses:
    assert (gl.DEFAULT_ROOT / "data.noun").is_file(), "WordNet is missing: make setup installs wordnet-base"
    return gl.Glosses.load()


@pytest.mark.parametrize(
    ("question", "right", "wrong"),
    [
        ("Which animal bleats?", "sheep", "dog"),
        ("Which animal has antlers?", "deer", "cow"),
        ("Which bird has a long neck and pink feathers?", "flamingo", "owl"),
        ("What animal gallops and whinnies?", "horse", "cow"),
    ],
)
def test_the_installed_dictionary_favours_the_thing_described(wordnet, question, right, wrong):
    def evidence(name: str) -> float:
        return wordnet.forward(question, name) + wordnet.reverse(question, name)

    assert evidence(right) > evidence(wrong), (question, evidence(right), evidence(wrong))
