"""Write random Heavy Ranker data with planted signal, following a segdense schema.

    python -m projects.home.recap.data.generate --out DIR [--rows N] [--schema segdense.json]

writes `DIR/part-00000.parquet`, ... in the layout of `projects.home.recap.data.schema`.
Twitter released no data, only a random generator; random labels cannot tell learning from
chance, so here every label depends on the features and the ids:

    logit(task) = w_t . log1p-ish(continuous[:16]) + v_t . binary[:16]
                  + <user vector, author vector> * s_t + user_bias_t[user] + b_t
                  - 0.02 * position

Each user and author has a hidden vector; the TwHIN embedding features (names holding
`embedding`) carry it with noise, so a model sees the ids' effect through those features
and, with `large_embeddings`, through tables looked up by `meta.user_id` / `meta.author_id`.

Feature roles come from the names: `meta.*` int64 scalars are ids; other int64 scalars
are labels; `*discrete*`, `*cont*`, `*binary*` lists are the segdense values (discrete
column `--position_index` holds the position, 0..99); float lists with `embedding` in the
name are TwHIN vectors; anything else gets noise.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tml.common.cli import StrictArgumentParser, run_cli
from tml.errors import ConfigError

from .schema import Feature, arrow_schema, load_schema

DEFAULT_SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "config", "home_recap_2022", "segdense.json")
SIGNAL_COLUMNS = 16
LATENT_DIM = 8


def _role(feature: Feature) -> str:
    name = feature.name.lower()
    if feature.length == 1:
        if feature.dtype == "int64_list":
            return "id" if name.startswith("meta.") else "label"
        return "noise"
    if "discrete" in name and feature.dtype == "int64_list":
        return "discrete"
    if "binary" in name and feature.dtype == "int64_list":
        return "binary"
    if "cont" in name and feature.dtype == "float_list":
        return "continuous"
    if "embedding" in name and feature.dtype == "float_list":
        return "embedding"
    return "noise"


def _list_array(values: np.ndarray) -> pa.Array:
    rows, length = values.shape
    offsets = np.arange(0, (rows + 1) * length, length, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))


def generate_table(features: dict[str, Feature], rows: int, rng: np.random.Generator,
                   world: dict[str, np.ndarray], position_index: int) -> pa.Table:
    """`rows` examples; `world` holds the hidden per-id vectors and task weights."""
    users = rng.integers(0, world["user_vectors"].shape[0], rows)
    authors = rng.integers(0, world["author_vectors"].shape[0], rows)
    tweets = rng.integers(0, world["num_tweets"], rows)
    affinity = (world["user_vectors"][users] * world["author_vectors"][authors]).sum(1)
    columns: dict[str, np.ndarray] = {}
    continuous_signal = np.zeros((rows, SIGNAL_COLUMNS), np.float32)
    binary_signal = np.zeros((rows, SIGNAL_COLUMNS), np.float32)
    position = np.zeros(rows, np.int64)
    for feature in features.values():
        role = _role(feature)
        shape = (rows, feature.length)
        if role == "continuous":
            z = rng.standard_normal(shape).astype(np.float32)
            values = np.sign(z) * np.expm1(np.abs(z) * 1.5)     # heavy-tailed, like counts
            continuous_signal = z[:, :SIGNAL_COLUMNS]
        elif role == "binary":
            values = (rng.random(shape) < 0.3).astype(np.int64)
            binary_signal = values[:, :SIGNAL_COLUMNS].astype(np.float32)
        elif role == "discrete":
            values = rng.integers(0, 100, shape)
            if position_index < feature.length:
                position = values[:, position_index]
        elif role == "embedding":
            source = world["author_vectors"][authors] if "author" in feature.name \
                else world["user_vectors"][users]
            values = rng.standard_normal(shape).astype(np.float32) * 0.3
            values[:, :LATENT_DIM] += source
        elif role == "id":
            values = authors if "author" in feature.name else \
                users if "user" in feature.name else tweets
        elif role == "noise":
            values = rng.standard_normal(shape).astype(np.float32) if \
                feature.dtype == "float_list" else rng.integers(0, 100, shape)
        else:
            continue
        columns[feature.name] = values
    labels = [f for f in features.values() if _role(f) == "label"]
    for index, feature in enumerate(labels):
        w = world["task_continuous"][index % len(world["task_continuous"])]
        v = world["task_binary"][index % len(world["task_binary"])]
        n = continuous_signal.shape[1]
        logit = (continuous_signal @ w[:n] + binary_signal @ v[:binary_signal.shape[1]]
                 + affinity * world["task_affinity"][index % len(world["task_affinity"])]
                 + world["user_bias"][index % len(world["user_bias"])][users]
                 - 0.02 * position - 0.3 * (index % 3))
        columns[feature.name] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    arrays = []
    for feature in features.values():
        values = np.asarray(columns[feature.name])
        values = values.astype(np.int64 if feature.dtype == "int64_list" else np.float32)
        arrays.append(pa.array(values.reshape(-1)) if feature.length == 1
                      else _list_array(values))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(features))


def make_world(rng: np.random.Generator, num_users: int, num_authors: int,
               num_tweets: int) -> dict[str, np.ndarray]:
    """The hidden structure labels are drawn from (same seed, same world)."""
    return {
        "user_vectors": rng.standard_normal((num_users, LATENT_DIM)).astype(np.float32) * 0.6,
        "author_vectors": rng.standard_normal((num_authors, LATENT_DIM)).astype(np.float32) * 0.6,
        "num_tweets": np.int64(num_tweets),
        "task_continuous": rng.standard_normal((32, SIGNAL_COLUMNS)) * 0.5,
        "task_binary": rng.standard_normal((32, SIGNAL_COLUMNS)) * 0.5,
        "task_affinity": rng.uniform(0.5, 1.5, 32),
        "user_bias": rng.standard_normal((32, num_users)) * 0.5,
    }


def generate(out: str, rows: int, schema_path: str = DEFAULT_SCHEMA, files: int = 2,
             seed: int = 0, num_users: int = 200, num_authors: int = 100,
             num_tweets: int = 1000, position_index: int = 51) -> list[str]:
    """Write `files` parquet files holding `rows` examples in all; their paths."""
    if rows <= 0 or files <= 0 or min(num_users, num_authors, num_tweets) <= 0:
        raise ConfigError("--rows, --files, --num_users, --num_authors and --num_tweets "
                          "must be positive")
    features = load_schema(schema_path)
    rng = np.random.default_rng(seed)
    world = make_world(rng, num_users, num_authors, num_tweets)
    os.makedirs(out, exist_ok=True)
    paths = []
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for index in range(files):
        table = generate_table(features, int(bounds[index + 1] - bounds[index]), rng, world,
                               position_index)
        path = os.path.join(out, f"part-{index:05d}.parquet")
        # A name of this process's own: nodes of one machine may generate side by side.
        temporary = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, temporary, row_group_size=max(1, min(4096, table.num_rows)))
        os.replace(temporary, path)
        paths.append(path)
    return paths


# Its name as run (projects.… in a checkout, tml_projects.… when installed).
_PROG = f"python -m {__spec__.name if __spec__ else 'projects.home.recap.data.generate'}"


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(prog=_PROG,
                                  description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for the parquet files.")
    parser.add_argument("--rows", type=int, default=2048, help="Examples in all.")
    parser.add_argument("--files", type=int, default=2, help="Parquet files to write.")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA, help="segdense.json to follow.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_users", type=int, default=200)
    parser.add_argument("--num_authors", type=int, default=100)
    parser.add_argument("--num_tweets", type=int, default=1000)
    parser.add_argument("--position_index", type=int, default=51,
                        help="Column of the discrete features holding the position.")
    args: argparse.Namespace = parser.parse_args(argv)
    paths = generate(args.out, args.rows, args.schema, args.files, args.seed, args.num_users,
                     args.num_authors, args.num_tweets, args.position_index)
    print(f"wrote {args.rows} examples to {len(paths)} file(s) in {args.out}")


if __name__ == "__main__":
    run_cli(main)
