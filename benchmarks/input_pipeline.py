#!/usr/bin/env python
"""Does the input pipeline keep up? Images/s that the loader and the augmentation deliver, against images/s that
the model consumes, for a recipe of training/configs (default: the quickstart's, on Fashion-MNIST).

    python benchmarks/input_pipeline.py [--config training/configs/fashion-mnist-cpu.yaml] [--batches 30]

Three rates, measured one after the other in one run:
- loader: CPU workers decode the images and hand over uint8 batches (crop on the device or on the workers,
  as the recipe does);
- augmentation: the device-side views (colour, blur, solarise, flip, normalise, and the crop when on device);
- model: one training step (2 student forward+backward, 2 teacher forwards, loss, optimizer, EMA, enqueue) on
  ready views, with the recipe's mixed precision.

Prints one JSON line. On a 2-core machine the workers share the cores with the model, so the end-to-end rate is
below the slowest of the three; `loader + augmentation` time per image against the model's is the margin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sce_hf import SCEForPreTraining  # noqa: E402
from sce_hf.augmentations import SCEAugmentation, get_recipe  # noqa: E402
from sce_hf.data import EpochBatchSampler, ViewsDataset, collate_views, load_image_dataset, resolve_column  # noqa: E402


def _load_pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(ROOT, "training", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain"] = module  # its dataclasses need their module registered
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "training/configs/fashion-mnist-cpu.yaml"))
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--num_workers", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    args, extra = parser.parse_known_args(argv)

    pretrain = _load_pretrain_module()
    train_args = pretrain.parse_args(["--config", args.config, "--output_dir", "unused", *extra])
    workers = args.num_workers if args.num_workers is not None else train_args.dataloader_num_workers
    dataset = load_image_dataset(train_args.dataset_name, train_args.dataset_config_name, train_args.train_dir, train_args.train_split)
    if args.max_train_samples:
        dataset = dataset.select(range(args.max_train_samples))
    image_column = resolve_column(dataset, train_args.image_column_name, ("image", "img"), "image")
    views = get_recipe(train_args.augmentation, **({"crop_size": train_args.crop_size} if train_args.crop_size else {}))
    crop_on_device = len({v.crop_size for v in views}) == 1 and not train_args.train_dir
    batch_size = train_args.per_device_train_batch_size
    sampler = EpochBatchSampler(len(dataset), batch_size, 1, 0, seed=0, epoch=0, max_batches=args.batches + 2)
    loader = torch.utils.data.DataLoader(ViewsDataset(dataset, image_column, views, 0, crop_on_device),
                                         batch_sampler=sampler, collate_fn=collate_views, num_workers=workers)

    batches, iterator = [], iter(loader)
    batches.append(next(iterator))  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(args.batches):
        batches.append(next(iterator))
    loader_rate = args.batches * batch_size / (time.perf_counter() - start)

    augment = SCEAugmentation(views)
    inputs = [b.get("images") if b.get("images") is not None else b["views"] for b in batches]
    augment(inputs[0], batches[0]["sample_seeds"])
    start = time.perf_counter()
    ready = [augment(x, b["sample_seeds"]) for x, b in zip(inputs[1:], batches[1:])]
    augmentation_rate = args.batches * batch_size / (time.perf_counter() - start)

    model = SCEForPreTraining(pretrain.build_config(train_args))
    if train_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    precision = pretrain.default_mixed_precision(train_args)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(pixel_values):
        with autocast:
            output = model(pixel_values=pixel_values)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.99)
        model.enqueue(output.teacher_keys)

    step(ready[0])
    model_batches = min(len(ready) - 1, 15)
    start = time.perf_counter()
    for pixel_values in ready[1 : 1 + model_batches]:
        step(pixel_values)
    model_rate = model_batches * batch_size / (time.perf_counter() - start)

    result = {
        "recipe": os.path.basename(args.config), "batch_size": batch_size, "num_workers": workers,
        "crop_on_device": crop_on_device, "mixed_precision": precision, "threads": torch.get_num_threads(),
        "loader_images_per_s": round(loader_rate, 1), "augmentation_images_per_s": round(augmentation_rate, 1),
        "model_images_per_s": round(model_rate, 1),
        "pipeline_time_per_model_time": round((1 / loader_rate + 1 / augmentation_rate) / (1 / model_rate), 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
