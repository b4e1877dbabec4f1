"""examples/quickstart.ipynb runs top to bottom (on tiny settings) and draws its overlays."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"

TINY = """EPOCHS = 2
ITERATIONS_PER_EPOCH = 4
N_TRAIN, N_TEST = 4, 2
SIZE = 32
WORK_DIR = {work!r}
"""


def test_notebook_has_a_parameters_cell_and_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "EPOCHS" in params[0].source
    # committed without outputs: diffs stay readable and nothing stale is shown
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = TINY.format(work=str(tmp_path / "out"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "validation Dice" in text and "weights, epoch" in text and "mean test Dice" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the data preview and the prediction overlays
    assert (tmp_path / "out" / "model" / "plan.json").is_file()
    assert len(list((tmp_path / "out" / "predictions").glob("*.png"))) == 2
