#!/usr/bin/env python
"""Fine-tune an SCE video encoder for action recognition (UCF101, HMDB51) with the authors' protocol (SCE_SPEC §5.3).

One process:
    python training/finetune.py --model_name_or_path outputs/k400-r3d18 --train_dir data/ucf101 \
        --train_split train --eval_split test --frame_rate 25 --output_dir outputs/ucf101-split1
8 GPUs (SyncBatchNorm):
    accelerate launch --multi_gpu --num_processes 8 training/finetune.py --per_device_train_batch_size 8 ...

The protocol: the whole network trains (batch norm not frozen; synchronised on multi-GPU runs), dropout 0.8 before a
linear classifier, SGD with momentum 0.9 and no weight decay, lr 0.1 x batch / 256 (0.025 at batch 64), 200 epochs,
cosine, no warm-up. Training clips: one random clip per video (8 frames over 2.56 s), shorter side scaled to a random
size in [256, 320], a random 224 crop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, flip. Test: 10
clips x 3 crops per video (shorter side 256, three 256 crops), softmax predictions averaged. The data is a folder
ROOT/SPLIT/CLASS/VIDEO (video files or folders of frames) or a dataset with a video and a label column: UCF101 and
HMDB51 have 3 official splits, one run each (`--train_dir ucf101/split1`, ...).

The output folder holds the fine-tuned `SCEForImageClassification` (it loads with `AutoModelForImageClassification`,
and with `AutoModel` as the encoder), its `SCEVideoProcessor`, and `eval_results.json` (task "finetune").
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from sce_hf import SCEForImageClassification
from sce_hf.augmentations import SCEAugmentation, ViewRecipe
from sce_hf.cli import add_config_arg, add_data_args, parse_args_with_config
from sce_hf.data import EpochBatchSampler, resolve_column
from sce_hf.hub import add_eval_result
from sce_hf.video import (
    DEFAULT_FRAME_RATE,
    VIDEO_COLUMN_FALLBACKS,
    SCEVideoProcessor,
    clip_loader,
    extract_clip_features,
    load_video_dataset,
)


logger = logging.getLogger("finetune")
LABEL_COLUMN_FALLBACKS = ("label", "labels")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune an SCE video encoder (UCF101 / HMDB51 protocol).")
    add_config_arg(parser)
    add_data_args(parser)
    parser.add_argument("--model_name_or_path", type=str, required=False, default=None, help="An SCE video encoder folder or Hub id.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow a Hub model's own code.")
    parser.add_argument("--output_dir", type=str, default=None, help="Where the fine-tuned model and eval_results.json go.")
    video = parser.add_argument_group("clips")
    video.add_argument("--video_column_name", type=str, default=None,
                       help=f"Column holding the videos (default: the first of {', '.join(VIDEO_COLUMN_FALLBACKS)}).")
    video.add_argument("--num_frames", type=int, default=8)
    video.add_argument("--clip_duration", type=float, default=2.56)
    video.add_argument("--frame_rate", type=float, default=DEFAULT_FRAME_RATE, help="Frames per second of frame folders (UCF101: 25).")
    video.add_argument("--crop_size", type=int, default=224, help="Training crop.")
    video.add_argument("--short_side_range", type=str, default="256,320", help="MIN,MAX of the random training short side.")
    video.add_argument("--test_short_side", type=int, default=256, help="Shorter side (and crop side) of the test views.")
    video.add_argument("--num_clips", type=int, default=10, help="Test clips per video.")
    video.add_argument("--num_crops", type=int, choices=[1, 3], default=3, help="Test crops per clip.")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--learning_rate", type=float, default=0.1, help="Base lr; lr = base x global batch / 256.")
    opt.add_argument("--weight_decay", type=float, default=0.0)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--dropout", type=float, default=0.8, help="Dropout before the linear classifier.")
    opt.add_argument("--per_device_train_batch_size", type=int, default=64)
    opt.add_argument("--per_device_eval_batch_size", type=int, default=32, help="Test views per forward.")
    opt.add_argument("--num_train_epochs", type=int, default=200)
    opt.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    opt.add_argument("--dataloader_num_workers", type=int, default=2)
    opt.add_argument("--seed", type=int, default=42)
    args = parse_args_with_config(parser, argv)
    if args.model_name_or_path is None or args.output_dir is None:
        parser.error("--model_name_or_path and --output_dir are required.")
    if (args.dataset_name is None) == (args.train_dir is None):
        parser.error("Give one data source: --dataset_name NAME_OR_PATH or --train_dir FOLDER.")
    try:
        low, high = (int(v) for v in args.short_side_range.split(","))
    except ValueError:
        parser.error(f"--short_side_range must be MIN,MAX, got {args.short_side_range!r}.")
    if not args.crop_size <= low <= high:
        parser.error(f"--short_side_range {low},{high} must satisfy crop_size <= MIN <= MAX.")
    args.short_side_range = (low, high)
    return args


def _split(args, split: str, limit: int | None):
    dataset = load_video_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, split, args.cache_dir)
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    set_seed(args.seed)

    # ---------------------------------------------------------------- data
    train = _split(args, args.train_split, args.max_train_samples)
    video_column = resolve_column(train, args.video_column_name, VIDEO_COLUMN_FALLBACKS, "video")
    label_column = resolve_column(train, args.label_column_name, LABEL_COLUMN_FALLBACKS, "label")
    train_labels = torch.tensor(train[label_column])
    feature = (train.features or {}).get(label_column)
    names = list(getattr(feature, "names", None) or [str(i) for i in range(int(train_labels.max()) + 1)])

    # ---------------------------------------------------------------- model and optimizer
    model = SCEForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, classifier_dropout=args.dropout, freeze_encoder=False,
        trust_remote_code=args.trust_remote_code,
    )
    if not model.config.is_video:
        raise SystemExit(f"error: {args.model_name_or_path} is an image encoder; fine-tuning on clips needs an R3D encoder.")
    try:
        processor = SCEVideoProcessor.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError):
        processor = SCEVideoProcessor()
    processor.num_frames, processor.clip_duration = args.num_frames, args.clip_duration
    processor.num_clips, processor.num_crops = args.num_clips, args.num_crops
    if accelerator.distributed_type == DistributedType.MULTI_GPU:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    batch_size, processes = args.per_device_train_batch_size, accelerator.num_processes
    global_batch = batch_size * processes
    peak_lr = args.learning_rate * global_batch / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch < 1:
        raise SystemExit(f"error: {len(train)} videos make no batch of {global_batch}: lower --per_device_train_batch_size.")
    max_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    recipe = ViewRecipe(args.crop_size, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.0,
                        solarize_p=0.0, flip_p=0.5, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    augment = SCEAugmentation([recipe])
    logger.info("Fine-tuning %s on %d videos, %d classes: %d steps of %d clips, peak lr %.4g",
                args.model_name_or_path, len(train), len(names), max_steps, global_batch, peak_lr)

    # ---------------------------------------------------------------- training
    step, epoch, num_bad = 0, 0, 0
    progress = tqdm(total=max_steps, disable=not accelerator.is_local_main_process, desc="fine-tuning")
    model.train()
    while step < max_steps:
        sampler = EpochBatchSampler(len(train), batch_size, processes, accelerator.process_index, args.seed, epoch)
        loader = clip_loader(train, video_column, recipe, sampler, num_frames=args.num_frames, clip_duration=args.clip_duration,
                             short_side_range=args.short_side_range, seed=args.seed, frame_rate=args.frame_rate,
                             num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed + epoch))
        for batch in loader:
            num_bad += batch["num_bad"]
            if batch.get("views") is None:
                continue
            (pixel_values,) = augment([batch["views"][0].to(accelerator.device)], batch["sample_seeds"])
            labels = train_labels[batch["indices"]].to(accelerator.device)
            for group in optimizer.param_groups:  # cosine from the peak, per step, no warm-up
                group["lr"] = 0.5 * peak_lr * (1 + math.cos(math.pi * step / max_steps))
            loss = model(pixel_values=pixel_values, labels=labels).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step >= max_steps:
                break
        epoch += 1
    progress.close()
    if num_bad:
        logger.warning("%d unreadable or too short training videos were skipped (their slots refilled).", num_bad)

    # ---------------------------------------------------------------- test: 10 clips x 3 crops, softmax averaged
    accelerator.wait_for_everyone()
    results: dict = {"completed_steps": step}
    if accelerator.is_main_process:
        classifier: SCEForImageClassification = accelerator.unwrap_model(model)
        classifier.eval()
        if args.eval_split:
            test = _split(args, args.eval_split, args.max_eval_samples)
            test_labels = torch.tensor(test[label_column])
            views = extract_clip_features(
                classifier.sce, test, video_column, args.num_frames, args.clip_duration, args.num_clips, args.num_crops,
                args.test_short_side, None, processor.image_mean, processor.image_std, args.frame_rate,
                args.per_device_eval_batch_size, args.dataloader_num_workers, average=False, description="test views",
            )  # (Q, V, d)
            with torch.no_grad():
                logits = classifier.classifier(views.to(classifier.classifier.weight.device)).float().cpu()
            probabilities = logits.softmax(dim=-1).mean(dim=1)  # (Q, classes)
            top5 = probabilities.topk(min(5, len(names)), dim=1).indices
            scores = {"top1": (probabilities.argmax(1) == test_labels).float().mean().item(),
                      "top5": (top5 == test_labels[:, None]).any(1).float().mean().item()}
            settings = {"train_split": args.train_split, "num_train": len(train), "num_eval": len(test), "modality": "video",
                        "steps": step, "global_batch_size": global_batch, "learning_rate": peak_lr, "dropout": args.dropout,
                        "num_frames": args.num_frames, "clip_duration": args.clip_duration, "num_clips": args.num_clips,
                        "num_crops": args.num_crops, "test_short_side": args.test_short_side, "crop_size": args.crop_size}
            os.makedirs(args.output_dir, exist_ok=True)
            for n in (1, 5):
                add_eval_result(args.output_dir, {"task": "finetune", "dataset": args.dataset_name or args.train_dir,
                                                  "split": args.eval_split, "metric": f"top{n}_accuracy",
                                                  "value": round(100 * scores[f"top{n}"], 2), "settings": settings,
                                                  "model": args.model_name_or_path})
                print(f"finetune top{n}_accuracy on {args.eval_split}: {100 * scores[f'top{n}']:.2f}%")
            results.update(scores)
        classifier.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        logger.info("Saved the fine-tuned model to %s", os.path.abspath(args.output_dir))
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
