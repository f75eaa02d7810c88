#!/usr/bin/env python
"""SCE's own cost in a training step: a full step against the sum of its network parts, timed in one run.

The parts are what any two-view momentum method pays: 2 student forward+backward (encoder, projector,
predictor) and 2 teacher forwards, plus the optimizer step. SCE's own cost is the rest: augmentation on the
device, the loss over the queue, the EMA update and the enqueue. Each is also timed alone. Timings are medians
over `--repeats` rounds that interleave the measurements, so machine noise hits all of them alike.

    python benchmarks/step_overhead.py                      # ResNet-18 (32 px stem), 32 px, batch 256, fp32
    python benchmarks/step_overhead.py --batch_size 8 --repeats 2 --width 8   # a tiny run (the tests do this)

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sce_hf import SCEConfig, SCEForPreTraining  # noqa: E402
from sce_hf.augmentations import SCEAugmentation, get_recipe, make_sample_seeds  # noqa: E402
from sce_hf.losses import sce_loss  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="Channels of the first ResNet-18 stage (64: the real one).")
    parser.add_argument("--queue_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    w = args.width
    config = SCEConfig.from_preset(
        "resnet18-small", backbone_config=dict(model_type="resnet", layer_type="basic", depths=[2, 2, 2, 2],
        hidden_sizes=[w, 2 * w, 4 * w, 8 * w], embedding_size=w), queue_size=args.queue_size,
        projector_hidden_size=8 * w, symmetric=True, split_batchnorm_groups=1, shuffle_teacher_batch=False,
    )
    model = SCEForPreTraining(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.06, momentum=0.9, weight_decay=5e-4)
    augment = SCEAugmentation(get_recipe("cifar10", crop_size=args.image_size))
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    seeds = make_sample_seeds(0, 0, torch.arange(args.batch_size))
    views = augment(images, seeds)
    q, k = model.student_embed(views[0]).detach(), model.teacher_embed(views[1])

    def full_step():
        output = model(pixel_values=augment(images, seeds))
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.99)
        model.enqueue(output.teacher_keys)

    def student_forward_backward(view):
        model.student_embed(view).sum().backward()
        model.zero_grad()

    def optimizer_step():
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad()

    parts = {
        "full_step": full_step,
        "student_fwd_bwd_x2": lambda: [student_forward_backward(v) for v in views],
        "teacher_fwd_x2": lambda: [model.teacher_embed(v) for v in views],
        "optimizer_step": optimizer_step,
        "augmentation": lambda: augment(images, seeds),
        "loss_x2": lambda: [sce_loss(q, k, model.queue) for _ in range(2)],
        "ema": lambda: model.update_teacher(0.99),
        "enqueue": lambda: model.enqueue(torch.cat([k, k])),
    }
    full_step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, fn in parts.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    network = median["student_fwd_bwd_x2"] + median["teacher_fwd_x2"]
    sce_own = median["full_step"] - network - median["optimizer_step"]
    components = median["augmentation"] + median["loss_x2"] + median["ema"] + median["enqueue"]
    result = {
        "backbone": f"resnet18-small width {w}", "image_size": args.image_size, "batch_size": args.batch_size,
        "queue_size": args.queue_size, "threads": args.threads, "repeats": args.repeats,
        **{f"{name}_s": round(value, 4) for name, value in median.items()},
        "sce_own_s": round(sce_own, 4), "sce_own_fraction_of_step": round(sce_own / median["full_step"], 4),
        "sce_components_fraction_of_step": round(components / median["full_step"], 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
