#!/usr/bin/env python
"""Throughput and model FLOP utilisation of one SCE training step (the paper's ImageNet setting by default).

Measures images/s of a full step (augmentation of 2 views on the device, 2 student forward+backward, 2 teacher
forwards, the loss, the optimizer step, EMA and enqueue) with and without torch.compile, and its MFU: FLOPs of
one step counted by torch's FlopCounterMode, times steps/s, over the accelerator's peak.

    python benchmarks/gpu_throughput.py                                  # ResNet-50, 224 px, batch 256, bf16
    python benchmarks/gpu_throughput.py --preset resnet18-small --image_size 32 --batch_size 8 --steps 2 \
        --warmup 1 --device cpu --compile no                             # a tiny CPU run (the tests do this)

Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sce_hf import SCEConfig, SCEForPreTraining  # noqa: E402
from sce_hf.augmentations import SCEAugmentation, get_recipe, make_sample_seeds  # noqa: E402
from sce_hf.optim import LARS  # noqa: E402

# Dense bf16 peak of common accelerators, in TFLOP/s (vendor datasheets).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def build(args, device):
    # The multi-GPU setting: symmetric loss, no split batch norm (SyncBatchNorm across GPUs instead).
    config = SCEConfig.from_preset(
        args.preset, queue_size=args.queue_size, symmetric=True, split_batchnorm_groups=1, shuffle_teacher_batch=False
    )
    model = SCEForPreTraining(config).to(device).to(memory_format=torch.channels_last)
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-6)
    views = get_recipe("imagenet", crop_size=args.image_size)
    return model, optimizer, SCEAugmentation(views)


def make_step(model, optimizer, augment, images, args, device, compiled):
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    counter = {"step": 0}

    def step():
        seeds = make_sample_seeds(0, counter["step"], torch.arange(images.shape[0]))
        counter["step"] += 1
        views = [v.contiguous(memory_format=torch.channels_last) for v in augment(images, seeds)]
        with autocast:
            output = forward(pixel_values=views)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.996)
        model.enqueue(output.teacher_keys)
        return output.loss

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device, compiled: bool) -> dict:
    torch.manual_seed(0)
    model, optimizer, augment = build(args, device)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    step = make_step(model, optimizer, augment, images, args, device, compiled)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as flops:
        step()
    step_flops = flops.get_total_flops()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    steps_per_s = args.steps / elapsed
    peak = peak_tflops(device, args.peak_tflops)
    achieved_tflops = step_flops * steps_per_s / 1e12
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "preset": args.preset, "image_size": args.image_size, "batch_size": args.batch_size, "dtype": args.dtype,
        "channels_last": True, "torch_compile": compiled, "steps": args.steps, "warmup_s": round(warmup_s, 2),
        "images_per_s": round(args.batch_size * steps_per_s, 1), "step_tflop": round(step_flops / 1e12, 4),
        "achieved_tflops": round(achieved_tflops, 3), "peak_tflops": peak,
        "mfu": round(achieved_tflops / peak, 4) if peak else None, "final_loss": round(loss.item(), 4),
        "torch": torch.__version__,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=256, help="Per GPU.")
    parser.add_argument("--queue_size", type=int, default=65536)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak of the device (default: known GPUs).")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for compiled in {"both": (False, True), "yes": (True,), "no": (False,)}[args.compile]:
        result = measure(args, device, compiled)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
