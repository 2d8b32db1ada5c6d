"""The example notebook runs top to bottom (with few training steps)."""

from pathlib import Path

import pytest

from fmnist.run import RunDir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parent.parent / "examples" / "fashion_mnist_convnets.ipynb"


def test_notebook_executes(tmp_path, data_dir):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code" and "STEPS =" in c.source)
    params.source = f'STEPS = 20\nBATCH_SIZE = 64\nLEARNING_RATE = 0.001\nRUNS = "{tmp_path / "runs"}"'
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "test accuracy" in text and "post " in text and "-> post-bn" in text
    assert "3,274,634 parameters" in text
    assert RunDir(tmp_path / "runs" / "post").has_model()
    assert RunDir(tmp_path / "runs" / "post-bn").has_model()
