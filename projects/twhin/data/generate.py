"""Generate the built-in TwHIN graph: users, tweets and four engagement relations.

Why: the original project's data is not public. This graph has the original config's table
sizes and relations, and a structure an embedding model can learn in minutes on a CPU:
planted communities. Each user and tweet belongs to one of `num_communities` communities;
an edge links a user to a tweet of the user's community with high probability (less for
magic_recs, a recommendation surface, than for the user's own fav/reply/retweet), otherwise
to a random tweet. Within a community tweet popularity is skewed (low ranks are chosen more
often), and every user has at least one edge when there are at least as many edges as users.
A held-out AUC well above 0.5 then shows that training learned the communities.

The output is deterministic for a given set of parameters (numpy `default_rng(seed)`), and
written atomically: the files and `_SUCCESS` (the parameters, as JSON: the marker of a
graph this generator wrote) go to a temporary sibling directory that is renamed into place.
A file lock makes concurrent callers (several ranks starting at once) generate it once; a
later call with the same parameters does nothing. Nothing is ever replaced: when OUT holds
a graph generated with other parameters, this one goes to `OUT-<key>` (a hash of the
parameters) beside it; when OUT holds anything else, the call is refused.

Where the built-in graph lives (the one `projects/twhin/config/local.yaml` trains on): in a
repository checkout `data/twhin` at its root (`make data` writes it); in an installed
package the cache directory, `$TML_CACHE_DIR/twhin/graph` (default `$XDG_CACHE_HOME/tml`,
else `~/.cache/tml`), never inside the installation. See `builtin_graph_dir`.

    python -m projects.twhin.data.generate --out data/twhin [--num_edges 1000000 ...]

writes OUT/train/part-00000.parquet ... and OUT/validation/part-00000.parquet, int64 columns
lhs (user), rel (0 fav, 1 reply, 2 retweet, 3 magic_recs), rhs (tweet), rows shuffled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import filelock
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import tml  # noqa: F401  (logging set-up)
from tml.common.atomic_directory import current_umask
from tml.common.atomic_file import write_json_atomic
from tml.common.cli import run_cli
from tml.errors import DataError

logger = logging.getLogger(__name__)

RELATIONS = ("fav", "reply", "retweet", "magic_recs")
# How often each relation occurs, and how often its edge stays inside the user's community.
_RELATION_PROBABILITIES = (0.5, 0.15, 0.2, 0.15)
_IN_COMMUNITY_PROBABILITIES = (0.9, 0.9, 0.9, 0.7)
# Popularity skew within a community: rank = floor(size * u ** _SKEW), u uniform in [0, 1).
_SKEW = 2.0
_ROW_GROUP_SIZE = 1 << 16
_SUCCESS = "_SUCCESS"
# Bump when the generated data changes for the same parameters (invalidates old graphs).
_FORMAT_VERSION = 1
# The cache directory of an installed tml (the built-in graph goes under it).
CACHE_ENV = "TML_CACHE_DIR"
# Above the top-level package: a repository checkout has pyproject.toml here, an
# installation site-packages.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
# Where local.yaml's data_root (`${CONFIG_DIR}/../../../data/twhin`) points.
CONFIG_GRAPH_DIR = os.path.join(_PACKAGE_PARENT, "data", "twhin")

DEFAULTS: dict[str, Any] = {
    # 20 edges per user: enough for a held-out AUC near 0.88 after two epochs (measured:
    # 1M edges over the original 424_241 users, about 2 per user, stays at AUC 0.51).
    "num_users": 100_000,
    "num_tweets": 20_000,
    "num_edges": 2_000_000,
    "num_communities": 20,
    "seed": 0,
    "validation_fraction": 0.02,
    "files": 4,
}


def generate_graph(out_dir: str, num_users: int = DEFAULTS["num_users"],
                   num_tweets: int = DEFAULTS["num_tweets"],
                   num_edges: int = DEFAULTS["num_edges"],
                   num_communities: int = DEFAULTS["num_communities"],
                   seed: int = DEFAULTS["seed"],
                   validation_fraction: float = DEFAULTS["validation_fraction"],
                   files: int = DEFAULTS["files"]) -> dict[str, Any]:
    """Write the graph to `out_dir` unless `out_dir/_SUCCESS` says it is already there;
    to `out_dir-<key>` when `out_dir` holds a graph with other parameters (graph_dir_for).

    Returns the parameters, the edge and file counts, `out` (the directory used) and
    `generated` (False when the graph with these parameters was already there).
    """
    params = {"num_users": int(num_users), "num_tweets": int(num_tweets),
              "num_edges": int(num_edges), "num_communities": int(num_communities),
              "seed": int(seed), "validation_fraction": float(validation_fraction),
              "files": int(files), "format_version": _FORMAT_VERSION}
    _check(params)
    base = os.path.abspath(out_dir)
    parent = os.path.dirname(base)
    os.makedirs(parent, exist_ok=True)
    with filelock.FileLock(base + ".lock"):   # for OUT and its OUT-<key> siblings
        out = graph_dir_for(base, params)
        existing = _read_success(out)
        if existing is not None and existing.get("params") == params:
            logger.info("%s already holds the graph with these parameters; nothing to do", out)
            return {**existing["params"], **existing.get("summary", {}), "generated": False,
                    "out": out}
        if out != base:
            logger.info("%s holds a graph with other parameters; writing this one to %s",
                        base, out)
        started = time.monotonic()
        lhs, rel, rhs = _edges(params)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
            summary = _write(tmp, lhs, rel, rhs, params)
            # The marker goes in before the rename: a directory without one is never ours.
            _write_json(os.path.join(tmp, _SUCCESS), {"params": params, "summary": summary})
            if os.path.isdir(out) and not os.path.islink(out):
                os.rmdir(out)     # empty (graph_dir_for refuses anything else)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("wrote %d train and %d validation edges (%d users, %d tweets, %d "
                    "communities) to %s in %.1fs", summary["num_train_edges"],
                    summary["num_validation_edges"], num_users, num_tweets, num_communities,
                    out, time.monotonic() - started)
        return {**params, **summary, "generated": True, "out": out}


def default_params() -> dict[str, Any]:
    """The parameters of the built-in graph, as `_SUCCESS` records them."""
    return {**{k: (float(v) if k == "validation_fraction" else int(v))
               for k, v in DEFAULTS.items()}, "format_version": _FORMAT_VERSION}


def params_key(params: dict[str, Any]) -> str:
    """A short name for a parameter set (the suffix of `OUT-<key>`)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def graph_dir_for(out: str, params: dict[str, Any]) -> str:
    """Where the graph with `params` is, or goes, when asked for at `out`.

    `out` itself when it is absent, an empty directory, or holds this graph; `out-<key>`
    when `out` holds a graph generated with other parameters (nothing is overwritten).
    Anything else at either place (a user's files, a graph without the generator's
    `_SUCCESS` marker) raises DataError: it is never replaced.
    """
    out = os.path.abspath(out)
    for candidate in (out, f"{out}-{params_key(params)}"):
        if not os.path.lexists(candidate):
            return candidate
        existing = _read_success(candidate)
        if existing is not None and existing.get("params") == params:
            return candidate
        if not os.path.isdir(candidate) or os.path.islink(candidate):
            raise DataError(f"{candidate} exists and is not a directory; refusing to replace "
                            "it with the generated graph")
        if existing is None:
            entries = sorted(os.listdir(candidate))
            if not entries:
                return candidate
            raise DataError(f"{candidate} holds files that the graph generator did not write "
                            f"({', '.join(entries[:5])}; no {_SUCCESS} with its parameters); "
                            "refusing to replace them: move them or choose another directory")
    raise DataError(f"{out}-{params_key(params)} holds a graph generated with other "
                    "parameters than its name says; remove it")


def cache_dir() -> str:
    """tml's cache: `$TML_CACHE_DIR`, else `$XDG_CACHE_HOME/tml`, else `~/.cache/tml`."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg if xdg and os.path.isabs(xdg)
                        else os.path.join(os.path.expanduser("~"), ".cache"), "tml")


def in_checkout() -> bool:
    """True when this module runs from a repository checkout (editable or not installed)."""
    return os.path.isfile(os.path.join(_PACKAGE_PARENT, "pyproject.toml"))


def builtin_graph_base() -> str:
    """Where the built-in graph is asked for: `data/twhin` in a checkout (as `make data`
    writes it), the cache directory in an installation (never the installation itself)."""
    if in_checkout():
        return CONFIG_GRAPH_DIR
    return os.path.join(cache_dir(), "twhin", "graph")


def builtin_graph_dir() -> str:
    """The directory of the built-in graph (absent until first use): the base, or its
    `-<key>` sibling when the base holds a graph generated with other parameters."""
    return graph_dir_for(builtin_graph_base(), default_params())


def resolve_builtin_path(data_root: str) -> str:
    """`data_root` with the built-in graph's place as local.yaml names it
    (CONFIG_GRAPH_DIR) replaced by where it really is (builtin_graph_dir); any other path
    unchanged."""
    if "://" in data_root:
        return data_root
    root = os.path.abspath(data_root)
    if root != CONFIG_GRAPH_DIR and not root.startswith(CONFIG_GRAPH_DIR + os.sep):
        return data_root
    return builtin_graph_dir() + root[len(CONFIG_GRAPH_DIR):]


def ensure_default_graph(out_dir: str | None = None) -> bool:
    """Generate the default graph into `out_dir` (default: builtin_graph_base()) if it is
    not there (see graph_dir_for); True if it generated.

    Safe to call from many processes at once: one generates, the others wait and return False.
    """
    return bool(generate_graph(out_dir or builtin_graph_base())["generated"])


def _check(params: dict[str, Any]) -> None:
    for name in ("num_users", "num_tweets", "num_edges", "num_communities", "files"):
        if params[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {params[name]}")
    if params["num_communities"] > min(params["num_users"], params["num_tweets"]):
        raise ValueError(f"num_communities ({params['num_communities']}) must not exceed "
                         f"num_users ({params['num_users']}) or num_tweets "
                         f"({params['num_tweets']})")
    if not 0.0 <= params["validation_fraction"] < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got "
                         f"{params['validation_fraction']}")


def _edges(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lhs, rel, rhs) int64, shuffled; vectorised (well under a second for 1M edges)."""
    rng = np.random.default_rng(params["seed"])
    num_users, num_tweets = params["num_users"], params["num_tweets"]
    num_edges, num_communities = params["num_edges"], params["num_communities"]
    # Balanced community sizes, random membership.
    user_community = rng.permutation(np.arange(num_users) % num_communities)
    tweet_community = rng.permutation(np.arange(num_tweets) % num_communities)
    tweets_by_community = np.argsort(tweet_community, kind="stable")
    community_size = np.bincount(tweet_community, minlength=num_communities)
    community_start = np.cumsum(community_size) - community_size

    # Every user once (when there are enough edges), the rest uniformly.
    covered = min(num_users, num_edges)
    lhs = np.concatenate([rng.permutation(num_users)[:covered],
                          rng.integers(0, num_users, num_edges - covered)])
    rel = rng.choice(len(RELATIONS), size=num_edges, p=_RELATION_PROBABILITIES)
    in_community = rng.random(num_edges) < np.asarray(_IN_COMMUNITY_PROBABILITIES)[rel]
    community = user_community[lhs]
    size = community_size[community]
    rank = np.minimum((size * rng.random(num_edges) ** _SKEW).astype(np.int64), size - 1)
    same = tweets_by_community[community_start[community] + rank]
    anywhere = rng.integers(0, num_tweets, num_edges)
    rhs = np.where(in_community, same, anywhere)

    order = rng.permutation(num_edges)
    return (lhs[order].astype(np.int64), rel[order].astype(np.int64),
            rhs[order].astype(np.int64))


def _write(directory: str, lhs: np.ndarray, rel: np.ndarray, rhs: np.ndarray,
           params: dict[str, Any]) -> dict[str, Any]:
    num_validation = int(round(len(lhs) * params["validation_fraction"]))
    num_train = len(lhs) - num_validation
    train_files = []
    os.makedirs(os.path.join(directory, "train"))
    os.makedirs(os.path.join(directory, "validation"))
    bounds = np.linspace(0, num_train, params["files"] + 1).astype(np.int64)
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = os.path.join("train", f"part-{index:05d}.parquet")
        _write_parquet(os.path.join(directory, name), lhs[start:end], rel[start:end],
                       rhs[start:end])
        train_files.append(name)
    validation_file = os.path.join("validation", "part-00000.parquet")
    _write_parquet(os.path.join(directory, validation_file), lhs[num_train:], rel[num_train:],
                   rhs[num_train:])
    return {"num_train_edges": num_train, "num_validation_edges": num_validation,
            "relations": list(RELATIONS), "train_files": train_files,
            "validation_files": [validation_file]}


def _write_parquet(path: str, lhs: np.ndarray, rel: np.ndarray, rhs: np.ndarray) -> None:
    table = pa.table({"lhs": lhs, "rel": rel, "rhs": rhs})
    pq.write_table(table, path, row_group_size=_ROW_GROUP_SIZE)


def _read_success(out: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(out, _SUCCESS)) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: str, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=2, newline=True)


# Its name as run (projects.… in a checkout, tml_projects.… when installed).
_PROG = f"python -m {__spec__.name if __spec__ else 'projects.twhin.data.generate'}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: generate the graph (see module docstring)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Generate the built-in TwHIN graph (planted communities).")
    parser.add_argument("--out", required=True, help="Output directory (e.g. data/twhin); "
                        "when it holds a graph with other parameters, OUT-<key> beside it.")
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default,
                            help=f"default: {default}")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        result = generate_graph(out, **args)
    except ValueError as error:
        parser.error(str(error))
    print(f"{'wrote' if result['generated'] else 'already there:'} {result['out']}")
    return result


if __name__ == "__main__":
    run_cli(main)
