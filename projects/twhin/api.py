"""TwHIN from Python: `fit(triples)` does `twhin import`, `train`, `evaluate` and `export`.

    from projects.twhin import fit

    result = fit(df, **{"training.num_train_steps": 200})   # df: head, relation, tail
    result.evaluation["mrr"], result.evaluation["popularity"]["mrr"]
    result.neighbors("user:alice", "follows", k=5)

Each step is the command's own code (`importer.import_triples`, `preflight.prepare_training`
with `run.train_from_yaml` in the workers, `link_prediction.evaluate_checkpoint`,
`export.export_embeddings`), so a fitted result is what the four commands would give.

Where things go: `save_dir` (default: a fresh temporary directory, named by the result)
holds the run's checkpoints, `metrics.jsonl` and `twhin_config.yaml` as `twhin train`
writes them, plus `data/` (the import) and `embeddings/` (the export). A `save_dir` that
exists and is not empty is refused: `fit` never replaces or resumes someone's directory.

Config overrides are keyword arguments with the dotted keys of `twhin train --set`
(`tml.core.config.overrides`), passed as a dict since Python names cannot hold dots:
`fit(df, **{"training.num_train_steps": 100, "model.embeddings.tables.0.embedding_dim": 16})`.
The values are Python values (a string stays a string), applied to the imported config
before it is validated, so a bad key or value is the same one-line `ConfigError` naming
the key as in the YAML. Plain keywords (`dim`, `split`, `seed`, `nproc_per_node`, ...)
are `fit`'s own.

Workers: `nproc_per_node` workers (default 2) spawned by torch elastic
(`tml.common.run_training.run_spawned`), fresh interpreters that import
`projects.twhin.run.train_from_yaml`, so `fit` works from a notebook, a script (the
caller's script is not run again in them) or a REPL alike; gloo on CPU, one GPU each with
CUDA. Not forked: a fork copies the caller's threads' locks, and a notebook or a test
process holds threads (its kernel's, OpenMP's, gRPC's from an Arrow Flight client) whose
locks can be held at that moment. In CI on 2026-12-02 fit's forked workers hung 900 s in a pytest
process that had run other tests first (`tml.common.fork_safety`). Spawning costs each
worker its imports (~3 s here) once per `fit`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tml.errors import ConfigError, DataError

if TYPE_CHECKING:
    from .config import TwhinConfig
    from .neighbors import Embeddings

DATA_DIR = "data"
EMBEDDINGS_DIR = "embeddings"
INPUT_DIR = "input"


@dataclass
class FitResult:
    """What `fit` did: the config, the run's records, the evaluation and the embeddings."""

    config: TwhinConfig
    save_dir: str
    metrics: list[dict]
    evaluation: dict
    embeddings: Embeddings
    train: dict[int, dict] = field(default_factory=dict)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.save_dir, DATA_DIR)

    @property
    def embeddings_dir(self) -> str:
        return os.path.join(self.save_dir, EMBEDDINGS_DIR)

    def vectors(self, table: str) -> tuple[list[str], Any]:
        """(ids, (N, D) numpy array) of one table, row i for ids[i]."""
        return self.embeddings.ids(table).to_pylist(), self.embeddings.vectors(table)

    def vector(self, entity: str, table: str | None = None) -> Any:
        """One entity's (D,) vector."""
        return self.embeddings.vector(entity, table)

    def neighbors(self, entity: str, relation: str | None = None, k: int = 10,
                  table: str | None = None) -> list[tuple[str, float]]:
        """[(id, score)] best first: tails of (entity, relation, ?) by the relation's
        operator, or, without a relation, the nearest rows of the entity's own table."""
        return self.embeddings.neighbors(entity, relation, k, table)


def _dotted_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """`--set` items for `load_config_with_overrides`; each value as YAML of itself, so it
    reads back as the same Python value (`"3"` stays a string)."""
    import yaml

    items = []
    for key, value in overrides.items():
        if not isinstance(key, str) or "." not in key or "=" in key:
            raise ConfigError(f"fit(): {key!r} is neither an argument of fit() nor a dotted "
                              "config key like 'training.num_train_steps'")
        try:
            text = yaml.safe_dump(value, default_flow_style=True)
        except yaml.YAMLError:
            raise ConfigError(f"fit(): {key}: a {type(value).__name__} cannot be a config "
                              "value (use str, int, float, bool, None, lists or dicts)") from None
        items.append(f"{key}={text}")
    return items


def _triples_file(triples: Any, directory: str, name: str) -> tuple[str, str]:
    """(path the importer reads, how errors name it): a path as is; a pandas DataFrame or
    a pyarrow Table written to parquet in `directory`."""
    if isinstance(triples, (str, os.PathLike)):
        path = os.fspath(triples)
        return path, path
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(triples, pa.Table):
        table, what = triples, "Table"
    elif type(triples).__name__ == "DataFrame" and hasattr(triples, "columns"):
        try:
            table = pa.Table.from_pandas(triples, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise DataError(f"{name} (DataFrame): cannot convert to Arrow: "
                            f"{str(error).splitlines()[0]}") from None
        what = "DataFrame"
    else:
        raise DataError(f"{name}: expected a pandas DataFrame, a pyarrow Table or a path, "
                        f"got {type(triples).__name__}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.parquet")
    pq.write_table(table, path)
    return path, f"{name} ({what})"


def _fresh_save_dir(save_dir: str | None) -> str:
    if save_dir is None:
        return tempfile.mkdtemp(prefix="twhin-fit-")
    save_dir = os.path.abspath(save_dir)
    if os.path.lexists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise ConfigError(f"save_dir {save_dir} exists and is not empty: fit() never "
                          "replaces or resumes a directory; name a new one (or none: a "
                          "fresh temporary directory)")
    os.makedirs(save_dir, exist_ok=True)
    return save_dir


def fit(triples: Any, *, valid: Any = None, test: Any = None, save_dir: str | None = None,
        nproc_per_node: int = 2, dim: int = 32, split: str = "0.9,0.05,0.05", seed: int = 0,
        split_to_evaluate: str = "test", index: bool = False,
        **config_overrides: Any) -> FitResult:
    """Import, train, evaluate and export TwHIN embeddings of `triples` (module docstring).

    Args:
      triples: the training triples (head, relation, tail): a pandas DataFrame, a pyarrow
        Table (columns head, relation, tail, else the first three) or a TSV / CSV /
        parquet path, exactly what `twhin import --triples` reads.
      valid, test: validation and test triples the same way; default: split from triples.
      save_dir: where everything goes (module docstring); default a new temporary dir.
      nproc_per_node: training workers. dim, split, seed: as `twhin import`.
      split_to_evaluate: the split `result.evaluation` is measured on.
      index: also build the approximate neighbour index of each table.
      **config_overrides: dotted config keys and Python values (module docstring).
    Raises:
      DataError / ConfigError (one line naming the input, row or key) before any worker
      starts; TrainingFailedError naming the failing rank.
    """
    overrides = _dotted_overrides(config_overrides)
    if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ConfigError(f"fit(): nproc_per_node must be a positive int, got {nproc_per_node!r}")
    if split_to_evaluate not in ("train", "validation", "test"):
        raise ConfigError(f"fit(): split_to_evaluate must be train, validation or test, got "
                          f"{split_to_evaluate!r}")
    temporary = save_dir is None
    save_dir = _fresh_save_dir(save_dir)
    try:
        config, effective = _import_and_check(triples, valid, test, save_dir, split, seed, dim,
                                              overrides, nproc_per_node)
        if getattr(config, f"{split_to_evaluate}_data") is None:
            raise ConfigError(f"fit(): split_to_evaluate={split_to_evaluate!r}, but the import "
                              f"has no {split_to_evaluate} split (give test= as well as valid=, "
                              "or neither)")
    except BaseException:
        if temporary:   # nothing of use was made: leave no temporary directory behind
            shutil.rmtree(save_dir, ignore_errors=True)
        raise
    ranks = _train(config, effective, save_dir, nproc_per_node)
    evaluation = evaluate(config, save_dir, split_to_evaluate)
    embeddings = export(config, save_dir, os.path.join(save_dir, EMBEDDINGS_DIR),
                        vocab=os.path.join(save_dir, DATA_DIR, "vocab"), index=index)
    from tml.core.run_records import read_records

    return FitResult(config=config, save_dir=save_dir, metrics=read_records(save_dir),
                     evaluation=evaluation, embeddings=embeddings, train=ranks)


def _import_and_check(triples: Any, valid: Any, test: Any, save_dir: str, split: str,
                      seed: int, dim: int, overrides: list[str],
                      nproc_per_node: int) -> tuple[TwhinConfig, str]:
    """`twhin import` into save_dir/data, then `twhin train`'s checks with the overrides;
    (config, the effective config file written into save_dir)."""
    from .importer import import_triples
    from .preflight import prepare_training

    inputs = os.path.join(save_dir, INPUT_DIR)
    named, paths = {}, {}
    for name, value in (("triples", triples), ("valid", valid), ("test", test)):
        if value is not None:
            paths[name], named[name] = _triples_file(value, inputs, name)
    data = os.path.join(save_dir, DATA_DIR)
    try:
        import_triples(paths["triples"], data, paths.get("valid"), paths.get("test"), split,
                       seed, dim)
    except DataError as error:
        text = str(error)
        for name, path in paths.items():
            text = text.replace(path, named[name])
        raise DataError(text) from None
    config, effective, _ = prepare_training(os.path.join(data, "config.yaml"), save_dir,
                                            overrides, nproc_per_node)
    return config, effective


def _train(config: TwhinConfig, effective: str, save_dir: str,
           nproc_per_node: int) -> dict[int, dict]:
    """`train_from_yaml` in `nproc_per_node` spawned workers: fresh interpreters, whatever
    this process holds (see the module docstring)."""
    from tml.common.run_training import run_spawned

    from .run import train_from_yaml

    return run_spawned(train_from_yaml, nproc_per_node, config.training.max_restarts,
                       config_yaml_path=effective, save_dir=save_dir)


def evaluate(config: TwhinConfig | str, checkpoint: str, split: str = "test",
             strict: bool = False, best: bool = False, max_edges: int | None = None) -> dict:
    """`twhin evaluate` in this process: filtered MRR and Hits@k of `checkpoint` (a
    checkpoint or a save_dir: its newest, or with `best` its best) on `split`, with the
    popularity baseline under "popularity". `config`: a TwhinConfig or a YAML path.
    `max_edges`: rank a fixed random sample of that many edges (`--max_edges`)."""
    from .link_prediction import evaluate_checkpoint

    if best:
        from tml.core.early_stopping import best_checkpoint

        checkpoint = best_checkpoint(checkpoint)
    return evaluate_checkpoint(config, checkpoint, split, strict, max_edges)


def export(config: TwhinConfig | str, checkpoint: str, out: str, vocab: str | None = None,
           force: bool = False, index: bool = False, best: bool = False) -> Embeddings:
    """`twhin export` of `checkpoint` to `out`, opened as `Embeddings`. `config`: a
    TwhinConfig (then `vocab` names the importer's vocab/ for the ids) or a YAML path."""
    from .export import export_embeddings
    from .neighbors import Embeddings

    if best:
        from tml.core.early_stopping import best_checkpoint

        checkpoint = best_checkpoint(checkpoint)
    path = config if isinstance(config, str) else None
    result = export_embeddings(config, path, checkpoint, out, force, vocab, index=index)
    return Embeddings.load(result["out"])
