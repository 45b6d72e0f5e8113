"""The notebooks run top to bottom (nbclient, the venv's ``python3`` kernel) on the tiny model, and are
committed without outputs.

Each notebook reads its sizes from environment variables (``MODEL``, ``NB_*``); the kernel inherits them.
Their prose states what each search finds and what each plot shows, and a cell under each checks that on
the numbers (for a trained model, or an untrained one): so they also run on the shipped default model,
where the statements about a trained model are asserted, and each must print the figures it checked.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DEMO_LIBRARY = REPO / "demo" / "library"  # built by `make demo` / `mm demo`; absent in a fresh clone
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
SMALL = {
    "MODEL": "tiny",
    "NB_SOURCE": "generated",  # never the (large) demo library, even where one was built
    "NB_N": "2",
    "NB_K": "4",
    "NB_STEPS": "6",
}
CELL_TIMEOUT_S = 300  # generous: the test machines are small and shared
# the lines each notebook prints from the cells that check its prose (at least this many of each)
CHECKED = {
    "01_quickstart.ipynb": {"the first item captioned with": 4},
    "02_inside_the_model.ipynb": {
        "mean cosine within a modality": 1,
        "MaxVio per layer": 1,
        "mean experts per token": 1,
        "local weight, mean per block": 1,
    },
    "03_finetune_and_quantize.ipynb": {"LoRA lift": 1, "x smaller)": 1},
}
# what each notebook must show besides running: rich outputs of these MIME types (with this text)
EXPECTED = {
    "01_quickstart.ipynb": ("text/html", ("<img", "<audio")),
    "02_inside_the_model.ipynb": ("image/png", ()),
    "03_finetune_and_quantize.ipynb": ("image/png", ()),
}


def test_notebooks_exist():
    assert {p.name for p in PATHS} >= set(EXPECTED), sorted(p.name for p in PATHS)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb["metadata"]


SLOW = {"03_finetune_and_quantize"}  # over 30 s on 2 cores


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in PATHS]
)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    outputs = execute(path, SMALL, monkeypatch)
    mime, needles = EXPECTED.get(path.name, ("text/plain", ()))
    rich = [o["data"][mime] for o in outputs if mime in o.get("data", {})]
    assert rich, f"{path.name} showed no {mime} output"
    for needle in needles:
        assert any(needle in r for r in rich), f"{path.name} showed no {needle}"


def execute(path: Path, env: dict[str, str], monkeypatch) -> list:
    """Run the notebook with ``env``; its outputs. Fails on the first failing cell (an assertion of a
    statement its prose makes included), and unless it printed the figures its checks look at."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="notebooks run on the venv's ipykernel")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend (Agg) captures figures
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",  # nbclient starts it with this interpreter (sys.executable)
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    log.info("%s (%s): %.1f s", path.name, env.get("MODEL"), time.perf_counter() - t0)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for needle, times in CHECKED.get(path.name, {}).items():
        assert printed.count(needle) >= times, f"{path.name} printed {needle!r} fewer than {times} times"
    return outputs


# The shipped default model: what the prose says a trained model shows must hold (the notebooks assert it).
TRAINED_RUNS = [
    pytest.param("01_quickstart.ipynb", {"NB_SOURCE": "generated"}, id="01_quickstart-generated"),
    pytest.param(
        "01_quickstart.ipynb",
        {"NB_SOURCE": "demo", "NB_MAX_FILES": "120"},
        id="01_quickstart-demo",
        marks=pytest.mark.skipif(not DEMO_LIBRARY.is_dir(), reason="no demo/library: run `make demo` first"),
    ),
    pytest.param("02_inside_the_model.ipynb", {}, id="02_inside_the_model"),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("name", "env"), TRAINED_RUNS)
def test_notebook_statements_hold_on_the_default_model(name, env, monkeypatch):
    assert (REPO / "mm" / "checkpoints" / "default" / "model.safetensors").is_file()
    for key in ("NB_N", "NB_K", "NB_STEPS", "NB_MAX_FILES"):  # the sizes the prose was written for
        monkeypatch.delenv(key, raising=False)
    printed = execute(NOTEBOOKS / name, {"MODEL": "default", **env}, monkeypatch)
    if name.startswith("01"):  # a trained model puts the expected item first (the notebook asserts it)
        text = "".join(o.get("text", "") for o in printed if o.output_type == "stream")
        assert text.count("is ranked 1") == CHECKED[name]["the first item captioned with"], text
