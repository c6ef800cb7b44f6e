"""The wheel as a user installs it: built from this checkout, installed into fresh virtual
environments outside the repository, and run there (issue 19, packaging).

Offline: the environments see this interpreter's packages (torch, pyarrow, ...) through a
`.pth` file, as tml.launch.run_env does for a run's environment, but through a folder of
links that leaves out this checkout's own installation (tml, its editable finder) so that
only the wheel provides tml. Two environments:

- `full`: every dependency, torchrec and fbgemm included; the wheel is installed with its
  `cpu` extra and `--no-index`, so the metadata must resolve against what is there
  (nothing is downloaded). `twhin train` runs the shipped local.yaml for a few steps: the
  built-in graph is generated under TML_CACHE_DIR, not in site-packages; then `twhin
  export --index`, and `twhin neighbors` of that export in the `bare` environment.
- `bare`: the same without torchrec and fbgemm (a user who skipped the torchrec step):
  `twhin --help`, `tml --version` and `twhin import` work, `twhin train` is refused in
  one line naming the install command.

And the editable install `make venv` makes: `tml_projects` and `projects` are both the
checkout's projects/.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pyarrow.parquet as pq
import pytest

from tests.twhin_setup import REPO, WORKER_VARS

# What the wheel is built from (copied, so that the build writes nothing in the checkout).
_SOURCES = ("tml", "projects", "setup.py", "pyproject.toml", "README.md")
# This checkout's own installation: hidden from the environments.
_OWN = ("tml", "tml_projects", "projects")
_STACK = ("torchrec", "fbgemm_gpu")


def _run(args: list[str], cwd: str, env: dict[str, str], timeout: int = 300,
         check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done


def _is_own(entry: str) -> bool:
    name = entry.split("-")[0].split(".")[0].lower()
    return name in _OWN or entry.startswith("__editable__") or entry.endswith(".pth")


def _is_stack(entry: str) -> bool:
    return any(entry.lower().startswith(name) for name in _STACK)


def _views(root: str) -> tuple[str, str]:
    """Two folders of links into this interpreter's site-packages: everything but this
    checkout's installation and torchrec/fbgemm, and torchrec/fbgemm alone."""
    base, stack = os.path.join(root, "view-base"), os.path.join(root, "view-stack")
    os.makedirs(base)
    os.makedirs(stack)
    for packages in site.getsitepackages():
        if not os.path.isdir(packages):
            continue
        for entry in os.listdir(packages):
            if entry == "__pycache__" or _is_own(entry):
                continue
            target = stack if _is_stack(entry) else base
            link = os.path.join(target, entry)
            if not os.path.lexists(link):
                os.symlink(os.path.join(packages, entry), link)
    return base, stack


def _venv(path: str, views: list[str]) -> str:
    """A fresh virtual environment (no pip of its own) that sees `views`; its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True,
                   capture_output=True, timeout=120)
    packages = glob.glob(os.path.join(path, "lib", "python*", "site-packages"))[0]
    with open(os.path.join(packages, "_views.pth"), "w") as f:
        f.write("".join(view + "\n" for view in views))
    return os.path.join(path, "bin")


def _site_packages(bin_dir: str) -> str:
    return glob.glob(os.path.join(os.path.dirname(bin_dir), "lib", "python*",
                                  "site-packages"))[0]


def _copy_sources(source) -> str:
    source.mkdir()
    for name in _SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, source / name)
    return source


def _user_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*WORKER_VARS, "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", TML_CACHE_DIR=str(tmp_path / "cache"),
               XDG_CACHE_HOME=str(tmp_path / "xdg"), PIP_NO_INDEX="1")
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_editable_install_of_a_checkout_keeps_both_names(tmp_path) -> None:
    # What `make venv` does (pip install -e .): `twhin` runs tml_projects, which is the
    # checkout's projects/ directory, and `projects` stays importable as it was.
    source = _copy_sources(tmp_path / "source")
    env = _user_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = _venv(str(tmp_path / "env"), list(_views(str(tmp_path))))
    _run([os.path.join(bin_dir, "python"), "-m", "pip", "install", "--no-index", "--no-deps",
          "--no-build-isolation", "-e", str(source)], str(work), env)
    where = _run([os.path.join(bin_dir, "python"), "-c",
                  "import tml, tml_projects.twhin.cli as cli; print(tml.__file__); "
                  "print(cli.__file__)"], str(work), env).stdout.split()
    assert where == [str(source / "tml" / "__init__.py"),
                     str(source / "projects" / "twhin" / "cli.py")], where
    assert _run([os.path.join(bin_dir, "twhin"), "--version"], str(work), env).stdout \
        .startswith("twhin (tml ")
    assert _run([os.path.join(bin_dir, "python"), "-m", "projects.twhin", "--version"],
                str(source), env).stdout.startswith("twhin (tml ")
    # The original's name, from any directory: an editable checkout keeps it (a wheel not).
    original = _run([os.path.join(bin_dir, "python"), "-c",
                     "import projects.twhin.run as run; print(run.__file__)"], str(work),
                    env).stdout.strip()
    assert original == str(source / "projects" / "twhin" / "run.py"), original


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path) -> None:
    source = _copy_sources(tmp_path / "source")
    env = _user_env(tmp_path)
    work = tmp_path / "work"     # every command runs here: not the repository
    work.mkdir()

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(tmp_path / "dist"), str(source)], str(work), env)
    (wheel,) = glob.glob(str(tmp_path / "dist" / "tml-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tml", "tml_projects"}, tops

    base, stack = _views(str(tmp_path))
    full = _venv(str(tmp_path / "full"), [base, stack])
    bare = _venv(str(tmp_path / "bare"), [base])
    # As docs/install.md says (torchrec is already there, the step that adds it is moot).
    _run([os.path.join(full, "python"), "-m", "pip", "install", "--no-index",
          f"{wheel}[cpu]"], str(work), env)
    _run([os.path.join(bare, "python"), "-m", "pip", "install", "--no-index", "--no-deps",
          wheel], str(work), env)

    for bin_dir in (full, bare):
        packages = _site_packages(bin_dir)
        assert os.path.isfile(os.path.join(packages, "tml", "py.typed"))
        assert os.path.isfile(os.path.join(packages, "tml_projects", "py.typed"))
        assert not os.path.exists(os.path.join(packages, "projects"))
        where = _run([os.path.join(bin_dir, "python"), "-c",
                      "import importlib.util as u, tml, tml_projects.twhin; "
                      "print(tml.__file__); print(tml_projects.twhin.__file__); "
                      "print(u.find_spec('projects'))"], str(work), env).stdout.split()
        assert where[0].startswith(packages) and where[1].startswith(packages), where
        assert where[2] == "None", where   # no `projects` package anywhere on the path

    # Without torchrec and fbgemm: what needs neither works, the rest says what to install.
    assert _run([os.path.join(bare, "twhin"), "--help"], str(work), env).stdout \
        .startswith("usage: twhin")
    version = _run([os.path.join(bare, "tml"), "--version"], str(work), env).stdout
    assert "0.1.0" in version, version
    (work / "edges.tsv").write_text("".join(f"u{i}\tfollows\tu{(i * 7 + 1) % 50}\n"
                                            for i in range(200)))
    imported = _run([os.path.join(bare, "twhin"), "import", "--triples", "edges.tsv",
                     "--out", "imported"], str(work), env).stdout
    assert "config: " in imported and (work / "imported" / "config.yaml").is_file()
    refused = _run([os.path.join(bare, "twhin"), "train", "--config",
                    "imported/config.yaml", "--save_dir", "runs/refused"], str(work), env,
                   check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.count("\n") == 1 and "pip install" in refused.stderr, refused.stderr
    assert not (work / "runs" / "refused").exists()

    # Everything: the shipped config trains a few steps on the built-in graph, generated in
    # the cache directory.
    config = os.path.join(_site_packages(full), "tml_projects", "twhin", "config",
                          "local.yaml")
    _run([os.path.join(full, "twhin"), "train", "--config", config, "--save_dir", "run",
          "--nproc_per_node", "1", "--set", "training.num_train_steps=3",
          "--set", "training.num_epochs=1", "--set", "training.num_eval_steps=1",
          "--set", "training.checkpoint_every_n=3"], str(work), env, timeout=900)
    graph = tmp_path / "cache" / "twhin" / "graph"
    assert (graph / "_SUCCESS").is_file() and (graph / "train").is_dir()
    assert not (tmp_path / "xdg" / "tml").exists()   # TML_CACHE_DIR wins
    for bin_dir in (full, bare):
        root = os.path.dirname(_site_packages(bin_dir))
        assert not glob.glob(os.path.join(root, "**", "data", "twhin"), recursive=True)
    assert not os.path.exists(os.path.join(REPO, "run"))

    _run([os.path.join(full, "twhin"), "export", "--config", config, "--checkpoint", "run",
          "--out", "emb", "--index"], str(work), env)
    assert (work / "emb" / "user.ivf-rows.npy").is_file()
    # Neighbours need numpy and parquet only, index included: the environment without
    # torchrec (and without any index library) answers.
    rows = _run([os.path.join(bare, "twhin"), "neighbors", "--embeddings", "emb",
                 "--entity", "0", "--table", "user", "--relation", "fav", "--k", "3"],
                str(work), env).stdout
    ranked = [line.split() for line in rows.splitlines()[1:] if line.strip()]
    assert [r[0] for r in ranked] == ["1", "2", "3"], rows
    assert all(0 <= int(r[1]) < 20_000 for r in ranked), rows     # tweets, by row number
    assert pq.ParquetFile(work / "emb" / "user.parquet").metadata.num_rows == 100_000
