"""The quickstart notebook, executed in a real Jupyter kernel (fork-launched workers)."""

import importlib.util
import os

import pytest

from tests.conftest import require
from tests.twhin_setup import REPO

NOTEBOOK = os.path.join(REPO, "docs", "notebooks", "quickstart.ipynb")


@pytest.mark.slow
@pytest.mark.timeout(600)   # the kernel allows 300 s per cell
def test_quickstart_notebook_trains_and_returns_each_ranks_result(tmp_path, monkeypatch):
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
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert "rank 0: step 60" in printed and "rank 1: step 60" in printed, printed
    assert (tmp_path / "save" / "60").is_dir()
