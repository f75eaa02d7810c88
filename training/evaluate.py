#!/usr/bin/env python
"""Evaluate a frozen encoder: weighted k-NN, linear probe, or retrieval R@k.

    python training/evaluate.py knn --model_name_or_path outputs/fashion-mnist-cpu --dataset_name fashion_mnist \
        --train_split train --eval_split test
    python training/evaluate.py linear --model_name_or_path ORG/NAME --dataset_name uoft-cs/cifar10 \
        --image_column_name img --eval_split test [--augment]
    python training/evaluate.py retrieval --model_name_or_path DIR --dataset_name fashion_mnist --eval_split test
    python training/evaluate.py knn --baseline raw_pixels --dataset_name fashion_mnist --eval_split test \
        --output_dir outputs/raw-pixels
    python training/evaluate.py retrieval --modality video --model_name_or_path outputs/k400-r3d18 \
        --train_dir data/ucf101 --train_split train --eval_split test --frame_rate 25

Videos (`--modality video`, SCE_SPEC §5.3): every video gives `--num_clips` evenly spaced clips x `--num_crops` spatial
crops (default 10 x 3: shorter side 256, three 256 x 256 crops); retrieval and k-NN average the features of those
views, the linear probe averages its softmax predictions over them and trains on cached features of
`--train_views_per_video` random training clips per video (random clip, short-side scale in [256, 320], random
224 crop, flip). Clip settings default to the model's `preprocessor_config.json` (an SCEVideoProcessor).

Any encoder `AutoModel` loads works (an SCE export, or another Hub model with a `pooler_output`, for
comparison). The training split is the k-NN bank, the probe's training set or the retrieval bank; the evaluation
split holds the queries. Every result is added to `eval_results.json` in the model folder (or `--output_dir`),
with the exact settings; `training/push_to_hub.py` turns that file into the model card.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from sce_hf.cli import add_data_args
from sce_hf.data import load_image_dataset, resolve_column
from sce_hf.evaluation import (
    extract_features,
    knn_accuracy,
    linear_probe_on_features,
    linear_probe_with_augmentation,
    pooled_features,
    processor_transform,
    raw_pixel_features,
    retrieval_recall_at_k,
)
from sce_hf.hub import add_eval_result
from sce_hf.video import DEFAULT_FRAME_RATE, VIDEO_COLUMN_FALLBACKS


logger = logging.getLogger("evaluate")
LABEL_COLUMN_FALLBACKS = ("label", "labels", "fine_label")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a frozen encoder (k-NN, linear probe, retrieval).")
    parser.add_argument("task", choices=["knn", "linear", "retrieval"])
    parser.add_argument("--model_name_or_path", type=str, default=None, help="An exported model folder or a Hub id.")
    parser.add_argument("--baseline", choices=["raw_pixels"], default=None, help="Evaluate raw pixels instead of a model.")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Where eval_results.json goes (default: the model folder when it is local).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow a Hub model's own code.")
    add_data_args(parser)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=256)
    parser.add_argument("--dataloader_num_workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--center_pixels", action="store_true", help="Raw pixels: subtract each image's mean.")
    knn = parser.add_argument_group("knn")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    linear = parser.add_argument_group("linear")
    linear.add_argument("--num_train_epochs", type=int, default=100)
    linear.add_argument("--learning_rate", type=float, default=0.1, help="Base lr; scaled by batch / 256.")
    linear.add_argument("--weight_decay", type=float, default=0.0)
    linear.add_argument("--augment", action="store_true",
                        help="The authors' protocol: random-resized crops and flips through the frozen encoder every "
                        "epoch (slow on CPUs); without it, a probe on cached features.")
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument("--ks", type=str, default="1,5,10,15,20,25", help="Comma-separated k of R@k.")
    video = parser.add_argument_group("video (defaults: the model's SCEVideoProcessor settings)")
    video.add_argument("--modality", choices=["image", "video"], default="image", help="Evaluate on images or on video clips.")
    video.add_argument("--video_column_name", type=str, default=None,
                       help=f"Column holding the videos (default: the first of {', '.join(VIDEO_COLUMN_FALLBACKS)}).")
    video.add_argument("--num_frames", type=int, default=None, help="Frames per clip (default: the processor's, else 8).")
    video.add_argument("--clip_duration", type=float, default=None, help="Seconds per clip (default: the processor's, else 2.56).")
    video.add_argument("--num_clips", type=int, default=None, help="Evenly spaced test clips per video (default 10).")
    video.add_argument("--num_crops", type=int, choices=[1, 3], default=None, help="Spatial test crops per clip (default 3).")
    video.add_argument("--short_side", type=int, default=None, help="Shorter side of test clips (default: the processor's resize).")
    video.add_argument("--test_crop_size", type=int, default=None, help="Side of the test crops (default: --short_side).")
    video.add_argument("--frame_rate", type=float, default=DEFAULT_FRAME_RATE, help="Frames per second of frame folders.")
    video.add_argument("--train_views_per_video", type=int, default=1,
                       help="Linear probe: random training clips per video whose features are cached.")
    args = parser.parse_args(argv)
    if args.modality == "video" and args.baseline is not None:
        parser.error("--baseline raw_pixels is for images; give --model_name_or_path for --modality video.")
    if (args.model_name_or_path is None) == (args.baseline is None):
        parser.error("Give --model_name_or_path DIR_OR_ID, or --baseline raw_pixels (not both).")
    if args.eval_split is None:
        parser.error("Give --eval_split (the split of the queries, e.g. test).")
    if args.dataset_name is None and args.train_dir is None:
        parser.error("Give a data source: --dataset_name NAME_OR_PATH or --train_dir FOLDER.")
    if args.output_dir is None:
        if args.model_name_or_path and os.path.isdir(args.model_name_or_path):
            args.output_dir = args.model_name_or_path
        else:
            parser.error("Give --output_dir for eval_results.json (the model is not a local folder).")
    return args


def load_split(args, split: str, limit: int | None):
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, split, False, args.cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def load_encoder(args):
    """The model and its processor; errors say what is missing."""
    from transformers import AutoImageProcessor, AutoModel

    import sce_hf  # noqa: F401  (registers the SCE classes)

    try:
        model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load {args.model_name_or_path}: {str(error).splitlines()[0]}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def load_video_encoder(args):
    """A video encoder (an SCE R3D export) for clip features."""
    from transformers import AutoModel

    import sce_hf  # noqa: F401  (registers the SCE classes)

    try:
        model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load {args.model_name_or_path}: {str(error).splitlines()[0]}") from None
    if not getattr(model.config, "is_video", False):
        raise SystemExit(f"error: {args.model_name_or_path} is an image encoder; --modality video needs a video (R3D) encoder.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def features_of(args, model, processor, dataset, image_column: str, name: str) -> torch.Tensor:
    if model is None:
        return raw_pixel_features(dataset, image_column, center=args.center_pixels)
    try:
        return extract_features(model, dataset, processor_transform(processor), image_column,
                                batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                                description=name)
    except ValueError as error:  # e.g. the processor makes images the model cannot take
        raise SystemExit(
            f"error: the model and its image processor do not fit the data: {error} Check the processor's settings "
            "(preprocessor_config.json) against the model's config."
        ) from None


def load_video_split(args, split: str, limit: int | None):
    from sce_hf.video import load_video_dataset

    dataset = load_video_dataset(args.dataset_name, args.dataset_config_name, args.train_dir, split, args.cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def video_settings(args, model_dir: str) -> dict:
    """Clip settings: the flags, else the model's SCEVideoProcessor, else the authors' defaults (SCE_SPEC §5.3)."""
    from sce_hf.video import SCEVideoProcessor

    try:
        processor = SCEVideoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError):
        processor = SCEVideoProcessor()
    short_side = args.short_side or processor.size["shortest_edge"]
    return dict(
        num_frames=args.num_frames or getattr(processor, "num_frames", 8),
        clip_duration=args.clip_duration or getattr(processor, "clip_duration", 2.56),
        num_clips=args.num_clips or getattr(processor, "num_clips", 10),
        num_crops=args.num_crops or getattr(processor, "num_crops", 3),
        short_side=short_side,
        crop_size=args.test_crop_size or short_side,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        frame_rate=args.frame_rate,
        train_crop_size=processor.crop_size["height"],
    )


def video_training_features(args, model, dataset, labels: torch.Tensor, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `--train_views_per_video` random training clips per video (random clip, short-side scale in
    [s, 1.25 s] with s = the test shorter side, random crop, flip), and their labels."""
    from sce_hf.augmentations import SCEAugmentation, ViewRecipe
    from sce_hf.video import clip_loader, sequential_batches

    recipe = ViewRecipe(settings["train_crop_size"], jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                        flip_p=0.5, mean=settings["mean"], std=settings["std"])
    augment = SCEAugmentation([recipe])
    short = settings["short_side"]
    device = next(model.parameters()).device
    features, feature_labels = [], []
    for view in range(args.train_views_per_video):
        loader = clip_loader(dataset, args.video_column, recipe, sequential_batches(len(dataset), args.per_device_eval_batch_size, view),
                             num_frames=settings["num_frames"], clip_duration=settings["clip_duration"],
                             short_side_range=(short, int(round(short * 1.25))), seed=args.seed,
                             frame_rate=settings["frame_rate"], num_workers=args.dataloader_num_workers)
        for batch in loader:
            if batch.get("views") is None:
                continue
            (pixel_values,) = augment([batch["views"][0].to(device)], batch["sample_seeds"])
            with torch.no_grad():
                features.append(pooled_features(model(pixel_values=pixel_values), model).cpu())
            feature_labels.append(labels[batch["indices"]])
    return torch.cat(features), torch.cat(feature_labels)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)
    video = args.modality == "video"
    train = load_video_split(args, args.train_split, args.max_train_samples) if video else load_split(args, args.train_split, args.max_train_samples)
    test = load_video_split(args, args.eval_split, args.max_eval_samples) if video else load_split(args, args.eval_split, args.max_eval_samples)
    if video:
        image_column = args.video_column = resolve_column(train, args.video_column_name, VIDEO_COLUMN_FALLBACKS, "video")
    else:
        image_column = resolve_column(train, args.image_column_name, ("image", "img"), "image")
    label_column = resolve_column(train, args.label_column_name, LABEL_COLUMN_FALLBACKS, "label")
    resolve_column(test, label_column, (), "label")
    train_labels, test_labels = torch.tensor(train[label_column]), torch.tensor(test[label_column])

    model, processor = load_encoder(args) if args.model_name_or_path and not video else (None, None)
    test_view_features, clip_protocol = None, {}
    if video:
        from sce_hf.video import extract_clip_features

        model = load_video_encoder(args)
        settings = video_settings(args, args.model_name_or_path)
        clip_kwargs = {k: v for k, v in settings.items() if k != "train_crop_size"}
        clip_protocol = {k: v for k, v in settings.items() if k not in ("mean", "std")}
        extract = dict(video_column=image_column, batch_size=args.per_device_eval_batch_size,
                       num_workers=args.dataloader_num_workers, **clip_kwargs)
        if args.task == "linear":
            train_features, train_labels = video_training_features(args, model, train, train_labels, settings)
            clip_protocol["train_views_per_video"] = args.train_views_per_video
            test_view_features = extract_clip_features(model, test, average=False, description="test views", **extract)
            test_features = test_view_features.mean(dim=1)
        else:
            train_features = extract_clip_features(model, train, description=f"{args.train_split} views", **extract)
            test_features = extract_clip_features(model, test, description=f"{args.eval_split} views", **extract)
    else:
        train_features = features_of(args, model, processor, train, image_column, f"{args.train_split} features")
        test_features = features_of(args, model, processor, test, image_column, f"{args.eval_split} features")

    common = {"dataset": args.dataset_name or args.train_dir, "split": args.eval_split,
              "model": args.model_name_or_path or args.baseline}
    settings = {"train_split": args.train_split, "num_train": len(train), "num_eval": len(test),
                "dataset_config_name": args.dataset_config_name, **({"modality": "video", **clip_protocol} if video else {})}
    if args.task == "knn":
        top1 = knn_accuracy(train_features, train_labels, test_features, test_labels, args.k, args.temperature)
        results = [{**common, "task": "knn", "metric": "top1_accuracy", "value": round(100 * top1, 2),
                    "settings": {**settings, "k": args.k, "temperature": args.temperature, "center_pixels": args.center_pixels}}]
    elif args.task == "linear":
        probe_settings = {"epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                          "batch_size": args.per_device_eval_batch_size, "weight_decay": args.weight_decay}
        if test_view_features is not None:  # videos: softmax predictions averaged over each test video's views
            scores = linear_probe_on_features(train_features, train_labels, test_view_features, test_labels,
                                                   args.num_train_epochs, args.per_device_eval_batch_size,
                                                   args.learning_rate, args.weight_decay, args.seed)
        elif args.augment and model is not None:
            crop = processor.crop_size["height"]
            scores = linear_probe_with_augmentation(
                model, train, train_labels, test_features, test_labels, crop, processor.image_mean, processor.image_std,
                image_column, args.num_train_epochs, args.per_device_eval_batch_size, args.learning_rate,
                args.dataloader_num_workers, args.seed)
        else:
            scores = linear_probe_on_features(train_features, train_labels, test_features, test_labels,
                                              args.num_train_epochs, args.per_device_eval_batch_size,
                                              args.learning_rate, args.weight_decay, args.seed)
        protocol = "augmented" if args.augment and model is not None else "cached_features"
        protocol = "clip_features_averaged_predictions" if video else protocol
        results = [{**common, "task": "linear_probe", "metric": f"top{n}_accuracy", "value": round(100 * scores[f"top{n}"], 2),
                    "settings": {**settings, **probe_settings, "protocol": protocol}} for n in (1, 5)]
    else:
        ks = tuple(int(k) for k in args.ks.split(","))
        recalls = retrieval_recall_at_k(train_features, train_labels, test_features, test_labels, ks)
        results = [{**common, "task": "retrieval", "metric": f"recall_at_{k}", "value": round(100 * recalls[k], 2),
                    "settings": {**settings, "centred": True}} for k in ks]

    os.makedirs(args.output_dir, exist_ok=True)
    for result in results:
        add_eval_result(args.output_dir, result)
        print(f"{result['task']} {result['metric']} on {result['dataset']}/{result['split']}: {result['value']:.2f}%")
    logger.info("Results added to %s", os.path.join(args.output_dir, "eval_results.json"))
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad data settings: one clear line, no traceback
        sys.exit(f"error: {error}")
