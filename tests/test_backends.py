"""The generator backends are one list (``service.settings.Backend``): the settings, the request models,
the OpenAI route's model names, the registry and ``mm ask`` all take it from there."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from service.generation import Generators
from service.schemas import ChatRequest, GenerateParams, GenerateRequest, WSGenerate
from service.settings import BACKENDS, Backend, Settings


def test_settings_and_request_models_take_the_one_list():
    assert get_args(Backend) == BACKENDS and len(BACKENDS) == len(set(BACKENDS))
    assert Settings.model_fields["generator"].annotation == Backend
    for model in (GenerateParams, GenerateRequest, WSGenerate):
        assert model.model_fields["backend"].annotation == Backend | None
    with pytest.raises(ValidationError):
        Settings(generator="nope")
    assert ChatRequest(messages=[{"role": "user", "content": "x"}]).model == "mm"


@pytest.mark.parametrize("name", BACKENDS)
def test_the_registry_builds_every_listed_backend(name, tmp_path):
    gens = Generators(Settings(collection=tmp_path / "c"), lambda item_id: None)
    assert gens.get(name).name == name  # built lazily: nothing is loaded until it answers


def test_unknown_backends_are_refused_with_the_list(tmp_path):
    gens = Generators(Settings(collection=tmp_path / "c"), lambda item_id: None)
    with pytest.raises(ValueError, match="choose from " + ", ".join(BACKENDS)):
        gens.get("nope")


def test_openai_models_and_mm_ask_use_the_list(tmp_path, capsys):
    from conftest import FakeEmbedder
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.cli import main

    with TestClient(create_app(Settings(collection=tmp_path / "c"), embedder=FakeEmbedder())) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == "mm" and ids[1:] == [b for b in BACKENDS if b in ids]  # those set up, in list order
    assert "extractive" in ids and "openai" not in ids  # no endpoint configured here
    code = main(["ask", "what?", "--backend", "nope", "--collection", str(tmp_path / "c")])
    assert code == 2 and "backend" in capsys.readouterr().err
