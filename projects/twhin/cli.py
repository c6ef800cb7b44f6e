"""`twhin`: import triples, train, evaluate, export and query TwHIN embeddings.

    twhin import --triples edges.tsv --out data/mygraph
    twhin train --config data/mygraph/config.yaml --save_dir runs/mygraph [--set k=v ...]
    twhin evaluate --config data/mygraph/config.yaml --checkpoint runs/mygraph [--json]
    twhin export --config data/mygraph/config.yaml --checkpoint runs/mygraph --out emb/
    twhin neighbors --embeddings emb/ --entity user:alice [--relation follows] [--k 10]

See docs/twhin_cli.md. User errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from tml.common.cli import StrictArgumentParser, run_cli
from tml.core.config.overrides import apply_overrides  # noqa: F401  (re-exported)
from tml.errors import ConfigError


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

    p = commands.add_parser("neighbors", help="Best-scoring entities for an entity.")
    p.add_argument("--embeddings", required=True, help="Directory written by `twhin export`.")
    p.add_argument("--entity", required=True, help="Entity id (as imported).")
    p.add_argument("--relation", help="Rank tails of (entity, relation, ?) by its operator.")
    p.add_argument("--table", help="The entity's table, when its id is in several.")
    p.add_argument("--k", type=int, default=10, help="How many.")
    return parser


def _train(args: argparse.Namespace) -> None:
    """Validate everything, then write `SAVE_DIR/twhin_config.yaml` and start the workers.

    Nothing is written before the config (with --set), the data paths, the memory of a step
    and the save_dir pass (`projects.twhin.preflight`): a rejected run leaves a previous
    run's `twhin_config.yaml` as it was. The written config has every `${...}` resolved
    (`${CONFIG_DIR}` is the directory of the user's file, not of the copy) and escaped, so
    it reads back as the run used it.
    """
    from tml.core.config.config_load import escape_variables
    from tml.core.config.overrides import load_config_with_overrides
    from tml.trainer.launch import launch

    from .config import TwhinConfig
    from .preflight import preflight
    from .run import train_from_yaml

    config, data, source = load_config_with_overrides(TwhinConfig, args.config, args.set)
    save_dir = os.path.abspath(args.save_dir)
    preflight(config, source, save_dir, workers_per_node=args.nproc_per_node or 1)

    effective = os.path.join(save_dir, "twhin_config.yaml")
    tmp = f"{effective}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            yaml.safe_dump(escape_variables(data), handle, sort_keys=False)
        os.replace(tmp, effective)
    except OSError as error:
        raise ConfigError(f"cannot write {effective}: {error.strerror or error}") from None
    # Export reads the importer's vocabularies beside the config: keep them reachable.
    vocab = os.path.join(os.path.dirname(os.path.abspath(args.config)), "vocab")
    link = os.path.join(save_dir, "vocab")
    if os.path.isdir(vocab) and not os.path.lexists(link):
        os.symlink(vocab, link)
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

    print(f"filtered link prediction on {result['split']} ({result['num_edges']} edges, "
          f"{result['num_skipped_unseen']} skipped as unseen in training)")
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
                                  args.checkpoint, args.split, args.strict)
        result = results[0]
    else:
        result = evaluate_checkpoint(config, args.checkpoint, args.split, args.strict)
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
                               args.vocab)
    print(f"wrote {', '.join(f'{n} ({r} rows)' for n, r in result['tables'].items())} and "
          f"relations to {result['out']}")
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


def _neighbors(args: argparse.Namespace) -> list:
    from .neighbors import format_table, neighbors

    rows = neighbors(args.embeddings, args.entity, args.relation, args.k, args.table)
    print(format_table(rows))
    return rows


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
