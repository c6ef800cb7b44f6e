"""Which packages the wheel holds, and under which names (the rest is pyproject.toml).

`projects/` is installed as `tml_projects`, never as a top-level `projects` package that
could clash with another distribution's in site-packages. Every import inside projects/ is
relative (tools/relative_imports.py), so the same files are `projects.twhin` in a
repository checkout and `tml_projects.twhin` when installed. A setup.py because
pyproject.toml's package discovery cannot rename a directory.
"""

from setuptools import find_packages, setup

PROJECTS = "tml_projects"

setup(
    packages=[*find_packages(include=["tml", "tml.*"]),
              *(PROJECTS + name[len("projects"):]
                for name in find_packages(include=["projects", "projects.*"]))],
    package_dir={PROJECTS: "projects"},
)
