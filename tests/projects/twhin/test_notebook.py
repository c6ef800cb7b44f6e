"""The quickstart notebook, executed in a real Jupyter kernel: `projects.twhin.fit` with
workers forked from the kernel, its evaluation and neighbours printed."""

import importlib.util
import os

import pytest

from tests.conftest import require
from tests.twhin_setup import REPO

NOTEBOOK = os.path.join(REPO, "docs", "notebooks", "quickstart.ipynb")


@pytest.mark.slow
@pytest.mark.timeout(600)   # the kernel allows 300 s per cell
def test_quickstart_notebook_fits_evaluates_and_queries_neighbours(tmp_path, monkeypatch):
    for module in ("nbformat", "nbclient", "ipykernel", "jupyter_client"):
        require(importlib.util.find_spec(module), f"the notebook test needs {module} "
                "(requirements/dev.txt)")
    from jupyter_client.kernelspec import KernelSpecManager

    require("python3" in KernelSpecManager().find_kernel_specs(),
            "no 'python3' Jupyter kernel (ipykernel) in this environment")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("QUICKSTART_STEPS", "60")
    monkeypatch.setenv("QUICKSTART_SAVE_DIR", str(tmp_path / "save"))
    monkeypatch.setenv("PYTHONPATH", REPO)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    printed = ["".join(output.get("text", "") for output in cell.get("outputs", [])
                       if output.get("name") != "stderr")
               for cell in notebook.cells]
    text = "\n".join(printed)
    assert f"everything is in {tmp_path / 'save'}\nsteps: 60" in text, text
    assert "popularity baseline" in text and "\nembeddings " in text
    assert "buys [('item:i" in printed[-1] and "nearest [('user:u" in printed[-1], printed[-1]
    assert (tmp_path / "save" / "60").is_dir()
    assert (tmp_path / "save" / "embeddings" / "user.parquet").is_file()
