"""One node of a workflow with readers: start the node's reader processes, then its agent.

Every backend runs, on each node, `python -c <bootstrap> TML_ROOT ARGS...` in place of the
bare torchrun agent when the workflow asks for `readers: {per_node: N}`. This starts N
readers (the workflow's file with `TML_ROLE=reader`, `tml.readers.roles.local_readers`) on
127.0.0.1 (or the run config's `readers.bind_host`), waits until each serves, then runs the
torchrun agent with `TML_READERS` (their addresses) and `TML_READER_SCOPE=node`: the node's
trainers pull from the node's readers. It stops the readers when the agent ends and exits
with the agent's code; SIGTERM/SIGINT go to the agent first.

The readers keep serving across the agent's restarts of its workers (`max_restarts`); a
restarted trainer asks for its batches from its checkpoint's position. A reader that cannot
start fails the node before its agent starts, in one line (`error: reader 0 exited ...`).
The tml package is put on `sys.path` from the command line (not PYTHONPATH), so the
readers, the agent and the workers see the environment the node was given.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile

BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
             "from tml.launch.node_readers import main; main()")


def node_command(python: str, tml_root: str | None, per_node: int, start_timeout_s: float,
                 world_size: int, trainers_per_node: int, reader: list[str],
                 agent: list[str]) -> list[str]:
    """The node's argv: start `per_node` readers running `reader`, then run `agent`.
    `tml_root`: where the launching tml is (shared file system), or None where the node's
    Python imports tml itself (a container image)."""
    start = [python, "-m", "tml.launch.node_readers"] if tml_root is None else \
        [python, "-c", BOOTSTRAP, tml_root]
    return [*start, "--readers", str(per_node),
            "--start-timeout", f"{start_timeout_s:g}", "--world-size", str(world_size),
            "--trainers-per-node", str(trainers_per_node), "--reader-argc", str(len(reader)),
            "--", *reader, *agent]


def tml_root() -> str:
    """The directory holding this `tml` package."""
    import tml

    return os.path.dirname(os.path.dirname(os.path.abspath(tml.__file__)))


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    parser = argparse.ArgumentParser(prog="tml.launch.node_readers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, required=True)
    parser.add_argument("--start-timeout", type=float, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--trainers-per-node", type=int, required=True)
    parser.add_argument("--reader-argc", type=int, required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.readers < 1 or not 0 < args.reader_argc < len(rest):
        parser.error("needs --readers >= 1, a reader command and an agent command")
    return args, rest[:args.reader_argc], rest[args.reader_argc:]


def run(argv: list[str]) -> int:
    """Start the readers, run the agent, stop the readers; the agent's exit code."""
    from tml.errors import TmlError, error_line
    from tml.readers import roles

    args, reader, agent = _parse(argv)
    agent_process: subprocess.Popen | None = None

    def forward(signum: int, _frame: object) -> None:
        if agent_process is not None and agent_process.poll() is None:
            agent_process.send_signal(signum)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    with tempfile.TemporaryDirectory(prefix="tml-node-readers-") as work_dir:
        try:
            with roles.local_readers(reader, args.readers, args.world_size, dict(os.environ),
                                     work_dir, start_timeout_s=args.start_timeout,
                                     group_size=args.trainers_per_node) as addresses:
                env = {**os.environ, roles.READERS_ENV: ",".join(addresses),
                       roles.READER_SCOPE_ENV: "node"}
                agent_process = subprocess.Popen(agent, env=env)
                while True:
                    try:
                        return agent_process.wait()
                    except KeyboardInterrupt:
                        continue   # forwarded; wait for the agent to stop its workers
        except TmlError as error:
            print(f"error: {error_line(error)}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            return 130


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="tml node: %(message)s")
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
