#!/usr/bin/env python
"""Generate "Moving Fashion-MNIST": short clips of one real Fashion-MNIST item moving on a larger canvas, written as
real mp4 files (H.264, PyAV), class = the item's label. A video benchmark that runs offline (no public video set is
reachable here).

    python benchmarks/make_moving_fashion_mnist.py --output_dir data/moving-fashion-mnist \
        --train_per_class 100 --test_per_class 20

Layout: OUTPUT/{train,test}/CLASS/NNNN.mp4 (the folder `--train_dir` of `training/pretrain.py --modality video`,
`training/evaluate.py --modality video` and `training/finetune.py` reads). Train clips use items of the Fashion-MNIST
training set, test clips items of its test set, so no item appears in both. Each clip: `--num_frames` frames at
`--frame_rate` fps on a black `--canvas` x `--canvas` canvas; the 28 px item starts at a random position and moves
at a random speed of `--min_speed`..`--max_speed` pixels per frame, its direction turning by a random angle of up to
`--max_turn` degrees every frame (a random walk, so two clips of one video do not share one motion: the item is what
they share), bouncing off the borders. Two clips of one video share the item and nothing else
the network could use as a shortcut: no per-video brightness (`--min_brightness` adds one), and over `--num_frames`
= 32 frames (4 s) the item wanders across the canvas. Everything is drawn from `--seed`.

Needs the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`) and PyAV.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sce_hf.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, read_idx  # noqa: E402
from sce_hf.video import write_video  # noqa: E402


def class_folder(label: int) -> str:
    """A file-system-safe folder name for a Fashion-MNIST class ("T-shirt/top" -> "0_T-shirt_top")."""
    return f"{label}_" + re.sub(r"[^A-Za-z0-9-]+", "_", FASHION_MNIST_LABELS[label])


def moving_clip(item: np.ndarray, rng: np.random.Generator, num_frames: int, canvas: int, min_speed: float,
                max_speed: float, max_turn: float = 45.0, brightness_range: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """`(num_frames, canvas, canvas, 3)` uint8: the 28 x 28 `item` bouncing around a black canvas."""
    size = item.shape[0]
    span = canvas - size
    position = rng.uniform(0, span, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(min_speed, max_speed)
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    brightness = rng.uniform(*brightness_range)
    frames = np.zeros((num_frames, canvas, canvas), dtype=np.float32)
    for t in range(num_frames):
        top, left = (int(round(v)) for v in position)
        frames[t, top : top + size, left : left + size] = item * brightness
        angle = np.arctan2(velocity[1], velocity[0]) + np.deg2rad(rng.uniform(-max_turn, max_turn))
        velocity = speed * np.array([np.cos(angle), np.sin(angle)])
        position = position + velocity
        for axis in range(2):  # bounce
            if position[axis] < 0 or position[axis] > span:
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], 0, span)
    return np.repeat(frames.clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def generate(output_dir: str, train_per_class: int = 100, test_per_class: int = 20, num_frames: int = 32,
             frame_rate: float = 8.0, canvas: int = 64, min_speed: float = 1.5, max_speed: float = 3.5, seed: int = 0,
             source_dir: str = FASHION_MNIST_DIR, max_turn: float = 45.0, min_brightness: float = 1.0) -> dict:
    """Write the clips; returns a summary (counts, seconds)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    counts = {}
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images = read_idx(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"))
        for label in range(len(FASHION_MNIST_LABELS)):
            folder = os.path.join(output_dir, split, class_folder(label))
            os.makedirs(folder, exist_ok=True)
            items = rng.choice(np.flatnonzero(labels == label), size=per_class, replace=False)
            for i, index in enumerate(items):
                clip = moving_clip(images[index].astype(np.float32), rng, num_frames, canvas, min_speed, max_speed, max_turn,
                                   (min_brightness, 1.0))
                write_video(os.path.join(folder, f"{i:04d}.mp4"), clip, frame_rate)
        counts[split] = per_class * len(FASHION_MNIST_LABELS)
    return {"output_dir": output_dir, **counts, "num_frames": num_frames, "frame_rate": frame_rate, "canvas": canvas,
            "max_turn": max_turn,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--test_per_class", type=int, default=20)
    parser.add_argument("--num_frames", type=int, default=32)
    parser.add_argument("--frame_rate", type=float, default=8.0)
    parser.add_argument("--canvas", type=int, default=64, help="Even side of the square canvas, > 28.")
    parser.add_argument("--min_speed", type=float, default=1.5, help="Pixels per frame.")
    parser.add_argument("--max_speed", type=float, default=3.5, help="Pixels per frame.")
    parser.add_argument("--max_turn", type=float, default=45.0, help="Largest change of direction per frame, degrees.")
    parser.add_argument("--min_brightness", type=float, default=1.0, help="Per-video brightness factor in [MIN, 1].")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source_dir", default=FASHION_MNIST_DIR, help="The Fashion-MNIST IDX files.")
    args = parser.parse_args(argv)
    if args.canvas <= 28 or args.canvas % 2:
        parser.error("--canvas must be even and larger than 28 (H.264 in yuv420p needs even sides).")
    summary = generate(args.output_dir, args.train_per_class, args.test_per_class, args.num_frames, args.frame_rate,
                       args.canvas, args.min_speed, args.max_speed, args.seed, args.source_dir, args.max_turn,
                       args.min_brightness)
    print(summary)
    return summary


if __name__ == "__main__":
    main()
