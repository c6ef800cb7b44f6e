"""Which packages the wheel holds, and under which names (the rest is pyproject.toml).

`projects/` is installed as `tml_projects`, never as a top-level `projects` package that
could clash with another distribution's in site-packages. Every import inside projects/ is
relative (tools/relative_imports.py), so the same files are `projects.twhin` in a
repository checkout and `tml_projects.twhin` when installed. A setup.py because
pyproject.toml's package discovery cannot rename a directory.

An editable install of a checkout (`pip install -e .`, what `make venv` does) maps both
names to the checkout's projects/: `from projects.twhin.run import ...` keeps working from
any directory there, as for the original's users; a wheel never has `projects`.
"""

import sys

from setuptools import find_packages, setup

PROJECTS = "tml_projects"
EDITABLE = "editable_wheel" in sys.argv   # setuptools' PEP 660 build runs this command

projects = find_packages(include=["projects", "projects.*"])
setup(
    packages=[*find_packages(include=["tml", "tml.*"]),
              *(PROJECTS + name[len("projects"):] for name in projects),
              *(projects if EDITABLE else [])],
    package_dir={PROJECTS: "projects"},
)
