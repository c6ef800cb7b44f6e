"""Link-prediction quality of `twhin import`'s config on generated graphs (issue 20).

For every graph (`projects.twhin.data.kg_generate`: shape, entities, edges, seed): generate,
`twhin import` (valid / test files given), `twhin train` with the written config as is
(row "defaults") or with `--set` overrides (candidate settings, `--candidates`), then
`twhin evaluate --json` on validation and test: filtered MRR / Hits@10 of the model and of
the popularity baseline (same protocol), and the wall-clock of the whole train command.
Every command is the CLI a user runs, in a subprocess with 1 thread.

    .venv/bin/python -m benchmarks.quality [--graphs patterns:3000:40000:1,longtail:...]
        [--candidates defaults,NAME...] [--out benchmarks/results/quality.json]

Choose settings on the validation MRR of some graphs (seeds); check them on others.

PyKEEN (`--pykeen VENV`, the virtual environment of benchmarks/kg_compare.py; skipped with a
note when it does not exist): TransE, RotatE and ComplEx with PyKEEN's pipeline defaults
(sLCWA, Adam 1e-3; batch 256) for `--pykeen-epochs` epochs, on the same train / valid / test files,
same embedding size in real numbers as tml's written config, same metric (filtered over train + valid + test, ties
at the mean, both sides), 1 thread; `train_seconds` is PyKEEN's own training-loop time.
`train_cpu_seconds`: tml's whole train command's CPU seconds (its children's rusage),
PyKEEN's training loop's (process CPU time from its first batch to its end of training).
The public graphs (Nations, UMLS, Kinships) are `--public`: their files come out of the
PyKEEN package, so they need the venv too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile

import yaml

from benchmarks import kg_compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAPHS = "patterns:3000:40000:21,longtail:10000:60000:21"   # the check graphs (docs)

# Candidate settings tried against the written config: `--set` overrides ("OPS" sets
# every relation's operator). Kept so the measurements in docs/twhin_cli.md can be redone.
OLD_OTHERWISE = {"train_data.in_batch_negatives": 10, "train_data.global_negatives": 5,
                 "model.embeddings.tables.*.optimizer.adagrad.lr": 0.5,
                 "model.translation_optimizer.sgd.lr": 0.05, "OPS": "translation",
                 "training.num_epochs": 10}
CANDIDATES: dict[str, dict] = {
    "defaults": {},
    "entity_bias": {"model.entity_bias": True},
    "no_entity_bias": {"model.entity_bias": False},
    "old": OLD_OTHERWISE,
    "old_complex": {**OLD_OTHERWISE, "OPS": "complex_diagonal"},
    "old_complex_rel_lr": {**OLD_OTHERWISE, "OPS": "complex_diagonal",
                           "model.translation_optimizer.sgd.lr": 5.0},
    "global32_complex": {"train_data.in_batch_negatives": 0,
                         "train_data.global_negatives": 32,
                         "model.embeddings.tables.*.optimizer.adagrad.lr": 0.5,
                         "model.translation_optimizer.sgd.lr": 5.0,
                         "OPS": "complex_diagonal", "training.num_epochs": 10},
    "global32_complex_lr5": {"train_data.in_batch_negatives": 0,
                             "train_data.global_negatives": 32,
                             "model.embeddings.tables.*.optimizer.adagrad.lr": 5.0,
                             "model.translation_optimizer.sgd.lr": 50.0,
                             "OPS": "complex_diagonal", "training.num_epochs": 10},
    "global32_complex_lr1": {"train_data.in_batch_negatives": 0,
                             "train_data.global_negatives": 32,
                             "model.embeddings.tables.*.optimizer.adagrad.lr": 1.0,
                             "model.translation_optimizer.sgd.lr": 10.0,
                             "OPS": "complex_diagonal", "training.num_epochs": 10},
    "mixed_complex": {"train_data.in_batch_negatives": 10,
                      "train_data.global_negatives": 32,
                      "model.embeddings.tables.*.optimizer.adagrad.lr": 0.5,
                      "model.translation_optimizer.sgd.lr": 5.0,
                      "OPS": "complex_diagonal", "training.num_epochs": 10},
}
_G32 = CANDIDATES["global32_complex"]
CANDIDATES.update({
    "g32c_e50": {**_G32, "training.num_epochs": 50},
    "g32c_lr1_e50": {**CANDIDATES["global32_complex_lr1"], "training.num_epochs": 50},
    "mixed_e50": {**CANDIDATES["mixed_complex"], "training.num_epochs": 50},
    "g128c": {**_G32, "train_data.global_negatives": 128},
    "g128c_e20": {**_G32, "train_data.global_negatives": 128, "training.num_epochs": 20},
    "g32c_rel50": {**_G32, "model.translation_optimizer.sgd.lr": 50.0},
    "g32c_rel05": {**_G32, "model.translation_optimizer.sgd.lr": 0.5},
    "g32c_dim128": {**_G32, "model.embeddings.tables.*.embedding_dim": 128},
    "g32c_e5": {**_G32, "training.num_epochs": 5},
    "g32c_e20": {**_G32, "training.num_epochs": 20},
    "g32c_lr01_e50": {**_G32, "training.num_epochs": 50,
                      "model.embeddings.tables.*.optimizer.adagrad.lr": 0.1,
                      "model.translation_optimizer.sgd.lr": 1.0},
    "g32c_b256_e20": {**_G32, "training.num_epochs": 20,
                      "train_data.per_replica_batch_size": 256},
})
# Issue 20, second round: shared negatives, softmax loss, N3 (Lacroix et al. 2018).
_SM = {"train_data.in_batch_negatives": 0, "train_data.global_negatives": 0,
       "train_data.shared_negatives": 256, "model.loss": "softmax",
       "model.regularization": 0.0, "OPS": "complex_diagonal",
       "model.embeddings.tables.*.optimizer.adagrad.lr": 0.5,
       "model.translation_optimizer.sgd.lr": 5.0, "training.num_epochs": 10}
CANDIDATES.update({
    "sm256": _SM,
    "sm256_n3": {**_SM, "model.regularization": 0.01},
    "sm1024": {**_SM, "train_data.shared_negatives": 1024},
    "sm1024_n3": {**_SM, "train_data.shared_negatives": 1024, "model.regularization": 0.01},
    "bce256": {**_SM, "model.loss": "bce"},
    "sm256_lr01": {**_SM, "model.embeddings.tables.*.optimizer.adagrad.lr": 0.1,
                   "model.translation_optimizer.sgd.lr": 1.0},
    "sm256_e30": {**_SM, "training.num_epochs": 30},
    "sm256_dim64": {**_SM, "model.embeddings.tables.*.embedding_dim": 64},
    "sm256_ib": {**_SM, "train_data.in_batch_negatives": 64},
})
# Third round: the written config (now dim 128 for these graphs) with one setting changed
# (`benchmarks.quality_sweep` takes the same keys as JSON; docs/twhin_cli.md).
_DIM = "model.embeddings.tables.*.embedding_dim"
CANDIDATES.update({
    "dim32": {_DIM: 32}, "dim64": {_DIM: 64}, "dim256": {_DIM: 256},
    "reciprocal": {"model.reciprocal": True},
    "n3_003": {"model.regularization": 0.003}, "n3_03": {"model.regularization": 0.03},
    "e80": {"training.num_epochs": 80},
})
# Fourth round: with early stopping on the validation MRR (the written config since then).
_TLR = "model.embeddings.tables.*.optimizer.adagrad.lr"
CANDIDATES.update({
    "neg1024": {"train_data.shared_negatives": 1024},
    "neg512": {"train_data.shared_negatives": 512},
    "tlr2": {_TLR: 2.0},
    "tlr05": {_TLR: 0.5},
    "neg1024_dim256": {"train_data.shared_negatives": 1024, _DIM: 256},
    "no_es": {"training.early_stopping": "null"},     # the written epochs, no stopping
})
# Thirteenth round: the many-relation branch's per-edge global negatives (each edge looks up
# its own 2 x 32 rows) against negatives shared by the batch (2 x S rows a step).
CANDIDATES.update({
    "shared32": {"train_data.global_negatives": 0, "train_data.shared_negatives": 32},
    "shared128": {"train_data.global_negatives": 0, "train_data.shared_negatives": 128},
})
# Sixth round: early stopping's patience (evaluations without a gain) on sparse graphs.
CANDIDATES.update({"patience3": {"training.early_stopping.patience": 3}})
# Tenth round: a lower table lr for dim 256 (1 x sqrt(32 / 256), the dim lr 1 was chosen at):
# a faster start on large long-tail graphs, overtaken by 1 later (docs/twhin_cli.md).
CANDIDATES.update({"tlr035": {_TLR: 0.35}})


def run(cmd: list[str], log: str) -> tuple[str, float]:
    """kg_compare's runner with one thread per process (timings comparable across rows)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    return kg_compare.run(cmd, log, env=env)


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (and theirs).

    Wall-clock ratios of a pair run one after the other move with the machine's load
    (UMLS: PyKEEN's loop took 121 s in one run and 24 s in another); the CPU seconds of a
    one-thread process move much less, so the pairs report both.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PYKEEN_MODELS = ("TransE", "RotatE", "ComplEx")
# Other PyKEEN settings by name (`--pykeen-models`): PyKEEN's model and pipeline() kwargs.
# ComplEx-lcwa: 1-N scoring of every tail with Adam 5e-2 (benchmarks/kg_compare.py's best
# setting on Kinships), since ComplEx with the pipeline defaults (sLCWA, 1 negative, Adam
# 1e-3) stayed at random ranks on the generated graphs.
PYKEEN_SETTINGS: dict[str, tuple[str, dict]] = {
    "ComplEx-lcwa": ("ComplEx", {"training_loop": "lcwa", "optimizer_kwargs": {"lr": 0.05}}),
}


def pykeen_rows(venv_python: str, spec: str, paths: dict[str, str], dim: int, epochs: int,
                folder: str, models: tuple[str, ...] = PYKEEN_MODELS) -> list[dict]:
    """PyKEEN's pipeline on the same split files; one row per model (see module doc)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    for name in models:
        model, kwargs = PYKEEN_SETTINGS.get(name, (name, {}))
        # RotatE's and ComplEx's embedding_dim counts complex numbers: dim/2 hold dim reals.
        model_dim = dim // 2 if model in ("ComplEx", "RotatE") else dim
        # batch 256: on CPU PyKEEN otherwise picks 32 (ComplEx: 895 s for 100 epochs on the
        # 3000-entity graph).
        job = {"paths": paths, "model": model, "dim": model_dim, "epochs": epochs, "seed": 0,
               "kwargs": kwargs, "training_kwargs": {"batch_size": 256}}
        out, _ = kg_compare.run([venv_python, "-c", kg_compare.PYKEEN_SCRIPT, json.dumps(job)],
                                os.path.join(folder + f"_pykeen_{name}.log"), env)
        model = name
        m = json.loads(out.split("RESULT ", 1)[1])
        rows.append({"graph": spec, "candidate": f"pykeen {model}", "seed": 0,
                     "mrr": m["mrr"], "hits_at_10": m["hits_at_10"], "pykeen_kwargs": kwargs,
                     "train_seconds": round(m["train_seconds"], 1),
                     "train_cpu_seconds": round(m.get("train_cpu_seconds", 0.0), 1),
                     "epochs": epochs})
        print(f"{spec} pykeen {model}: test MRR {m['mrr']:.3f}, H@10 {m['hits_at_10']:.3f}, "
              f"train {m['train_seconds']:.0f} s, {m.get('train_cpu_seconds', 0):.0f} CPU s",
              flush=True)
    return rows


def _sets(config: dict, overrides: dict) -> list[str]:
    sets = {}
    for key, value in overrides.items():
        if key == "OPS":
            for i in range(len(config["model"]["relations"])):
                sets[f"model.relations.{i}.operator"] = value
        elif ".*." in key:
            for i in range(len(config["model"]["embeddings"]["tables"])):
                sets[key.replace(".*.", f".{i}.")] = value
        else:
            sets[key] = value
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def graph_files(spec: str, work: str, venv_python: str | None) -> dict[str, str] | None:
    """train / valid / test triples files of `spec`: generated (shape:entities:edges:seed)
    or a public graph out of the PyKEEN package (nations, umls, kinships; None without it)."""
    folder = os.path.join(work, spec.replace(":", "_"))
    if spec in kg_compare.DATASETS:
        if venv_python is None:
            return None
        os.makedirs(folder, exist_ok=True)
        return kg_compare.extract_dataset(venv_python, spec, folder)
    shape, entities, edges, graph_seed = spec.split(":")
    raw = os.path.join(folder, "raw")
    run([sys.executable, "-m", "projects.twhin.data.kg_generate", "--shape", shape,
         "--entities", entities, "--edges", edges, "--seed", graph_seed, "--out", raw],
        os.path.join(folder + "_gen.log"))
    return {split: os.path.join(raw, f"{split}.tsv") for split in ("train", "valid", "test")}


def sample_test_split(paths: dict[str, str], n: int, seed: int = 0) -> dict[str, str]:
    """`paths` with "test" replaced by a seeded sample of `n` of its lines (file order kept),
    written beside it as test_sample<n>.tsv; unchanged when the file has at most `n` lines.

    Why: on a ~1e5-entity graph PyKEEN's filtered evaluation of the whole test split (32k
    edges against 86k candidates a side) did not end in an hour on one thread. Both tml
    (`twhin import --test`) and PyKEEN then rank the same sampled edges, and both filter
    with train + valid + the sample: the same protocol on both sides.
    """
    with open(paths["test"]) as f:
        lines = f.readlines()
    if len(lines) <= n:
        return paths
    keep = sorted(random.Random(seed).sample(range(len(lines)), n))
    out = os.path.join(os.path.dirname(paths["test"]), f"test_sample{n}.tsv")
    with open(out + ".tmp", "w") as f:
        f.writelines(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in keep)
    os.replace(out + ".tmp", out)
    return {**paths, "test": out}


def one_graph(spec: str, candidates: list[str], work: str, seed: int = 0,
              paths: dict[str, str] | None = None) -> list[dict]:
    twhin = [sys.executable, "-m", "projects.twhin"]
    folder = os.path.join(work, spec.replace(":", "_"))
    if paths is None:
        paths = graph_files(spec, work, None)
        assert paths is not None
    data = os.path.join(folder, "data")
    run(twhin + ["import", "--triples", paths["train"], "--valid", paths["valid"],
                 "--test", paths["test"], "--out", data, "--force"],
        os.path.join(folder + "_import.log"))
    config_path = os.path.join(data, "config.yaml")
    with open(config_path) as f:
        config = yaml.safe_load(f)
    with open(config_path) as f:
        reason = f.readlines()[1].strip()
    rows = []
    for name in candidates:
        save = os.path.join(folder, f"run_{name}_s{seed}")
        flags = _sets(config, CANDIDATES[name]) + ["--set", f"training.seed={seed}"]
        cpu = children_cpu_seconds()
        _, train_s = run(twhin + ["train", "--config", config_path, "--save_dir", save,
                                  "--nproc_per_node", "1"] + flags, save + "_train.log")
        cpu = children_cpu_seconds() - cpu
        result = {}
        # With early stopping (a validation split): its best checkpoint, as the written
        # config's comment tells a user (`--best`).
        best = ["--best"] if os.path.exists(os.path.join(save, "best.json")) else []
        for split in ("validation", "test"):
            out, _ = run(twhin + ["evaluate", "--config",
                                  os.path.join(save, "twhin_config.yaml"), "--checkpoint",
                                  save, "--split", split, "--json"] + best,
                         save + f"_{split}.log")
            result[split] = json.loads(out)
        test, valid = result["test"], result["validation"]
        rows.append({"graph": spec, "candidate": name, "seed": seed,
                     "valid_mrr": valid["mrr"], "mrr": test["mrr"],
                     "hits_at_10": test["hits_at_10"],
                     "popularity_mrr": test["popularity"]["mrr"],
                     "popularity_hits_at_10": test["popularity"]["hits_at_10"],
                     "train_seconds": round(train_s, 1), "train_cpu_seconds": round(cpu, 1),
                     "import_reason": reason,
                     "dim": config["model"]["embeddings"]["tables"][0]["embedding_dim"],
                     "overrides": CANDIDATES[name]})
        print(f"{spec} {name} seed {seed}: valid MRR {valid['mrr']:.3f}, test MRR "
              f"{test['mrr']:.3f}, H@10 {test['hits_at_10']:.3f} (popularity "
              f"{test['popularity']['mrr']:.3f} / {test['popularity']['hits_at_10']:.3f}), "
              f"train {train_s:.0f} s, {cpu:.0f} CPU s", flush=True)
    return rows


def written_dim(spec: str, work: str) -> int:
    """The embedding dim of the config `twhin import` wrote for `spec` (`one_graph`)."""
    path = os.path.join(work, spec.replace(":", "_"), "data", "config.yaml")
    with open(path) as f:
        return int(yaml.safe_load(f)["model"]["embeddings"]["tables"][0]["embedding_dim"])


def table(rows: list[dict]) -> str:
    lines = ["| graph | settings | valid MRR | test MRR | H@10 | popularity MRR | "
             "popularity H@10 | train s |", "|---|---|---|---|---|---|---|---|"]

    def num(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if key in row else ""

    lines += [f"| {r['graph']} | {r['candidate']} | {num(r, 'valid_mrr')} | {r['mrr']:.3f} "
              f"| {r['hits_at_10']:.3f} | {num(r, 'popularity_mrr')} "
              f"| {num(r, 'popularity_hits_at_10')} | {r['train_seconds']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", default=GRAPHS,
                   help="comma-separated shape:entities:edges:seed, or nations, umls, "
                   "kinships (these need --pykeen's venv)")
    p.add_argument("--candidates", default="defaults",
                   help=f"comma-separated, of: {', '.join(CANDIDATES)}")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--pykeen", default=os.path.join(REPO, ".venv-pykeen"),
                   help="PyKEEN virtual environment (benchmarks/kg_compare.py); PyKEEN rows "
                   "and the public graphs are skipped, with a note, when it does not exist")
    p.add_argument("--pykeen-models", default=",".join(PYKEEN_MODELS),
                   help="comma-separated PyKEEN models; empty: none")
    p.add_argument("--pykeen-epochs", type=int, default=100)
    p.add_argument("--test-sample", type=int, default=0, metavar="N",
                   help="rank a seeded sample of N test edges (both tml and PyKEEN; "
                   "for graphs whose whole test split PyKEEN cannot rank in time); 0: all")
    p.add_argument("--work", help="keep data, checkpoints and logs here")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                 "quality.json"))
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="quality_")
    os.makedirs(work, exist_ok=True)
    # --candidates "" runs PyKEEN alone (tml's written config is still imported: its dim).
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"error: --candidates: unknown {', '.join(unknown)}")
    venv_python = os.path.join(args.pykeen, "bin", "python")
    if not os.path.exists(venv_python):
        print(f"note: {venv_python} not found: no PyKEEN rows, no public graphs (create it: "
              "python3 -m venv /tmp/kgvenv && /tmp/kgvenv/bin/pip install torch==2.13.0 "
              "pykeen)", flush=True)
        venv_python = None
    models = tuple(m for m in args.pykeen_models.split(",") if m)
    rows = []
    for spec in args.graphs.split(","):
        paths = graph_files(spec, work, venv_python)
        if paths is None:
            print(f"note: {spec} skipped (needs the PyKEEN venv)", flush=True)
            continue
        if args.test_sample:
            paths = sample_test_split(paths, args.test_sample)
        graph_rows = one_graph(spec, names, work, args.seed, paths)
        rows += graph_rows
        if venv_python is not None and models:
            # PyKEEN at the dim of tml's written config (as many real numbers per entity).
            dim = graph_rows[0]["dim"] if graph_rows else written_dim(spec, work)
            rows += pykeen_rows(venv_python, spec, paths, dim, args.pykeen_epochs,
                                os.path.join(work, spec.replace(":", "_")), models)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"purpose": "tml's `twhin import` config as written against PyKEEN on the "
                              "same splits, in the same run (issue 20)",
                   "command": "python -m benchmarks.quality " + " ".join(argv or sys.argv[1:]),
                   "metric": "filtered, ties at the mean, head and tail, test split "
                             "(valid_mrr: validation split); popularity: same protocol",
                   "test_sample": args.test_sample or None,
                   "threads": 1, "rows": rows}, f, indent=1)
    print(table(rows))
    print(f"\nwritten: {args.out}; logs: {work}")
    return rows


if __name__ == "__main__":
    main()
