"""The notebooks run top to bottom (nbclient, the venv's ``python3`` kernel) on the tiny model, and are
committed without outputs.

Each notebook reads its sizes from environment variables (``MODEL``, ``NB_*``); the kernel inherits them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
SMALL = {
    "MODEL": "tiny",
    "NB_SOURCE": "generated",  # never the (large) demo library, even where one was built
    "NB_N": "2",
    "NB_K": "4",
    "NB_STEPS": "6",
}
CELL_TIMEOUT_S = 300  # generous: the test machines are small and shared
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
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="notebooks run on the venv's ipykernel")
    for key, value in SMALL.items():
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
    seconds = time.perf_counter() - t0

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    mime, needles = EXPECTED.get(path.name, ("text/plain", ()))
    rich = [o["data"][mime] for o in outputs if mime in o.get("data", {})]
    assert rich, f"{path.name} showed no {mime} output"
    for needle in needles:
        assert any(needle in r for r in rich), f"{path.name} showed no {needle}"
    log.info("%s: %.1f s", path.name, seconds)
