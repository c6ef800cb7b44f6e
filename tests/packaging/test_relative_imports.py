"""projects/ imports itself relatively (tools/relative_imports.py), so the same files are
`projects.<name>` in a checkout and `tml_projects.<name>` in the wheel (docs/install.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.twhin_setup import REPO

SCRIPT = os.path.join(REPO, "tools", "relative_imports.py")


def test_no_absolute_import_of_projects_inside_projects() -> None:
    done = subprocess.run([sys.executable, SCRIPT, "--check", REPO], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (
        f"absolute imports of projects/ (run `python tools/relative_imports.py`):\n"
        f"{done.stdout}{done.stderr}")


def test_the_rewrite_makes_imports_relative_and_keeps_the_rest(tmp_path) -> None:
    package = tmp_path / "projects" / "demo" / "data"
    package.mkdir(parents=True)
    for directory in (tmp_path / "projects", package.parent, package):
        (directory / "__init__.py").write_text("")
    source = ('"""from projects.demo.x import y stays in a docstring."""\n'
              "import os\n\n"
              "from projects.demo.models.m import A, B\n"
              "from projects.demo.data.other import C\n"
              "from projects.demo import config\n\n\n"
              "def f():\n"
              "    from projects.demo.models import m as module\n"
              "    return os, A, B, C, config, module\n")
    (package / "reader.py").write_text(source)
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (package / "reader.py").read_text()
    assert '"""from projects.demo.x import y stays in a docstring."""' in text
    assert "from ..models.m import A, B" in text
    assert "from .other import C" in text
    assert "from .. import config" in text
    assert "    from ..models import m as module" in text
    assert "from projects" not in text.split('"""')[2]
    again = subprocess.run([sys.executable, SCRIPT, "--check", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout   # idempotent
