#!/usr/bin/env python
"""Pretrain an SCE encoder on any image dataset with Accelerate.

One process (CPU or one GPU):
    python training/pretrain.py --config training/configs/fashion-mnist-cpu.yaml --output_dir outputs/fmnist

8 GPUs on one machine:
    accelerate launch --multi_gpu --num_processes 8 training/pretrain.py \
        --config training/configs/imagenet1k-100ep.yaml --dataset_name ILSVRC/imagenet-1k --output_dir outputs/in1k

2 nodes x 8 GPUs (run on each node, with its --machine_rank):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank RANK \
        --main_process_ip HOST --main_process_port 29500 training/pretrain.py --config ... --output_dir ...

Video (SCE_SPEC §3.5, §5): clips of a folder of videos (CLASS/VIDEO files or frame folders) or a dataset with a video
column, R3D-18/50 trunks:
    accelerate launch --multi_gpu --num_processes 8 training/pretrain.py \
        --config training/configs/kinetics400-r3d18.yaml --train_dir /data/kinetics400 --output_dir outputs/k400-r3d18

Two CPU processes (gloo), for testing:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no training/pretrain.py ...

The output folder gets the exported encoder (loads with `AutoModel`), `pretraining/` (heads, teacher, queue),
`checkpoints/step_N/` (full training state, for `--resume_from_checkpoint`), `eval_results.json`, and
`train_log.jsonl`: one JSON object per logged step (`{"step": N, "train/loss": ..., ...}`, every `--logging_steps`
optimizer steps). A resumed run appends to it, so a step after the last checkpoint of an interrupted run can appear
twice: the later line is the one the finished run went through.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

import sce_hf
from sce_hf import SCEConfig, SCEForPreTraining, SCEImageProcessor
from sce_hf.batchnorm import convert_to_split_batchnorm
from sce_hf.augmentations import RECIPE_NAMES, SCEAugmentation, get_recipe
from sce_hf.cli import add_config_arg, add_data_args, add_hub_args, parse_args_with_config
from sce_hf.configuration_sce import PRESETS, VIDEO_PRESETS
from sce_hf.data import EpochBatchSampler, StreamViews, ViewsDataset, collate_views, load_image_dataset, resolve_column
from sce_hf.evaluation import extract_features, knn_accuracy, processor_transform
from sce_hf.video import VIDEO_COLUMN_FALLBACKS, ClipViewsDataset, SCEVideoProcessor, load_video_dataset
from sce_hf.hub import PushError, add_eval_result, export_pretrained, push_to_hub
from sce_hf.optim import OPTIMIZERS, build_optimizer, warmup_cosine_lr


logger = logging.getLogger("pretrain")
STATE_FILE = "sce_training_state.json"
TRAIN_LOG_FILE = "train_log.jsonl"
LABEL_COLUMN_FALLBACKS = ("label", "labels", "fine_label")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain an SCE encoder (Similarity Contrastive Estimation).")
    add_config_arg(parser)
    add_data_args(parser)
    add_hub_args(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=PRESETS, default="resnet50", help="Encoder and head sizes (SCE_SPEC §2.1).")
    model.add_argument("--backbone_config", type=json.loads, default=None,
                       help='JSON dict merged into the preset\'s trunk config, e.g. \'{"hidden_sizes": [16, 32, 64, 128]}\'.')
    model.add_argument("--model_name_or_path", type=str, default=None,
                       help="Start from an exported encoder or a pretraining folder instead of random weights.")
    for name, kind in [
        ("projector_hidden_size", int), ("projector_output_size", int), ("predictor_hidden_size", int),
        ("predictor_num_layers", int), ("queue_size", int), ("coeff", float), ("student_temperature", float),
        ("teacher_temperature", float), ("initial_momentum", float), ("final_momentum", float),
        ("split_batchnorm_groups", int),
    ]:
        model.add_argument(f"--{name}", type=kind, default=None, help=f"Override the preset's `{name}` (SCEConfig).")
    model.add_argument("--batchnorm_groups", type=int, default=1,
                       help="Split every batch norm (student and teacher) into N groups of the batch, so one process "
                       "computes what N processes with per-process batch norm compute (for testing and comparisons).")
    model.add_argument("--momentum_schedule", choices=["cosine", "constant"], default=None, help="Teacher momentum schedule.")
    model.add_argument("--loss_function", choices=["sce", "ressl"], default=None,
                       help="The SCE loss, or the ReSSL baseline (positive removed from both distributions).")
    for name in ("symmetric", "in_batch_keys", "exact_self_exclusion", "shuffle_teacher_batch"):
        model.add_argument(f"--{name}", type=_bool, default=None, help=f"Override the preset's `{name}` (true/false).")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--augmentation", choices=RECIPE_NAMES, default="imagenet", help="View recipe (SCE_SPEC §3).")
    aug.add_argument("--crop_size", type=int, default=None, help="Override every view's crop size.")
    aug.add_argument("--crop_min_scale", type=float, default=None, help="Override the lower bound of every view's crop scale.")
    aug.add_argument("--crop_on_device", type=_bool, default=None,
                     help="Crop on the training device (images of one size) instead of CPU workers (default: auto).")
    aug.add_argument("--processor_preset", choices=["imagenet", "cifar10", "fashion-mnist"], default="imagenet",
                     help="The evaluation preprocessing exported with the model.")

    video = parser.add_argument_group("video")
    video.add_argument("--modality", choices=["image", "video"], default="image",
                       help="Train on images, or on clips of videos (two random clips per video are the positives; "
                       "needs a video --preset, r3d18 or r3d50).")
    video.add_argument("--video_column_name", type=str, default=None,
                       help=f"Column holding the videos (default: the first of {', '.join(VIDEO_COLUMN_FALLBACKS)}).")
    video.add_argument("--num_frames", type=int, default=8, help="Frames per clip, spread uniformly over the clip.")
    video.add_argument("--clip_duration", type=float, default=2.56, help="Seconds covered by a clip.")
    video.add_argument("--temporal_difference_p", type=float, default=0.2,
                       help="Probability that a clip becomes its random temporal difference (SCE_SPEC §3.5).")
    video.add_argument("--frame_rate", type=float, default=30.0, help="Frames per second of folders of extracted frames.")
    video.add_argument("--min_video_frames", type=int, default=1,
                       help="A clip window with fewer decodable frames is a bad video (skipped and counted); shorter "
                       "videos than a clip are otherwise used whole, with frames repeated.")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="lars")
    opt.add_argument("--base_learning_rate", type=float, default=0.3, help="lr = base_lr x global batch / 256.")
    opt.add_argument("--weight_decay", type=float, default=1e-6)
    opt.add_argument("--sgd_momentum", type=float, default=0.9, help="Momentum of LARS and SGD.")
    opt.add_argument("--warmup_epochs", type=float, default=10)
    opt.add_argument("--num_warmup_steps", type=int, default=None,
                     help="Warm-up in optimizer steps; overrides --warmup_epochs. Streams need it (they have no epochs).")
    opt.add_argument("--num_train_epochs", type=int, default=100)
    opt.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    opt.add_argument("--per_device_train_batch_size", type=int, default=256)
    opt.add_argument("--gradient_accumulation_steps", type=int, default=1)
    opt.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                     help="Overrides the launcher's setting (default: the recipe's, else bf16 on CPUs that have it).")
    opt.add_argument("--channels_last", action="store_true", help="Use the channels-last memory format.")
    opt.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile.")
    opt.add_argument("--torch_compile_backend", type=str, default="inductor",
                     help="torch.compile backend with --torch_compile (inductor; aot_eager traces without code generation).")
    opt.add_argument("--dataloader_num_workers", type=int, default=2)
    opt.add_argument("--seed", type=int, default=42)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, required=False, default=None, help="Where everything is written.")
    run.add_argument("--checkpointing_steps", type=str, default=None, help="Save the training state every N steps, or 'epoch'.")
    run.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest'.")
    run.add_argument("--ddp_timeout", type=int, default=1800,
                     help="Seconds a process waits for the others (e.g. while the main one runs the k-NN); raise it "
                          "for a final k-NN over a very large training set.")
    run.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    run.add_argument("--max_bad_image_fraction", type=float, default=0.01,
                     help="Stop when more than this fraction of the images read so far could not be decoded.")
    run.add_argument("--with_tracking", action="store_true", help="Log metrics to the trackers of --report_to.")
    run.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb or all.")
    run.add_argument("--logging_steps", type=int, default=10,
                     help=f"Log the loss, learning rate and throughput every N optimizer steps (progress bar, trackers, "
                     f"and one JSON line per logged step in output_dir/{TRAIN_LOG_FILE}).")
    run.add_argument("--eval_every", type=int, default=0, help="Online k-NN top-1 every N epochs (needs --eval_split).")
    run.add_argument("--knn_k", type=int, default=20)
    run.add_argument("--knn_temperature", type=float, default=0.07)
    run.add_argument("--max_knn_bank_samples", type=int, default=10000,
                     help="Training images in the online k-NN bank (the final evaluation uses them all).")
    run.add_argument("--final_knn", type=_bool, default=True, help="k-NN top-1 on --eval_split after training.")
    args = parse_args_with_config(parser, argv)

    if args.output_dir is None:
        parser.error("--output_dir is required.")
    if args.dataset_name is None and args.train_dir is None:
        parser.error("Give a data source: --dataset_name NAME_OR_PATH or --train_dir FOLDER.")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length).")
    if args.streaming and args.num_warmup_steps is None and args.warmup_epochs > 0:
        parser.error(f"--streaming needs --num_warmup_steps: --warmup_epochs {args.warmup_epochs:g} counts epochs, and a "
                     "stream has none (e.g. 10 epochs of ImageNet-1k at a global batch of 4096 are 3,130 steps).")
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME.")
    if args.modality == "video" and args.streaming:
        parser.error("--modality video reads map-style datasets only (no --streaming).")
    if (args.modality == "video") != (args.preset in VIDEO_PRESETS) and args.model_name_or_path is None:
        parser.error(f"--modality {args.modality} needs {'a video' if args.modality == 'video' else 'an image'} "
                     f"--preset (video presets: {', '.join(VIDEO_PRESETS)}), got --preset {args.preset}.")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        parser.error(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}.")
    return args


def _bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


@dataclass
class TrainingState:
    """Everything besides model, optimizer and RNG that an exact resume needs; saved as JSON in each checkpoint."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed by each process
    num_bad_images: int = 0
    num_seen_images: int = 0
    max_train_steps: int = 0
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    # `batches_in_epoch` counts micro-batches of this many images (all processes), `gradient_accumulation_steps` of
    # them per optimizer step: a resume must keep both, not only their product (0: a checkpoint older than the check).
    micro_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    train_seconds: float = 0.0  # wall time spent training, summed over resumed runs


class NonFiniteLossError(RuntimeError):
    pass


_MODEL_FLAGS = (
    "projector_hidden_size", "projector_output_size", "predictor_hidden_size", "predictor_num_layers", "queue_size",
    "coeff", "student_temperature", "teacher_temperature", "initial_momentum", "final_momentum",
    "split_batchnorm_groups", "momentum_schedule", "symmetric", "in_batch_keys", "exact_self_exclusion",
    "shuffle_teacher_batch", "loss_function",
)


def model_overrides(args) -> dict:
    """The SCEConfig fields given on the command line or in the recipe."""
    return {name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name) is not None}


def build_config(args) -> SCEConfig:
    overrides = model_overrides(args)
    if args.backbone_config is not None:
        preset_backbone = SCEConfig.from_preset(args.preset).backbone_config.to_dict()
        overrides["backbone_config"] = {**preset_backbone, **args.backbone_config}
    if args.augmentation == "imagenet-multicrop":
        overrides.setdefault("num_global_views", 2)
    try:
        return SCEConfig.from_preset(args.preset, **overrides)
    except ValueError as error:
        raise SystemExit(f"error: invalid model settings: {error}") from None


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir/checkpoints` as (completed steps, path), oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        state = os.path.join(path, STATE_FILE)
        if name.startswith(".") or not os.path.isfile(state):
            continue
        with open(state) as handle:
            found.append((json.load(handle)["completed_steps"], path))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, args, state: TrainingState, name: str) -> str:
    """`accelerator.save_state` into a temporary folder, renamed when complete: a crash never leaves a
    checkpoint that resume would pick. Older ones beyond `--checkpoints_total_limit` are deleted."""
    root = os.path.join(args.output_dir, "checkpoints")
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as handle:
            json.dump(asdict(state), handle, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            for _, old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume_path(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(args.output_dir)
        if not found:
            logger.info("No complete checkpoint in %s/checkpoints: starting from scratch.", args.output_dir)
            return None
        return found[-1][1]
    if not os.path.isfile(os.path.join(args.resume_from_checkpoint, STATE_FILE)):
        raise SystemExit(f"error: {args.resume_from_checkpoint} is not a complete checkpoint (no {STATE_FILE}).")
    return args.resume_from_checkpoint


def hardware_description(num_processes: int) -> str:
    """What trained the model, for the model card: e.g. `8 x NVIDIA H100 80GB HBM3` or `1 x CPU (2 cores, x86_64)`."""
    import platform

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return f"{num_processes} x {name}"


def default_mixed_precision(args) -> str:
    if args.mixed_precision is not None:
        return args.mixed_precision
    if not torch.cuda.is_available():
        return "bf16" if _cpu_has_bf16() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def processor_for(args) -> SCEImageProcessor:
    processor = SCEImageProcessor.from_preset(args.processor_preset)
    if args.crop_size is not None:
        crop = args.crop_size
        shortest = crop if args.processor_preset != "imagenet" else int(round(crop / 0.875))
        processor = SCEImageProcessor.from_preset(
            args.processor_preset, size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop}
        )
    return processor


def video_processor_for(args, views) -> SCEVideoProcessor:
    """The evaluation preprocessing of a video run: shorter side crop / 0.875 (256 for 224), centre crop, and the
    normalisation the training views used."""
    crop = args.crop_size or 224
    shortest = int(round(crop / 0.875))
    mean, std = (list(v) * (3 // len(v)) for v in (views[0].mean, views[0].std))
    return SCEVideoProcessor(num_frames=args.num_frames, clip_duration=args.clip_duration, image_mean=mean, image_std=std,
                             size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop})


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=default_mixed_precision(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dynamo_backend=args.torch_compile_backend if args.torch_compile else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout)),
            # Every process already holds the same queue (all enqueue the same gathered keys) and teacher (the EMA of
            # the same student): re-sending the buffers from rank 0 before each forward would move the whole queue
            # (64 MiB for ImageNet's 65,536 x 256) per micro-batch for nothing.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # ---------------------------------------------------------------- data
    with accelerator.main_process_first():
        if args.modality == "video":
            dataset = load_video_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split, args.cache_dir)
        else:
            dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split, args.streaming, args.cache_dir)
    if args.modality == "video":
        image_column = resolve_column(dataset, args.video_column_name, VIDEO_COLUMN_FALLBACKS, "video")
    else:
        image_column = resolve_column(dataset, args.image_column_name, ("image", "img"), "image")
    if args.max_train_samples is not None:
        dataset = dataset.take(args.max_train_samples) if args.streaming else dataset.select(range(min(args.max_train_samples, len(dataset))))
    overrides = {}
    if args.crop_size is not None:
        overrides["crop_size"] = args.crop_size
    views = get_recipe(args.augmentation, **overrides)
    if args.crop_min_scale is not None:
        views = [type(v)(**{**asdict(v), "crop_scale": (args.crop_min_scale, v.crop_scale[1])}) for v in views]
    crop_on_device = args.crop_on_device if args.crop_on_device is not None else len({v.crop_size for v in views}) == 1 and not args.train_dir
    crop_on_device = crop_on_device and args.modality == "image"  # clips are cropped by the CPU workers
    memory_format = torch.channels_last_3d if args.modality == "video" else torch.channels_last
    augment = SCEAugmentation(views)

    num_processes, batch_size = accelerator.num_processes, args.per_device_train_batch_size
    global_batch = batch_size * num_processes * args.gradient_accumulation_steps
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=num_processes)
        steps_per_epoch = args.max_train_steps
    else:
        micro_batches = len(dataset) // (batch_size * num_processes)
        steps_per_epoch = micro_batches // args.gradient_accumulation_steps
        if steps_per_epoch < 1:
            raise SystemExit(
                f"error: {len(dataset)} images make no optimizer step of {global_batch} images "
                f"({batch_size} per device x {num_processes} processes x {args.gradient_accumulation_steps} accumulation)."
            )
    max_train_steps = args.max_train_steps or steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # ---------------------------------------------------------------- model and optimizer
    if args.model_name_or_path:  # the folder's architecture, with the SCE settings given on the command line
        model = SCEForPreTraining.from_pretrained(args.model_name_or_path, **model_overrides(args))
    else:
        model = SCEForPreTraining(build_config(args))
    model.train()  # from_pretrained returns a model in eval mode: batch norm would use running statistics
    if batch_size < 2:
        raise SystemExit("error: --per_device_train_batch_size must be at least 2: batch norm needs 2 images in training.")
    for flag, groups in (("--split_batchnorm_groups", model.config.split_batchnorm_groups), ("--batchnorm_groups", args.batchnorm_groups)):
        if groups > 1 and (batch_size % groups or batch_size // groups < 2):  # 2 images per group, as plain batch norm
            raise SystemExit(
                f"error: {flag} {groups} splits the per-device batch of {batch_size} images into groups of "
                f"{batch_size / groups:g}: batch norm needs at least 2 images per group. Use a "
                f"--per_device_train_batch_size that is a multiple of {groups} and at least {2 * groups}, or fewer groups."
            )
    if args.batchnorm_groups > 1:
        convert_to_split_batchnorm(model, args.batchnorm_groups)
    if accelerator.distributed_type == DistributedType.MULTI_GPU:
        if max(model.config.split_batchnorm_groups, args.batchnorm_groups) > 1:
            logger.warning("Several GPUs: SyncBatchNorm over all of them replaces the split batch norm "
                           "(--split_batchnorm_groups / --batchnorm_groups), which simulates it on one device.")
        model = model.convert_sync_batchnorm()
    elif num_processes > 1:
        logger.warning("SyncBatchNorm needs GPUs: each of the %d CPU processes keeps its own batch-norm statistics.", num_processes)
    if args.channels_last:
        model = model.to(memory_format=memory_format)
    peak_lr = args.base_learning_rate * global_batch / 256
    optimizer = build_optimizer(model, args.optimizer, peak_lr, args.weight_decay, args.sgd_momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    sce_model: SCEForPreTraining = accelerator.unwrap_model(model, keep_torch_compile=False)  # the module itself, for saving
    warmup_steps = args.num_warmup_steps if args.num_warmup_steps is not None else int(round(args.warmup_epochs * steps_per_epoch))

    # ---------------------------------------------------------------- resume
    state = TrainingState(max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch,
                          micro_batch_size=batch_size * num_processes,
                          gradient_accumulation_steps=args.gradient_accumulation_steps)
    resume_path = resolve_resume_path(args)
    if resume_path is not None:
        with open(os.path.join(resume_path, STATE_FILE)) as handle:
            saved = TrainingState(**json.load(handle))
        mismatched = [
            f"{name}: checkpoint {getattr(saved, name)}, now {getattr(state, name)}"
            for name in ("max_train_steps", "steps_per_epoch", "global_batch_size", "micro_batch_size",
                         "gradient_accumulation_steps")
            if getattr(saved, name) and getattr(saved, name) != getattr(state, name)  # 0: not recorded
        ]
        if mismatched:
            raise SystemExit(
                f"error: cannot resume from {resume_path} with a different schedule ({'; '.join(mismatched)}). "
                "Resume with the same epochs, data, per-device batch x processes and accumulation, or start a new "
                "--output_dir (another number of processes works when per-device batch x processes stays the same)."
            )
        accelerator.load_state(resume_path)
        state = saved
        state.micro_batch_size, state.gradient_accumulation_steps = batch_size * num_processes, args.gradient_accumulation_steps
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", resume_path, state.completed_steps, state.epoch, state.batches_in_epoch)

    if args.with_tracking:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers("sce_pretraining", tracked)
    logger.info("***** SCE pretraining *****")
    logger.info("  Images: %s | per device batch %d | processes %d | accumulation %d | global batch %d",
                "stream" if args.streaming else len(dataset), batch_size, num_processes, args.gradient_accumulation_steps, global_batch)
    logger.info("  Optimizer steps: %d (%d per epoch, %d epochs) | peak lr %.4g | mixed precision %s",
                max_train_steps, steps_per_epoch, num_epochs, peak_lr, accelerator.mixed_precision)

    # ---------------------------------------------------------------- training loop
    progress = tqdm(total=max_train_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process, desc="pretraining")
    pending_keys: list[torch.Tensor] = []
    window_start, window_images, last_checkpoint = time.perf_counter(), 0, resume_path
    segment_start = time.perf_counter()

    def bank_train_time() -> None:
        nonlocal segment_start
        now = time.perf_counter()
        state.train_seconds += now - segment_start
        segment_start = now

    metrics: dict = {}
    while state.completed_steps < max_train_steps:
        fresh_epoch = state.batches_in_epoch == 0
        loader = _epoch_loader(args, dataset, image_column, views, crop_on_device, state, accelerator)
        if args.streaming:
            loader = _while_every_process_has_a_batch(loader, accelerator)
        for batch in loader:
            state.batches_in_epoch += 1
            images = batch.get("images") if batch.get("images") is not None else batch["views"]
            num_bad, num_seen, num_empty = _sum_across(accelerator, batch["num_bad"], batch["num_seen"], images is None)
            state.num_bad_images += num_bad
            state.num_seen_images += num_seen
            if state.num_bad_images > args.max_bad_image_fraction * max(state.num_seen_images, 100):
                raise SystemExit(
                    f"error: {state.num_bad_images} of {state.num_seen_images} images could not be decoded, more than "
                    f"--max_bad_image_fraction {args.max_bad_image_fraction}: check the data (the log names the bad indices)."
                )
            if num_empty:  # a batch without one readable image, on any process: every process skips it together
                continue
            images = images.to(accelerator.device) if torch.is_tensor(images) else [v.to(accelerator.device) for v in images]
            pixel_values = augment(images, batch["sample_seeds"])
            if args.channels_last:
                pixel_values = [v.contiguous(memory_format=memory_format) for v in pixel_values]
            with accelerator.accumulate(model):
                output = model(pixel_values=pixel_values)
                losses = accelerator.gather(output.loss.detach().reshape(1))
                if not torch.isfinite(losses).all():
                    raise NonFiniteLossError(
                        f"The loss became {losses.tolist()} at step {state.completed_steps + 1} (epoch {state.epoch}). "
                        f"The last good checkpoint is {last_checkpoint or 'none (no checkpoint was saved)'}. Lower the "
                        "learning rate, lengthen the warm-up, or train with --mixed_precision no."
                    )
                lr = warmup_cosine_lr(state.completed_steps, max_train_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                accelerator.backward(output.loss)
                optimizer.step()
                optimizer.zero_grad()
                pending_keys.append(output.teacher_keys)
            window_images += batch["sample_seeds"].numel() * num_processes
            if not accelerator.sync_gradients:
                continue
            # One optimizer step is complete: EMA of the teacher, then the queue (after the loss used it).
            momentum = sce_model.momentum_at(state.completed_steps, max_train_steps)
            sce_model.update_teacher(momentum)
            sce_model.enqueue(torch.cat(pending_keys))
            pending_keys.clear()
            state.completed_steps += 1
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0 or state.completed_steps == max_train_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": losses.mean().item(), "train/lr": lr, "train/momentum": momentum,
                    "train/queue_fill": sce_model.queue_fill, "train/images_per_second": window_images / max(elapsed, 1e-9),
                    "train/epoch": state.epoch, "train/num_bad_images": state.num_bad_images,
                }
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{metrics['train/images_per_second']:.0f}")
                if args.with_tracking:
                    accelerator.log(metrics, step=state.completed_steps)
                if accelerator.is_main_process:
                    with open(os.path.join(args.output_dir, TRAIN_LOG_FILE), "a") as handle:
                        handle.write(json.dumps({"step": state.completed_steps, **metrics}) + "\n")
                window_start, window_images = time.perf_counter(), 0
            if args.checkpointing_steps not in (None, "epoch") and state.completed_steps % int(args.checkpointing_steps) == 0:
                bank_train_time()
                last_checkpoint = save_checkpoint(accelerator, args, state, f"step_{state.completed_steps}")
            if state.completed_steps >= max_train_steps:
                break
        else:  # the epoch ended
            if fresh_epoch and state.batches_in_epoch == 0:  # an empty stream would loop here for ever
                raise SystemExit(f"error: epoch {state.epoch} of {args.dataset_name or args.train_dir} yielded no batch: "
                                 f"the stream is empty or holds fewer than --per_device_train_batch_size {batch_size} "
                                 "rows per process. Check the data files and --train_split.")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if args.checkpointing_steps == "epoch":
                bank_train_time()
                last_checkpoint = save_checkpoint(accelerator, args, state, f"epoch_{state.epoch}")
            if args.eval_every and args.eval_split and state.epoch % args.eval_every == 0:
                top1 = run_knn(args, sce_model.sce, accelerator, max_bank=args.max_knn_bank_samples)
                if top1 is not None and args.with_tracking:
                    accelerator.log({"eval/knn_top1": top1}, step=state.completed_steps)
            continue
        break
    progress.close()

    # ---------------------------------------------------------------- export
    bank_train_time()
    accelerator.wait_for_everyone()
    results = {"completed_steps": state.completed_steps, "num_bad_images": state.num_bad_images,
               "train_seconds": round(state.train_seconds, 1)}
    if accelerator.is_main_process:
        training_args = {**{k: v for k, v in vars(args).items() if k != "hub_token"}, "global_batch_size": global_batch,
                         "peak_learning_rate": peak_lr, "max_train_steps": max_train_steps, "num_processes": num_processes,
                         "mixed_precision": accelerator.mixed_precision, "sce_hf_version": sce_hf.__version__,
                         "device": str(accelerator.device), "hardware": hardware_description(num_processes),
                         "completed_steps": state.completed_steps, "epochs_completed": state.epoch,
                         "wall_time_seconds": round(state.train_seconds, 1)}
        processor = video_processor_for(args, views) if args.modality == "video" else processor_for(args)
        export_pretrained(sce_model, processor, args.output_dir, training_args)
        logger.info("Exported the encoder to %s", os.path.abspath(args.output_dir))
    if args.final_knn and args.eval_split:
        top1 = run_knn(args, sce_model.sce, accelerator, max_bank=None)
        results["knn_top1"] = top1
    if accelerator.is_main_process and args.push_to_hub:
        try:
            url = push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                              commit_message="End of training")
            logger.info("Pushed to %s", url)
        except PushError as error:
            raise SystemExit(f"error: {error}") from None
    if args.with_tracking:
        accelerator.end_training()
    return results


def _epoch_loader(args, dataset, image_column, views, crop_on_device, state: TrainingState, accelerator):
    """This process's data loader for the current epoch, starting after the batches already consumed.

    The loader gets its own generator: by default a `DataLoader` draws its workers' base seed from the global torch
    RNG each time it starts iterating, and a resumed run starts one mid-epoch where the uninterrupted run did not,
    which would shift every later draw of the global RNG (the teacher's batch shuffle) and break an exact resume.
    """
    batch_size = args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + state.epoch)
    if args.streaming:
        # Full batches only, as the map-style sampler: a last batch of 1 image breaks batch norm, and processes
        # gather keys of equal batch sizes. One reader skips the rows already consumed in the stream itself; several
        # workers interleave the batches of their shards, so the consumed batches are skipped at the loader's
        # output instead (read and dropped), which is exact because the loader's order is fixed for a worker count.
        workers = min(args.dataloader_num_workers, getattr(dataset, "num_shards", 1))
        skip_rows = state.batches_in_epoch * batch_size if workers <= 1 else 0
        stream = StreamViews(dataset, image_column, views, args.seed, state.epoch, skip_rows, crop_on_device)
        loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate_views, num_workers=workers,
                                             drop_last=True, generator=generator)
        return loader if workers <= 1 else itertools.islice(loader, state.batches_in_epoch, None)
    if args.modality == "video":
        dataset_of_views = ClipViewsDataset(dataset, image_column, views, args.seed, args.num_frames, args.clip_duration,
                                            args.temporal_difference_p, args.frame_rate, args.min_video_frames)
    else:
        dataset_of_views = ViewsDataset(dataset, image_column, views, args.seed, crop_on_device)
    sampler = EpochBatchSampler(
        len(dataset), batch_size, accelerator.num_processes, accelerator.process_index, args.seed, state.epoch,
        start_batch=state.batches_in_epoch, max_batches=state.steps_per_epoch * args.gradient_accumulation_steps,
    )
    return torch.utils.data.DataLoader(
        dataset_of_views, batch_sampler=sampler,
        collate_fn=collate_views, num_workers=args.dataloader_num_workers, generator=generator,
    )


def _while_every_process_has_a_batch(loader, accelerator: Accelerator):
    """The loader's batches for as long as every process has one. Stream shards can hold different numbers of rows:
    the epoch ends on every process when the first one runs out, so that none is left waiting in the others'
    all-gather (or at the end-of-epoch checkpoint) for ever."""
    if accelerator.num_processes == 1:
        yield from loader
        return
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        (num_ended,) = _sum_across(accelerator, batch is None)
        if num_ended:
            return
        yield batch


def _sum_across(accelerator: Accelerator, *values: int) -> list[int]:
    """Each value summed over the processes (one all-reduce)."""
    if accelerator.num_processes == 1:
        return [int(v) for v in values]
    totals = accelerator.reduce(torch.tensor([int(v) for v in values], device=accelerator.device), reduction="sum")
    return [int(v) for v in totals.tolist()]


def run_knn(args, encoder, accelerator: Accelerator, max_bank: int | None) -> float | None:
    """Weighted k-NN top-1 of `encoder` on --eval_split with --train_split as the bank (main process only)."""
    if args.modality == "video":
        logger.info("No online k-NN for videos: evaluate clips with `training/evaluate.py retrieval --modality video`.")
        accelerator.wait_for_everyone()
        return None
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    bank = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split, False, args.cache_dir)
    queries = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, args.eval_split, False, args.cache_dir)
    if max_bank is not None and len(bank) > max_bank:
        bank = bank.shuffle(seed=0).select(range(max_bank))
    if args.max_eval_samples is not None:
        queries = queries.select(range(min(args.max_eval_samples, len(queries))))
    image_column = resolve_column(bank, args.image_column_name, ("image", "img"), "image")
    label_column = resolve_column(bank, args.label_column_name, LABEL_COLUMN_FALLBACKS, "label")
    transform = processor_transform(processor_for(args))
    workers = args.dataloader_num_workers
    bank_features = extract_features(encoder, bank, transform, image_column, num_workers=workers, description="k-NN bank")
    query_features = extract_features(encoder, queries, transform, image_column, num_workers=workers, description="k-NN queries")
    top1 = knn_accuracy(bank_features, torch.tensor(bank[label_column]), query_features, torch.tensor(queries[label_column]),
                        k=args.knn_k, temperature=args.knn_temperature)
    logger.info("k-NN top-1 (k=%d, T=%g, %d bank images, %d queries): %.2f%%", args.knn_k, args.knn_temperature,
                len(bank), len(queries), 100 * top1)
    if max_bank is None:
        add_eval_result(args.output_dir, {
            "task": "knn", "dataset": args.dataset_name or args.train_dir, "split": args.eval_split, "metric": "top1_accuracy",
            "value": round(100 * top1, 2), "settings": {"k": args.knn_k, "temperature": args.knn_temperature,
            "bank_split": args.train_split, "bank_size": len(bank), "num_queries": len(queries)},
        })
        print(f"k-NN top-1 on {len(queries)} {args.eval_split} images: {100 * top1:.2f}%  |  model: {os.path.abspath(args.output_dir)}")
    accelerator.wait_for_everyone()
    return top1


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as error:
        logger.error("%s", error)
        sys.exit(1)
