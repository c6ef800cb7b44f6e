"""Copy a run's artifacts from the working directory into `<run-dir>/artifacts/`.

The job writes the artifacts, so it also decides what lies at their paths when they are
copied: a symbolic link to `/etc`, a directory link two levels up, a named pipe. The copy
therefore checks, at copy time and after resolving symbolic links, that every source lies
inside the working directory and every destination inside `<run-dir>/artifacts/`
(`tml.common.safe_paths.confine`); the workflow model has already refused `..` and
absolute paths. Inside a copied directory, symbolic links are copied as links, and only
when they are relative and point inside that artifact; any other link is left out and
reported. Nothing outside the two roots is read or written.

Every backend uses this: the local backend calls `copy_artifacts`, the SLURM batch script
runs `python -m tml.launch.artifacts WORKING_DIR RUN_DIR ARTIFACT...` on the master node.
Artifacts that were refused are listed in `<run-dir>/refused-artifacts`, and `tml launch`
ends with an error naming the first.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tml.common.safe_paths import confine, is_inside
from tml.errors import TmlError

logger = logging.getLogger(__name__)

REFUSED_FILE = "refused-artifacts"


class ArtifactRefused(TmlError):
    """An artifact's path leads outside the working directory or the run directory."""


@dataclass
class Copied:
    """What became of the artifacts: copied, not found, or refused (with the reason)."""

    copied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _links_leaving(root: str) -> Callable[[str, list[str]], set[str]]:
    """copytree `ignore`: symbolic links that are absolute or resolve outside `root`."""
    real_root = os.path.realpath(root)

    def ignore(directory: str, names: list[str]) -> set[str]:
        left_out = set()
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path) and (os.path.isabs(os.readlink(path))
                                         or not is_inside(real_root, path)):
                left_out.add(name)
                logger.warning("artifact link %s -> %s leads outside the artifact; not "
                               "copied", path, os.readlink(path))
        return left_out

    return ignore


def _clear(target: str) -> None:
    """Remove an earlier copy (a requeued job copies again), never following links."""
    if os.path.islink(target) or os.path.isfile(target):
        os.unlink(target)
    elif os.path.isdir(target):
        shutil.rmtree(target)


def copy_one(working_dir: str, artifact: str, artifacts_dir: str) -> bool:
    """Copy one artifact; False if it does not exist. Raises ArtifactRefused."""
    what = f"artifact {artifact!r}:"
    source = confine(working_dir, artifact, "artifact", error=ArtifactRefused)
    if not os.path.lexists(source):
        return False
    os.makedirs(artifacts_dir, exist_ok=True)
    relative = os.path.normpath(artifact)
    target = confine(artifacts_dir, relative, "artifact destination", error=ArtifactRefused)
    mode = os.stat(source).st_mode if os.path.exists(source) else 0
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ArtifactRefused(f"{what} not a regular file or directory (a dangling link, a "
                              "pipe or a device)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # makedirs may have met a link planted meanwhile: check the destination once more.
    target = confine(artifacts_dir, relative, "artifact destination", error=ArtifactRefused)
    _clear(target)
    try:
        if stat.S_ISDIR(mode):
            shutil.copytree(source, target, symlinks=True, ignore=_links_leaving(source))
        else:
            shutil.copyfile(source, target, follow_symlinks=True)
            shutil.copystat(source, target)
    except (shutil.Error, OSError) as error:
        problem = str(error)
        if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) \
                and error.args[0] and len(error.args[0][0]) == 3:
            src, _, why = error.args[0][0]
            problem = f"{src}: {why}"
        raise ArtifactRefused(f"{what} not copied completely: {' '.join(problem.split())}") \
            from None
    return True


def copy_artifacts(working_dir: str, artifacts: list[str], run_dir: str) -> Copied:
    """Copy every artifact into `run_dir/artifacts/`; record refusals in `run_dir`."""
    result = Copied()
    artifacts_dir = os.path.join(run_dir, "artifacts")
    refused_path = os.path.join(run_dir, REFUSED_FILE)
    if os.path.lexists(refused_path):  # from an earlier attempt of a requeued job
        os.unlink(refused_path)
    for artifact in artifacts:
        try:
            found = copy_one(working_dir, artifact, artifacts_dir)
        except ArtifactRefused as error:
            result.refused.append(str(error))
            logger.warning("%s; not copied", error)
            continue
        if found:
            result.copied.append(artifact)
        else:
            result.missing.append(artifact)
            logger.warning("artifact %s not found in %s", artifact, working_dir)
    if result.refused:
        with open(refused_path, "w") as f:
            f.write("".join(line + "\n" for line in result.refused))
    return result


def refused_error(run_dir: str) -> ArtifactRefused | None:
    """The error to end the launch with, if the copy refused artifacts (read from run_dir)."""
    try:
        with open(os.path.join(run_dir, REFUSED_FILE)) as f:
            refused = [line for line in f.read().splitlines() if line]
    except OSError:
        return None
    if not refused:
        return None
    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
    return ArtifactRefused(f"{refused[0]}; not copied{more}; see {run_dir}/{REFUSED_FILE}")


def main(argv: list[str] | None = None) -> None:
    """`python -m tml.launch.artifacts WORKING_DIR RUN_DIR ARTIFACT...` (the SLURM script)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("working_dir")
    parser.add_argument("run_dir")
    parser.add_argument("artifacts", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tml: %(message)s")
    result = copy_artifacts(args.working_dir, args.artifacts, args.run_dir)
    sys.exit(1 if result.refused else 0)


if __name__ == "__main__":
    main()
