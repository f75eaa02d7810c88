#!/usr/bin/env python
"""Small-scale reproduction of the paper's central claim on Fashion-MNIST (issue 4).

Every arm trains the same encoder (the `fashion-mnist-cpu` recipe) for the same number of epochs with the same
augmentations and seeds; only the loss differs:

    SCE (coeff 0.5), coeff 1 (InfoNCE, MoCo-style), coeff 0 (relational target only), ReSSL,
    plus, at one seed, coeff 0.25 / 0.75 and target temperatures 0.05 / 0.1,

next to a randomly initialised encoder of the same architecture and raw pixels. Each trained encoder is scored
by weighted k-NN (k=20, T=0.07) and a linear probe on cached features, on the 10,000 test images.

    python benchmarks/reproduction.py --epochs 4 --seeds 0 1 2 --output_dir outputs/reproduction
    python benchmarks/reproduction.py --epochs 8 --seeds 0 --arms "SCE (coeff 0.5)" "InfoNCE (coeff 1)"  # a longer budget
    python benchmarks/reproduction.py --table outputs/reproduction/results.jsonl     # the Markdown table only

Results are appended to `output_dir/results.jsonl` (a finished arm is skipped when the script is run again, so
it resumes); the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "training", "configs", "fashion-mnist-cpu.yaml")

MAIN_ARMS = {
    "SCE (coeff 0.5)": ["--coeff", "0.5"],
    "InfoNCE (coeff 1)": ["--coeff", "1.0"],
    "relational only (coeff 0)": ["--coeff", "0.0"],
    "ReSSL": ["--loss_function", "ressl"],
}
LEGACY_EPOCHS = 4  # the first results (2026-11-29) used folders without the epoch count
SWEEP_ARMS = {
    "SCE coeff 0.25": ["--coeff", "0.25"],
    "SCE coeff 0.75": ["--coeff", "0.75"],
    "SCE tau_m 0.05": ["--coeff", "0.5", "--teacher_temperature", "0.05"],
    "SCE tau_m 0.1": ["--coeff", "0.5", "--teacher_temperature", "0.1"],
}


def run(command: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def evaluate(model_dir: str | None, baseline: bool = False) -> dict[str, float]:
    source = ["--baseline", "raw_pixels", "--output_dir", model_dir] if baseline else ["--model_name_or_path", model_dir]
    data = ["--dataset_name", "fashion_mnist", "--train_split", "train", "--eval_split", "test"]
    scores = {}
    for task in ("knn", "linear"):
        run([sys.executable, os.path.join(ROOT, "training", "evaluate.py"), task, *source, *data])
    with open(os.path.join(model_dir, "eval_results.json")) as handle:
        for result in json.load(handle):
            if result["metric"] == "top1_accuracy":
                scores[result["task"]] = result["value"]
    return scores


def train_arm(name: str, flags: list[str], seed: int, epochs: int, output_dir: str) -> dict:
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    # The epoch budget is part of the folder: a rerun with another --epochs never resumes a run of another length.
    folder = os.path.join(output_dir, f"{slug}-seed{seed}" + ("" if epochs == LEGACY_EPOCHS else f"-{epochs}ep"))
    start = time.perf_counter()
    run([sys.executable, os.path.join(ROOT, "training", "pretrain.py"), "--config", RECIPE, "--output_dir", folder,
         "--num_train_epochs", str(epochs), "--seed", str(seed), "--final_knn", "false", "--checkpointing_steps", "epoch",
         "--resume_from_checkpoint", "latest", *flags])
    train_s = time.perf_counter() - start
    return {"arm": name, "seed": seed, "epochs": epochs, "train_s": round(train_s, 1), **evaluate(folder)}


def random_init(seed: int, output_dir: str) -> dict:
    """The recipe's architecture, initialised with `seed` and never trained, exported as a model folder."""
    import importlib.util

    import torch

    sys.path.insert(0, ROOT)
    from sce_hf import SCEForPreTraining, SCEImageProcessor

    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(ROOT, "training", "pretrain.py"))
    pretrain = importlib.util.module_from_spec(spec)
    sys.modules["pretrain"] = pretrain
    spec.loader.exec_module(pretrain)
    config = pretrain.build_config(pretrain.parse_args(["--config", RECIPE, "--output_dir", "unused"]))
    torch.manual_seed(seed)
    folder = os.path.join(output_dir, f"random_init-seed{seed}")
    SCEForPreTraining(config).save_encoder(folder)
    SCEImageProcessor.from_preset("fashion-mnist").save_pretrained(folder)
    return {"arm": "random init", "seed": seed, "epochs": 0, "train_s": 0.0, **evaluate(folder)}


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per arm and epoch budget, then the paired differences against SCE."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["epochs"]), []).append(row)
    lines = ["| arm | epochs | seeds | k-NN top-1 (mean ± std) | linear top-1 (mean ± std) | train time / run |",
             "|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    for (arm, epochs), group in groups.items():
        knn = [r["knn"] for r in group]
        linear = [r["linear_probe"] for r in group]
        seconds = statistics.mean(r["train_s"] for r in group)
        lines.append(f"| {arm} | {epochs} | {len(group)} | {cell(knn)} | {cell(linear)} | {seconds / 60:.1f} min |")
    return "\n".join(lines) + "\n\n" + paired_table(groups)


def paired_table(groups: dict[tuple[str, int], list[dict]], reference: str = "SCE (coeff 0.5)") -> str:
    """SCE minus each other trained arm of the same epoch budget, seed by seed (the arms share a seed's
    initialisation and augmentations, so the paired difference removes most of the seed-to-seed spread), as
    mean ± std over the shared seeds."""
    lines = [f"| {reference} minus | epochs | shared seeds | k-NN difference | linear difference |", "|---|---|---|---|---|"]
    for (arm, epochs), group in groups.items():
        base = {r["seed"]: r for r in groups.get((reference, epochs), [])}
        pairs = [(base[r["seed"]], r) for r in group if r["seed"] in base]
        if arm == reference or not epochs or not pairs:
            continue
        cells = []
        for metric in ("knn", "linear_probe"):
            diffs = [a[metric] - b[metric] for a, b in pairs]
            spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
            cells.append(f"{statistics.mean(diffs):+.2f}{spread}")
        lines.append(f"| {arm} | {epochs} | {len(pairs)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/reproduction")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no_sweeps", action="store_true")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help=f"Only these arms (of {list(MAIN_ARMS) + list(SWEEP_ARMS)}, 'random init', 'raw pixels').")
    parser.add_argument("--table", type=str, default=None, help="Only print the table of this results.jsonl.")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as handle:
            print(table([json.loads(line) for line in handle]))
        return
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.jsonl")
    done = set()
    if os.path.exists(results_path):
        with open(results_path) as handle:
            done = {(r["arm"], r["seed"], r["epochs"]) for r in map(json.loads, handle)}

    jobs = [(name, flags, seed) for seed in args.seeds for name, flags in MAIN_ARMS.items()]
    jobs += [("random init", None, seed) for seed in args.seeds]
    jobs += [("raw pixels", None, 0)]
    if not args.no_sweeps:
        jobs += [(name, flags, args.seeds[0]) for name, flags in SWEEP_ARMS.items()]
    if args.arms:
        unknown = set(args.arms) - {name for name, _, _ in jobs}
        if unknown:
            parser.error(f"unknown arm(s) {sorted(unknown)}; choose from {sorted({name for name, _, _ in jobs})}.")
        jobs = [job for job in jobs if job[0] in args.arms]
    for name, flags, seed in jobs:
        untrained = name in ("random init", "raw pixels")
        if (name, seed, 0 if untrained else args.epochs) in done:
            continue
        if name == "random init":
            row = random_init(seed, args.output_dir)
        elif name == "raw pixels":
            folder = os.path.join(args.output_dir, "raw_pixels")
            row = {"arm": name, "seed": 0, "epochs": 0, "train_s": 0.0, **evaluate(folder, baseline=True)}
        else:
            row = train_arm(name, flags, seed, args.epochs, args.output_dir)
        print(json.dumps(row), flush=True)
        with open(results_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    with open(results_path) as handle:
        print(table([json.loads(line) for line in handle]))


if __name__ == "__main__":
    main()
