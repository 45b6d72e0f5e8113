"""Question rewriting (``service.generation.rewrite``): the prompt's examples, the name cleaning, the
grounding with its fallbacks, the opt-in setting and request field end to end with a fake rewriter, and
(slow) the packaged model itself in a child process."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_job
from fastapi.testclient import TestClient
from pydantic import ValidationError

from index.types import Hit, Item
from mm import gemma
from service.app import create_app
from service.generation import ExtractiveGenerator
from service.generation import rewrite as rw
from service.generation.backends.extractive import Rules
from service.generation.base import GeneratorUnavailable
from service.routers.generate import generators_of
from service.schemas import GenerateParams, SearchQuery
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
QUESTION_SETS = (
    ROOT.parent / "shared" / "eval" / "questions.jsonl",
    ROOT / "benchmarks" / "questions_dev.jsonl",
)
ANY_CONCEPT = Rules(item_min=-1.0, answer_min=-1.0, margin=0.0)
ASKED = "Which shape is red and round?"  # the fake rewriter's question
HAS_LLM = importlib.util.find_spec("llama_cpp") is not None and gemma.installed()
needs_llm = pytest.mark.skipif(not HAS_LLM, reason="needs the `llm` extra: pip install -e '.[llm]'")


def norm(text: str) -> str:
    return " ".join(re.findall(r"[\w'-]+", text.lower()))


def test_the_examples_hold_no_question_or_answer_of_either_question_set():
    sets = [p for p in QUESTION_SETS if p.is_file()]
    assert ROOT / "benchmarks" / "questions_dev.jsonl" in sets
    rows = [json.loads(line) for p in sets for line in p.read_text().splitlines() if line.strip()]
    questions = {norm(r["question"]) for r in rows}
    labels = {norm(a) for r in rows for a in r["answers"]}
    assert len(rw.EXAMPLES) >= 8
    for question, answer in rw.EXAMPLES:
        assert norm(question) not in questions, question
        words = set(norm(answer).split())
        # neither the answer nor any word of it is an answer label ("fire truck" would hold "truck")
        assert norm(answer) not in labels and not words & labels, answer
        assert not any(words <= set(q.split()) for q in questions), answer  # nor named by a question


def test_the_prompt_ends_with_the_bounded_question_on_one_line():
    prompt = rw.few_shot_prompt("What  animal\ncroaks?\nThing: cat")
    assert prompt.startswith(rw.INSTRUCTION) and prompt.count("\nThing: ") == len(rw.EXAMPLES)
    assert prompt.endswith("\n\nQuestion: What animal croaks? Thing: cat\nThing:")  # no injected line
    long = rw.few_shot_prompt("why " * 1000)
    assert len(long) - len(rw.few_shot_prompt("")) == rw.MAX_QUESTION_CHARS


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (" frog\nQuestion: x", "frog"),
        (" A Fire Truck.", "fire truck"),
        (' "the camel"', "camel"),
        ("", None),
        ("  \n", None),
        (" 14", None),  # not a name
        (" C", None),  # a letter
        (" NaCl!", "nacl"),
        (" drum and flute", "drum and flute"),
        (" the big old red wooden barn door", None),  # too many words
        (" which", None),  # no content word
        (" <unused0>", None),
    ],
)
def test_a_completion_is_cleaned_to_a_name_or_none(text, name):
    assert rw.clean_name(text) == name


def hit(id: int, caption: str, score: float = 0.9) -> Hit:
    return Hit(
        id, score, Item(id=id, modality="image", uri=f"/lib/{id}.png", sha256=str(id), caption=caption)
    )


class FakeRewriter:
    """Names each question's thing (a name: one candidate scoring 0; or the candidates themselves)."""

    def __init__(self, names: dict[str, str | list[rw.Candidate] | None]):
        self.names = names
        self.asked: list[str] = []

    def candidates(self, question: str) -> list[rw.Candidate]:
        self.asked.append(question)
        found = self.names.get(question)
        if isinstance(found, list):
            return found
        return [rw.Candidate(found, 0.0, greedy=True)] if found else []


def fake_search(by_text: dict[str, list[Hit]]):
    searched: list[str] = []

    def search(query: SearchQuery) -> list[Hit]:
        searched.append(query.query)
        return by_text.get(query.query, [])

    return search, searched


def test_the_name_is_searched_and_only_items_that_are_it_ground_the_answer():
    search, searched = fake_search(
        {"drum": [hit(1, "A snare drum."), hit(2, "A drumstick."), hit(3, "Drum.")]}
    )
    query = SearchQuery(query="hit sticks beat", k=7)
    g = rw.ground(FakeRewriter({"What do you hit?": "drum"}), "What do you hit?", query, search)
    assert searched == ["drum"]
    assert (g.question, g.rewritten, [h.id for h in g.hits]) == ("drum", "drum", [1, 3])  # not the drumstick


def test_without_a_name_or_an_item_that_is_it_the_question_is_searched():
    own = [hit(9, "A cat.")]
    search, searched = fake_search({"animal croaks": own, "dog": [hit(4, "A dog toy.")]})
    query = SearchQuery(query="animal croaks")
    g = rw.ground(FakeRewriter({}), "What animal croaks?", query, search)
    assert (g.question, g.hits, g.rewritten, searched) == (
        "What animal croaks?",
        own,
        None,
        ["animal croaks"],
    )
    searched.clear()
    g = rw.ground(FakeRewriter({"What animal croaks?": "dog"}), "What animal croaks?", query, search)
    assert (g.question, g.hits, g.rewritten, searched) == (
        "What animal croaks?",
        own,
        None,
        ["dog", "animal croaks"],
    )


def test_the_answerer_of_a_grounding_in_a_name_uses_the_rewrite_floor():
    from service.generation import ExtractiveGenerator
    from service.generation.backends.extractive import Rules

    gen = ExtractiveGenerator(rules=Rules(item_min=0.5, answer_min=0.5, rewritten_min=0.3))
    by_name = rw.Grounding("drum", [hit(1, "A drum.")], "drum")
    own = rw.Grounding("What do you hit?", [hit(1, "A drum.")], None)
    assert rw.answerer(gen, by_name).rules.item_min == 0.3
    assert rw.answerer(gen, own) is gen
    other = object()  # a backend without rules (a model) answers as it is
    assert rw.answerer(other, by_name) is other


def test_a_name_the_wh_question_itself_names_is_not_its_answer():
    """The model's "crow" for "What bird crows at dawn on a farm?" was answered "A crow", cited."""
    search, searched = fake_search({"crow": [hit(1, "A crow.")], "bird crows dawn farm": [hit(2, "A farm.")]})
    asked = "What bird crows at dawn on a farm?"
    query = SearchQuery(query="bird crows dawn farm")
    g = rw.ground(FakeRewriter({asked: "crow"}), asked, query, search)
    assert (g.question, g.rewritten, searched) == (asked, None, ["bird crows dawn farm"])  # never searched


def test_names_are_searched_best_first_until_one_has_items_that_are_it():
    """The model's likeliest name is not always right ("What animal neighs?" -> dog, horse third): the
    dictionary's evidence reorders them, and a name without items that are it gives way to the next."""
    search, searched = fake_search(
        {"horse": [hit(1, "A horseshoe.")], "pony": [hit(2, "A pony.")], "dog": [hit(3, "A dog.")]}
    )
    found = [
        rw.Candidate("dog", -1.4, greedy=True),
        rw.Candidate("horse", -1.5, forward=0.0, reverse=10.0),  # the gloss of "neigh" names a horse
        rw.Candidate("pony", -1.8, forward=5.0),
    ]
    asked = "What animal neighs?"
    choice = rw.Choice(forward_weight=0.1, reverse_weight=0.2, min_score=-2.0, tries=3)
    g = rw.ground(FakeRewriter({asked: found}), asked, SearchQuery(query="animal neighs"), search, choice)
    assert searched == ["horse", "pony"]  # 0.5, then -1.3; "dog" (-1.4) is never needed
    assert (g.question, g.rewritten, [h.id for h in g.hits]) == ("pony", "pony", [2])
    searched.clear()
    g = rw.ground(FakeRewriter({asked: found}), asked, SearchQuery(query="animal neighs"), search, rw.GREEDY)
    assert (searched, g.rewritten) == (["dog"], "dog")  # the model's first name alone


def test_names_under_the_floor_or_past_the_tries_are_not_searched():
    search, searched = fake_search(
        {"pig": [hit(1, "A pig.")], "owl": [hit(2, "An owl.")], "q": [hit(3, "A hat.")]}
    )
    found = [rw.Candidate("owl", -2.4), rw.Candidate("pig", -2.6)]
    asked = "What animal says oink?"
    query = SearchQuery(query="q")
    g = rw.ground(FakeRewriter({asked: found}), asked, query, search, rw.Choice(min_score=-2.0))
    assert (searched, g.rewritten, g.question) == (["q"], None, asked)  # unsure: the question's own search
    searched.clear()
    g = rw.ground(
        FakeRewriter({asked: found[:1] + [rw.Candidate("pig", -2.6, forward=10.0)]}), asked, query, search
    )
    assert g.rewritten == "pig" and searched == ["pig"]  # the dictionary lifts it over the floor
    searched.clear()
    lone = rw.Choice(min_score=-3.0, tries=1)
    g = rw.ground(FakeRewriter({asked: [rw.Candidate("cow", -2.0), *found]}), asked, query, search, lone)
    assert (searched, g.rewritten) == (["cow", "q"], None)  # one try: "owl" and "pig" are not searched


def test_a_name_the_question_names_uses_up_its_try():
    search, searched = fake_search({"owl": [hit(1, "An owl.")], "q": [hit(2, "A farm.")]})
    asked = "What bird crows at dawn?"
    found = [rw.Candidate("crow", -0.9, greedy=True), rw.Candidate("owl", -2.5)]
    g = rw.ground(FakeRewriter({asked: found}), asked, SearchQuery(query="q"), search, rw.GREEDY)
    assert (searched, g.rewritten) == (["q"], None)  # as the model's first name alone always did
    searched.clear()
    two = rw.Choice(forward_weight=0.0, min_score=-3.0, tries=2)
    g = rw.ground(FakeRewriter({asked: found}), asked, SearchQuery(query="q"), search, two)
    assert (searched, g.rewritten) == (["owl"], "owl")


@pytest.mark.parametrize(
    ("question", "name", "named"),
    [
        ("What bird crows at dawn on a farm?", "crow", True),
        ("What long yellow fruit do monkeys like?", "monkey", True),
        ("What rings in a church tower?", "church bell", False),  # the thing is a bell
        ("What red vehicle carries firefighters?", "fire truck", False),
        ("Show me a frog.", "frog", False),  # a request names what it asks for
        ("a frog", "frog", False),
    ],
)
def test_names_its_answer(question, name, named):
    assert rw.names_its_answer(question, name) is named


@pytest.mark.parametrize(
    ("name", "caption", "is_it"),
    [
        ("frog", "A frog.", True),
        ("drum", "A snare drum.", True),  # a kind of drum
        ("train", "A train sign.", False),  # a sign
        ("truck", "A fire truck.", True),  # a kind of truck
        ("fire truck", "A truck.", False),  # not every truck
        ("eucalyptus tree", "A Christmas tree.", False),
        ("cat", "Black cats.", True),
        ("horse", "A horseshoe.", False),
        ("frog", "", False),
    ],
)
def test_an_item_is_the_thing_named(name, caption, is_it):
    assert rw.is_the_thing(name, hit(1, caption)) is is_it


def test_the_setting_and_the_request_field_are_validated(monkeypatch, tmp_path):
    assert Settings(collection=tmp_path).rewrite == "off"  # off unless asked for
    monkeypatch.setenv("MM_REWRITE", "gguf")
    assert Settings(collection=tmp_path).rewrite == "gguf"
    monkeypatch.setenv("MM_REWRITE", "yes")
    with pytest.raises(ValidationError, match="rewrite"):
        Settings(collection=tmp_path)
    assert GenerateParams(query="q").rewrite is None
    assert GenerateParams(query="q", rewrite=True).rewrite is True
    with pytest.raises(ValidationError, match="rewrite"):
        GenerateParams(query="q", rewrite="sometimes")


# the service, with a fake rewriter in the app's registry ----------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, embedder, media_root):
    settings = Settings(collection=tmp_path_factory.mktemp("rw") / "coll", allowed_roots=[media_root])
    with TestClient(create_app(settings, embedder=embedder)) as c:
        wait_job(c, c.post("/ingest", json={"path": str(media_root)}).json()["id"])
        gens = generators_of(c.app)
        gens._made["extractive"] = ExtractiveGenerator(rules=ANY_CONCEPT)  # uncalibrated tiny model
        gens._rewriter = FakeRewriter({ASKED: "red circle"})
        yield c


def red_circle_id(client) -> int:
    items = client.app.state.collection.items(limit=100)
    return next(it.id for it in items if it.uri.endswith("red_circle.png"))


@pytest.fixture
def rewriting(client, monkeypatch):
    """The server as started with MM_REWRITE=gguf (the fake rewriter in place of the model)."""
    monkeypatch.setattr(client.app.state.settings, "rewrite", "gguf")


def test_generate_with_rewrite_answers_the_name_from_its_items_only(client, rewriting):
    body = client.post("/generate", json={"query": ASKED, "k": 20, "rewrite": True}).json()
    assert body["rewritten"] == "red circle"
    assert [c["id"] for c in body["citations"]] == [red_circle_id(client)]
    assert body["answer"] == "Red circle: the collection has a picture of it [1]."


def test_without_mm_rewrite_nothing_is_rewritten_and_asking_for_it_is_a_503(client):
    fake = generators_of(client.app)._rewriter
    before = len(fake.asked)
    body = client.post("/generate", json={"query": ASKED, "k": 20}).json()
    assert body["rewritten"] is None and len(fake.asked) == before  # MM_REWRITE is off
    again = client.post("/generate", json={"query": ASKED, "k": 20, "rewrite": False}).json()
    assert again == body and len(fake.asked) == before
    resp = client.post("/generate", json={"query": ASKED, "rewrite": True})
    assert resp.status_code == 503, resp.text
    assert "question rewriting is off on this server: start it with MM_REWRITE=gguf" in resp.text
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": 3, "query": ASKED, "rewrite": True})
        err = ws.receive_json()
    assert (err["type"], err["code"], err["status"]) == ("error", "generator_unavailable", 503), err
    assert len(fake.asked) == before


def test_a_request_may_turn_rewriting_off(client, rewriting):
    fake = generators_of(client.app)._rewriter
    before = len(fake.asked)
    body = client.post("/generate", json={"query": ASKED, "k": 20, "rewrite": False}).json()
    assert body["rewritten"] is None and len(fake.asked) == before


def test_a_question_the_rewriter_cannot_name_is_answered_from_its_own_search(client, rewriting):
    plain = client.post("/generate", json={"query": "a blue square", "k": 3, "rewrite": False}).json()
    body = client.post("/generate", json={"query": "a blue square", "k": 3, "rewrite": True}).json()
    assert body == plain and body["rewritten"] is None


def test_sse_and_websocket_report_the_rewrite(client, rewriting):
    resp = client.post("/generate", json={"query": ASKED, "k": 20, "rewrite": True, "stream": True})
    done = resp.text.strip().split("\n\n")[-1]
    assert done == 'event: done\ndata: {"backend": "extractive", "rewritten": "red circle"}'
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": 1, "query": ASKED, "k": 20, "rewrite": True})
        msgs = []
        while not msgs or msgs[-1]["type"] not in ("done", "error"):
            msgs.append(ws.receive_json())
    assert msgs[-1] == {"type": "done", "id": 1, "backend": "extractive", "rewritten": "red circle"}
    assert [c["id"] for c in msgs[-2]["citations"]] == [red_circle_id(client)]


def test_mm_rewrite_applies_to_every_request_and_the_chat_api(client, rewriting):
    assert client.post("/generate", json={"query": ASKED, "k": 20}).json()["rewritten"] == "red circle"
    chat = {"messages": [{"role": "user", "content": ASKED}], "mm_k": 20}
    body = client.post("/v1/chat/completions", json=chat).json()
    assert body["choices"][0]["message"]["content"].startswith("Red circle:")
    assert [c["id"] for c in body["mm_citations"]] == [red_circle_id(client)]


def test_a_rewriter_that_fails_is_a_503(client, rewriting, monkeypatch):
    class Missing:
        def candidates(self, question: str) -> list[rw.Candidate]:
            raise GeneratorUnavailable(
                "rewrite", "llama-cpp-python is not installed: pip install -e '.[llm]'"
            )

    monkeypatch.setattr(generators_of(client.app), "_rewriter", Missing())
    resp = client.post("/generate", json={"query": ASKED, "rewrite": True})
    assert resp.status_code == 503, resp.text
    assert "rewrite backend unavailable: llama-cpp-python" in resp.json()["error"]["message"]


def test_mm_rewrite_stops_the_server_at_start_when_the_model_is_missing(tmp_path, monkeypatch, embedder):
    def missing(self) -> None:
        raise GeneratorUnavailable("rewrite", "no MM_GGUF_PATH and the packaged model cannot be used")

    monkeypatch.setattr(rw.QuestionRewriter, "load", missing)
    app = create_app(Settings(collection=tmp_path / "c", rewrite="gguf"), embedder=embedder)
    starts = pytest.raises(
        RuntimeError, match="MM_REWRITE=gguf: rewrite backend unavailable: no MM_GGUF_PATH"
    )
    with starts, TestClient(app):
        pass


def test_mm_ask_rewrite(client, embedder, monkeypatch, capsys):
    from service import embedding
    from service.cli import main
    from service.generation import registry

    coll_dir = client.app.state.settings.collection
    client.app.state.collection.save()
    monkeypatch.setattr(embedding, "load_embedder", lambda name="default": embedder)
    monkeypatch.setattr(registry, "QuestionRewriter", lambda: FakeRewriter({ASKED: "red circle"}))
    argv = ["ask", ASKED, "--collection", str(coll_dir), "-k", "20", "--json"]
    assert main([*argv, "--rewrite"]) == 0
    body = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert body["rewritten"] == "red circle"
    assert {c["id"] for c in body["citations"]} <= {red_circle_id(client)}  # the default rules may decline
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rewritten"] is None


# the real packaged model ------------------------------------------------------------------------------

REWRITE = """
import json
from service.generation.rewrite import CHOICE, QuestionRewriter
out = {{}}
for glosses in ("wordnet", None):
    r = QuestionRewriter() if glosses else QuestionRewriter(glosses=None)
    found = [r.candidates(q) for q in {questions!r}]
    out[str(glosses)] = {{
        "chosen": [max(f, key=CHOICE.score).name for f in found],
        "greedy": [next(c.name for c in f if c.greedy) for f in found],
        "first_is_likeliest": all(f[0].greedy and f[0].logprob == max(c.logprob for c in f) for f in found),
        "evidence": sum(c.forward + c.reverse for f in found for c in f),
    }}
print(json.dumps(out))
"""
OURS = {  # questions of ours (in neither question set nor the prompt) and the thing each asks for
    "Which animal barks and wags its tail?": "dog",  # the dictionary's "long-tailed" monkey wins (3 Dec)
    "Show me a picture of a horse.": "horse",
    "a sound of a trumpet": "trumpet",
    "Which animal has antlers?": "deer",
    "What animal gallops and whinnies?": "horse",
    "Which animal has black and white fur and eats bamboo?": "panda",  # the model says tiger
    "Which animal carries a hump and lives in the desert?": "camel",
}


@pytest.mark.slow
@needs_llm
def test_the_packaged_model_names_the_thing_asked_for():
    """In a child process, as tests/test_gguf.py decodes: a segmentation fault fails this test only. The
    candidates start with the model's greedy name; with WordNet the chosen names are right at least as
    often as the model's own, and without it (a machine without wordnet-base) the choice falls back to
    the model's probabilities alone."""
    code = REWRITE.format(questions=list(OURS))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (
        f"exit status {run.returncode} (-11: segmentation fault)\n{run.stderr[-2000:]}"
    )
    out = json.loads(run.stdout.strip().splitlines()[-1])
    right = {k: sum(a == b for a, b in zip(v["chosen"], OURS.values(), strict=True)) for k, v in out.items()}
    assert right["wordnet"] >= right["None"] and right["wordnet"] >= len(OURS) - 2, out
    assert out["wordnet"]["first_is_likeliest"] and out["None"]["first_is_likeliest"]
    assert out["wordnet"]["evidence"] > 0 and out["None"]["evidence"] == 0
    assert out["None"]["chosen"] == out["None"]["greedy"] == out["wordnet"]["greedy"]
