"""Run pytest on the test files named on the command line, for Bazel `py_test` targets.

    py_test(name = "test_x", srcs = ["bazel_pytest_main.py", "tml/common/test_x.py", ...],
            main = "bazel_pytest_main.py", args = ["tests/tml/common/test_x.py"], ...)

Paths are relative to the workspace root: Bazel starts a test in its runfiles tree's copy
of the workspace. The exit code is pytest's, so Bazel sees failures; when Bazel asks for a
JUnit XML report (`XML_OUTPUT_FILE`) pytest writes it there. Extra pytest options can be
passed after the files, e.g. `bazel test //tests:test_run_training --test_arg=-k
--test_arg=round_trip`.

The tests start scripts the way a user does, outside Bazel, so the variables by which the
Bazel launcher marks its own process (the runfiles location, `BAZEL_TEST`) are removed
before pytest starts: the scripts the tests launch inherit the environment and must not
take themselves for Bazel-launched binaries. Bazel's `bazel run` of a binary is checked by
tools/bazel/test.sh.
"""

from __future__ import annotations

import os
import sys

import pytest

# Set by Bazel's Python launcher or test runner for the test process itself.
_BAZEL_LAUNCH_VARIABLES = ("BAZEL_TEST", "PYTHON_RUNFILES", "RUNFILES_DIR",
                           "RUNFILES_MANIFEST_FILE", "JAVA_RUNFILES", "RUN_UNDER_RUNFILES")


def main(argv: list[str]) -> int:
    workspace = os.getcwd()
    for name in _BAZEL_LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    args = [
        "--rootdir", workspace,
        "-p", "no:cacheprovider",  # the runfiles tree is not ours to write into
        "-ra",
    ]
    if os.path.isfile(os.path.join(workspace, "pyproject.toml")):
        args += ["-c", os.path.join(workspace, "pyproject.toml")]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    return int(pytest.main(args + argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
