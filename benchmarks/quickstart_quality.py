#!/usr/bin/env python
"""Quickstart quality: k-NN top-1 of the `fashion-mnist-cpu` recipe next to raw pixels and a random encoder.

All three go through the same k-NN code (sce_hf.evaluation: k=20, T=0.07, L2-normalised features, votes weighted
by exp(cosine/T)), 60,000 training images as the bank and the 10,000 test images as queries.

    python benchmarks/quickstart_quality.py [--output_dir outputs/bench-quickstart] [pretrain.py flags ...]

Prints one JSON line with the wall time of the training run and the three accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sce_hf import SCEForPreTraining, SCEImageProcessor  # noqa: E402
from sce_hf.data import load_fashion_mnist  # noqa: E402
from sce_hf.evaluation import extract_features, knn_accuracy, processor_transform, raw_pixel_features  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench-quickstart")
    parser.add_argument("--config", default=os.path.join(ROOT, "training/configs/fashion-mnist-cpu.yaml"))
    parser.add_argument("--skip_baselines", action="store_true")
    args, pretrain_flags = parser.parse_known_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, os.path.join(ROOT, "training/pretrain.py"), "--config", args.config,
               "--output_dir", args.output_dir, *pretrain_flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - start
    with open(os.path.join(args.output_dir, "eval_results.json")) as handle:
        sce_top1 = [r["value"] for r in json.load(handle) if r["task"] == "knn"][-1]
    result = {"recipe": os.path.basename(args.config), "flags": pretrain_flags, "wall_time_s": round(wall, 1),
              "sce_knn_top1": sce_top1}

    if not args.skip_baselines:
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        train_labels, test_labels = torch.tensor(train["label"]), torch.tensor(test["label"])
        for center in (False, True):
            top1 = knn_accuracy(raw_pixel_features(train, center=center), train_labels,
                                raw_pixel_features(test, center=center), test_labels)
            result[f"raw_pixels{'_centred' if center else ''}_knn_top1"] = round(100 * top1, 2)
        pretrained = SCEForPreTraining.from_pretrained(os.path.join(args.output_dir, "pretraining"))
        torch.manual_seed(0)
        random_encoder = SCEForPreTraining(pretrained.config).sce  # same architecture, fresh initialisation
        transform = processor_transform(SCEImageProcessor.from_pretrained(args.output_dir))
        bank = extract_features(random_encoder, train, transform, num_workers=2)
        queries = extract_features(random_encoder, test, transform, num_workers=2)
        result["random_init_knn_top1"] = round(100 * knn_accuracy(bank, train_labels, queries, test_labels), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
