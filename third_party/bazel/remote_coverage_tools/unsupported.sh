#!/usr/bin/env bash
# Stand-in for Bazel's coverage tools (see BUILD.bazel).
echo "bazel coverage is not supported in this offline set-up (no remote_coverage_tools)" >&2
exit 1
