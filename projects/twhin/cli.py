"""`twhin`: import triples, train, evaluate, export and query TwHIN embeddings.

    twhin import --triples edges.tsv --out data/mygraph
    twhin train --config data/mygraph/config.yaml --save_dir runs/mygraph [--set k=v ...]
    twhin evaluate --config data/mygraph/config.yaml --checkpoint runs/mygraph [--json]
    twhin export --config data/mygraph/config.yaml --checkpoint runs/mygraph --out emb/
    twhin neighbors --embeddings emb/ --entity user:alice [--relation follows] [--k 10]
    twhin neighbors --embeddings emb/ --entities users.txt --out answers.parquet

See docs/twhin_cli.md. User errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tml.common.cli import StrictArgumentParser, run_cli
from tml.core.config.overrides import apply_overrides  # noqa: F401  (re-exported)
from tml.errors import ConfigError


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (else argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    import tml

    parser = StrictArgumentParser(prog="twhin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"twhin (tml {tml.__version__})")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("import", help="String triples (TSV/CSV/parquet) to training data.")
    p.add_argument("--triples", required=True, help="Training triples: head, relation, tail.")
    p.add_argument("--valid", help="Validation triples (default: split from --triples).")
    p.add_argument("--test", help="Test triples (default: split from --triples).")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test fractions "
                   "of --triples when --valid and --test are not given.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split.")
    p.add_argument("--out", required=True, help="Output directory.")
    p.add_argument("--dim", type=int, default=None, help="embedding_dim in the written "
                   "config (default: chosen with the other settings, see docs/twhin_cli.md).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--vocab", default=None, metavar="PREVIOUS", help="An earlier import's "
                   "vocab/ (or its output directory): its ids keep their rows, new ids are "
                   "appended.")

    p = commands.add_parser("train", help="Train (same as projects/twhin/run.py).")
    p.add_argument("--config", required=True, help="TwHIN YAML config.")
    p.add_argument("--save_dir", required=True, help="Checkpoint directory.")
    p.add_argument("--nproc_per_node", type=int, default=None, help="Workers to start.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config value, e.g. training.num_epochs=3 (repeatable).")

    p = commands.add_parser("evaluate", help="Filtered link prediction (MRR, Hits@k).")
    p.add_argument("--config", required=True, help="TwHIN YAML config.")
    p.add_argument("--checkpoint", required=True, help="A checkpoint or a save_dir (newest).")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("--strict", action="store_true", help="Fail on edges whose entities or "
                   "relation never occur in training (default: skip and count them).")
    p.add_argument("--nproc_per_node", type=int, default=1, help="Workers sharing the edges.")
    p.add_argument("--best", action="store_true", help="With a save_dir as --checkpoint: its "
                   "best checkpoint (save_dir/best.json, kept by training.early_stopping) "
                   "instead of the newest.")
    p.add_argument("--max_edges", type=_positive_int, default=None, metavar="N",
                   help="Rank a fixed random sample of N of the split's edges (seeded by "
                   "training.seed), for graphs too large to rank every edge against every "
                   "entity (default: all).")

    p = commands.add_parser("export", help="Embeddings to parquet (id, vector).")
    p.add_argument("--config", required=True, help="TwHIN YAML config.")
    p.add_argument("--checkpoint", required=True, help="A checkpoint or a save_dir (newest).")
    p.add_argument("--out", required=True, help="Output directory.")
    p.add_argument("--force", action="store_true", help="Replace a previous export at --out "
                   "(only an export: any other non-empty directory is refused).")
    p.add_argument("--vocab", help="The importer's vocab/ directory (default: vocab/ beside "
                   "--config); without one, ids are row numbers.")
    p.add_argument("--best", action="store_true", help="With a save_dir as --checkpoint: its "
                   "best checkpoint (see evaluate --best) instead of the newest.")
    p.add_argument("--index", action="store_true", help="Also write an approximate "
                   "nearest-neighbour index (an inverted file of .npy arrays) of every "
                   "table, used by `twhin neighbors`.")

    p = commands.add_parser("neighbors", help="Best-scoring entities for an entity.")
    p.add_argument("--embeddings", required=True, help="Directory written by `twhin export`.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--entity", help="Entity id (as imported).")
    which.add_argument("--entities", metavar="FILE", help="A file of entity ids, one per "
                       "line: answers for all of them (see --out).")
    p.add_argument("--out", help="With --entities: write query, rank, id, score to this "
                   "file (.parquet, else TSV); default: TSV on standard output.")
    p.add_argument("--relation", help="Rank tails of (entity, relation, ?) by its operator.")
    p.add_argument("--table", help="The entity's table, when its id is in several.")
    p.add_argument("--k", type=int, default=10, help="How many.")
    p.add_argument("--exclude-known", metavar="IMPORT_DIR", dest="exclude_known",
                   help="With --relation: leave out the tails the entity already has in the "
                   "training edges of that relation (IMPORT_DIR: what `twhin import` wrote).")
    p.add_argument("--exact", action="store_true", help="Score every row even when the "
                   "export has an index.")
    p.add_argument("--nprobe", type=int, default=None, help="Index lists scanned per "
                   "query (default 16; higher: better recall, slower).")
    p.add_argument("--ef", type=int, default=None, help=argparse.SUPPRESS)  # see _neighbors
    return parser


def _train(args: argparse.Namespace) -> None:
    """Validate everything, then write `SAVE_DIR/twhin_config.yaml` and start the workers
    (`projects.twhin.preflight.prepare_training` says what is checked and written)."""
    from tml.trainer.launch import launch

    from .preflight import prepare_training
    from .run import train_from_yaml

    config, effective, save_dir = prepare_training(args.config, args.save_dir, args.set,
                                                   args.nproc_per_node or 1)
    # The workers import run.py under this package's name: projects.twhin in a checkout,
    # tml_projects.twhin in the wheel.
    launch(train_from_yaml, f"{__package__}.run", config.training,
           nproc_per_node=args.nproc_per_node, config_yaml_path=effective, save_dir=save_dir)


def _print_metrics(result: dict) -> None:
    def row(name: str, m: dict) -> str:
        if not m.get("count"):
            return f"{name:<24} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>10} {0:>8}"
        return (f"{name:<24} {m['mrr']:>8.4f} {m['hits_at_1']:>8.4f} {m['hits_at_3']:>8.4f} "
                f"{m['hits_at_10']:>8.4f} {m['mean_rank']:>10.1f} {m['count']:>8}")

    seen = result["num_edges"] - result["num_skipped_unseen"]
    sampled = result.get("num_evaluated", seen)
    sample = f", a random sample of {sampled} ranked" if sampled < seen else ""
    print(f"filtered link prediction on {result['split']} ({result['num_edges']} edges, "
          f"{result['num_skipped_unseen']} skipped as unseen in training{sample})")
    print(f"{'':<24} {'MRR':>8} {'Hits@1':>8} {'Hits@3':>8} {'Hits@10':>8} {'mean rank':>10} "
          f"{'ranks':>8}")
    print(row("all", result))
    for side in ("head", "tail"):
        print(row(f"  {side}", result[side]))
    popular = result.get("popularity")
    if popular:
        print(row("popularity baseline", popular))
        if popular.get("count") and result.get("count") and result["mrr"] <= popular["mrr"]:
            print(f"warning: MRR {result['mrr']:.4f} is not above the popularity baseline's "
                  f"{popular['mrr']:.4f}: these embeddings rank worse than counting")
    for name, metrics in result["per_relation"].items():
        print(row(name, metrics))
        for side in ("head", "tail"):
            print(row(f"  {side}", metrics[side]))
    auc = result.get("auc")
    print(f"AUC vs in-batch negatives: {'n/a' if auc is None else f'{auc:.4f}'}")


def _pick_best(args: argparse.Namespace) -> None:
    """`--best`: replace the save_dir in --checkpoint by its best checkpoint."""
    if args.best:
        from tml.core.early_stopping import best_checkpoint

        args.checkpoint = best_checkpoint(args.checkpoint)


def _evaluate(args: argparse.Namespace) -> dict:
    from tml.core.config import load_config_from_yaml

    from .config import TwhinConfig
    from .link_prediction import evaluate_checkpoint

    load_config_from_yaml(TwhinConfig, args.config)   # fail here, once, not in every worker
    _pick_best(args)
    config = os.path.abspath(args.config)
    if args.nproc_per_node and args.nproc_per_node > 1:
        from tml.common.run_training import launch_function

        results = launch_function(evaluate_checkpoint, args.nproc_per_node, config,
                                  args.checkpoint, args.split, args.strict, args.max_edges)
        result = results[0]
    else:
        result = evaluate_checkpoint(config, args.checkpoint, args.split, args.strict,
                                     args.max_edges)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print_metrics(result)
    return result


def _export(args: argparse.Namespace) -> dict:
    from tml.core.config import load_config_from_yaml

    from .config import TwhinConfig
    from .export import export_embeddings

    config = load_config_from_yaml(TwhinConfig, args.config)
    _pick_best(args)
    result = export_embeddings(config, args.config, args.checkpoint, args.out, args.force,
                               args.vocab, index=args.index)
    indexed = " with an index per table" if result.get("indexes") else ""
    print(f"wrote {', '.join(f'{n} ({r} rows)' for n, r in result['tables'].items())} and "
          f"relations{indexed} to {result['out']}")
    return result


def _import(args: argparse.Namespace) -> dict:
    from .importer import import_triples

    result = import_triples(args.triples, args.out, args.valid, args.test, args.split,
                            args.seed, args.dim, args.force, args.vocab)
    edges = ", ".join(f"{k} {v}" for k, v in result["edges"].items())
    tables = ", ".join(f"{k} {v}" for k, v in result["tables"].items())
    print(f"imported {edges} edges; tables: {tables}; {result['relations']} relation(s)\n"
          f"training settings: {result['defaults']}\n"
          f"config: {os.path.join(result['out'], 'config.yaml')}")
    return result


def _neighbors(args: argparse.Namespace) -> Any:
    """One entity: an aligned table; --entities: a TSV or parquet file of every answer.

    Imports numpy and pyarrow only: no torch."""
    from .neighbors import (
        Embeddings,
        KnownEdges,
        NeighborsError,
        format_table,
        read_entities,
        write_results,
    )

    if args.out and not args.entities:
        raise NeighborsError("--out is for --entities (one entity prints a table)")
    if args.ef is not None:   # the option of the earlier HNSW index
        raise NeighborsError("--ef was the HNSW index's search width; the index is now an "
                             "inverted file: use --nprobe N (lists scanned, default 16)")
    if args.nprobe is not None and args.nprobe < 1:
        raise NeighborsError(f"--nprobe must be >= 1, got {args.nprobe}")
    embeddings = Embeddings.load(args.embeddings, nprobe=args.nprobe)
    known = KnownEdges(args.exclude_known, embeddings) if args.exclude_known else None
    if args.entity is not None:
        rows = embeddings.neighbors(args.entity, args.relation, args.k, args.table, known,
                                    args.exact)
        print(format_table(rows))
        return rows
    table = embeddings.neighbors_batch(read_entities(args.entities), args.relation, args.k,
                                       args.table, known, args.exact)
    if args.out:
        write_results(table, args.out)
        print(f"wrote {table.num_rows} rows to {args.out}")
    else:
        sys.stdout.write("query\trank\tid\tscore\n")
        for q, r, i, s in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            sys.stdout.write(f"{q}\t{r}\t{i}\t{s:.6g}\n")
    return table


def dispatch(argv: list[str] | None = None) -> Any:
    """Parse `argv` and run the subcommand; returns its result (for tests)."""
    from tml.common.cli import split_dotted_overrides

    argv, dotted = split_dotted_overrides(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if dotted and args.command != "train":
        raise ConfigError(f"twhin {args.command}: --{dotted[0].split('=', 1)[0]}: config "
                          "overrides are for `twhin train` only")
    if dotted:
        args.set += dotted
    if args.command in ("train", "evaluate", "export"):
        from tml.common.stack import require_torchrec

        require_torchrec(f"twhin {args.command}")
    handlers = {"import": _import, "train": _train, "evaluate": _evaluate,
                "export": _export, "neighbors": _neighbors}
    return handlers[args.command](args)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    import tml  # noqa: F401  (logging set-up before torchrec is imported)

    run_cli(lambda: dispatch(argv if argv is not None else sys.argv[1:]))
