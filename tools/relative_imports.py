"""Make every import between modules of projects/ relative, so one source tree works as
`projects.<name>` in a repository checkout and as `tml_projects.<name>` in the wheel.

    python tools/relative_imports.py [--check] [ROOT]

`from projects.twhin.models.models import X` in projects/twhin/data/readers.py becomes
`from ..models.models import X`. The files run as scripts (SCRIPTS: `python
projects/twhin/run.py`, torchrun, Bazel) get a PEP 366 block before their first import,
which names their package and puts the directory above it on sys.path, so their relative
imports work without `-m`. The rewrite is idempotent: run it again after merging a branch
that added absolute imports. `--check` changes nothing and exits 1 when something would
change (tests run it). `import projects.x` (not `from`) is reported, not rewritten.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys

TOP = "projects"
SCRIPTS = ("projects/twhin/run.py", "projects/home/recap/main.py")
BOOTSTRAP_MARK = "# Run as a file (PEP 366)"
BOOTSTRAP = f'''{BOOTSTRAP_MARK}: `python projects/.../x.py`, torchrun and Bazel run this module
# without a package; name it, and put the directory above the top package on the path (in
# place of the script's own directory, whose modules would shadow top-level ones).
if not __package__:
    import os as _os
    import sys as _sys

    _top, _names = _os.path.dirname(_os.path.abspath(__file__)), []
    while _os.path.isfile(_os.path.join(_top, "__init__.py")):
        _top, _name = _os.path.split(_top)
        _names.insert(0, _name)
    if _sys.path and _os.path.abspath(_sys.path[0] or ".") == _os.path.dirname(
            _os.path.abspath(__file__)):
        _sys.path[0] = _top
    elif _top not in _sys.path:
        _sys.path.insert(0, _top)
    __package__ = ".".join(_names)

'''


def package_of(root: str, path: str) -> list[str]:
    """The package a module file belongs to, as name parts (projects/twhin/run.py ->
    [projects, twhin]; an __init__.py belongs to its own directory)."""
    rel = os.path.relpath(path, root)
    return os.path.dirname(rel).split(os.sep)


def relative(package: list[str], target: str) -> str:
    """`target` (dotted, absolute) as seen from a module of `package`."""
    parts = target.split(".")
    common = 0
    while common < min(len(package), len(parts)) and package[common] == parts[common]:
        common += 1
    if common < 2:
        raise ValueError(f"{'.'.join(package)} imports {target}: another project")
    return "." * (len(package) - common + 1) + ".".join(parts[common:])


def rewrite(root: str, path: str, problems: list[str]) -> str | None:
    """The new text of `path`, or None when nothing changes."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text, path)
    package = package_of(root, path)
    changed = False
    first_relative = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == TOP or alias.name.startswith(TOP + "."):
                    problems.append(f"{path}:{node.lineno}: `import {alias.name}`: rewrite "
                                    "by hand as `from . import ...`")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and node.module and (node.module == TOP
                                                or node.module.startswith(TOP + ".")):
            index = node.lineno - 1
            line = lines[index]
            new = re.sub(r"\bfrom\s+" + re.escape(node.module) + r"(?=\s)",
                         "from " + relative(package, node.module), line, count=1)
            if new == line:
                problems.append(f"{path}:{node.lineno}: cannot rewrite {line.strip()!r}")
                continue
            lines[index] = new
            changed = True
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    if rel in SCRIPTS and BOOTSTRAP_MARK not in text:
        # Before the first import of tml or of the project: both then come from the
        # checkout the script lives in.
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                else ["."] if isinstance(node, ast.ImportFrom) else []
            if any(n == "." or n.split(".")[0] in ("tml", TOP) for n in names):
                first_relative = node.lineno
                break
        if first_relative is None:
            problems.append(f"{path}: no import of tml or {TOP} to put the script block before")
        else:
            lines.insert(first_relative - 1, BOOTSTRAP)
        changed = True
    return "".join(lines) if changed else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="Repository root (default: this checkout).")
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 when "
                        "something would change.")
    args = parser.parse_args()
    problems: list[str] = []
    changed = []
    for directory, dirs, files in os.walk(os.path.join(args.root, TOP)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            new = rewrite(args.root, path, problems)
            if new is None:
                continue
            changed.append(path)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.check:
        for path in changed:
            print(f"{path}: absolute import of {TOP}/ (run tools/relative_imports.py)")
        return 1 if changed or problems else 0
    if changed:
        # The relative imports form their own block (isort's rule, ruff's I001).
        ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) \
            or shutil.which("ruff")
        if ruff:
            subprocess.run([ruff, "check", "--quiet", "--fix", "--select", "I", *changed],
                           check=False)
        else:
            print("ruff not found: sort the imports of the rewritten files with "
                  "`ruff check --fix --select I`", file=sys.stderr)
        print(f"rewrote {len(changed)} file(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
