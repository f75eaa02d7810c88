#!/usr/bin/env python
"""Convert the SCE authors' checkpoints (SCE_SPEC §9) into a Hub-ready `SCEModel` folder.

    # a released ResNet-50 ImageNet download (trunk only, torchvision names)
    python training/convert_official_checkpoint.py --checkpoint sce_rn50_100ep.pth --output outputs/sce-rn50-100ep
    # a Lightning checkpoint of their training code, with the heads, teacher and queue in pretraining/
    python training/convert_official_checkpoint.py --checkpoint last.ckpt --output outputs/sce-cifar10 \
        --preset resnet18-small --include_pretraining --allow_unsafe_unpickling
    # and push it
    python training/convert_official_checkpoint.py --checkpoint FILE --output DIR --push_to_hub --hub_model_id ORG/NAME
    # the R3D video checkpoints (pytorchvideo keys) are recognised and handed to sce_hf.conversion_video
    python training/convert_official_checkpoint.py --checkpoint r3d18.ckpt --output DIR --num_frames 8

The trunk's shape (block type, depths, widths, 7x7 or 3x3 stem) is read from the file; `--preset` (default: the
matching one) names the SCE settings recorded in `config.json`. The folder gets the encoder, the evaluation
preprocessing (ImageNet 256 -> 224 for ResNet-50, CIFAR-10 32 px for the small-input ResNet-18), `conversion.json`
(source file, SHA-256, format) and a model card. Files are read with `torch.load(weights_only=True)`; Lightning
files carry OmegaConf objects that need `--allow_unsafe_unpickling`, which runs code from the file: use it only for
files you trust. Every key must map: an unknown or missing key stops the conversion and is listed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping

from sce_hf.cli import add_hub_args
from sce_hf.configuration_sce import PRESETS


logger = logging.getLogger("convert_official_checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert the SCE authors' checkpoints into an SCEModel folder.")
    parser.add_argument("--checkpoint", type=str, required=True, help="A trunk-only .pth or a Lightning .ckpt file.")
    parser.add_argument("--output", type=str, required=True, help="The folder to write (an SCEModel export).")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="SCE settings of the run (default: the preset matching the trunk in the file).")
    parser.add_argument("--num_frames", type=int, default=8,
                        help="Video checkpoints: frames per clip the model was trained with (8 or 16).")
    parser.add_argument("--processor_preset", choices=["imagenet", "cifar10", "fashion-mnist"], default=None,
                        help="Evaluation preprocessing to export (default: imagenet for 7x7 stems, cifar10 for "
                        "small inputs).")
    parser.add_argument("--pretraining_dataset", type=str, default=None,
                        help="What the checkpoint was pretrained on, for its card (default: the preset's, e.g. "
                        "imagenet-1k, cifar10, kinetics400).")
    parser.add_argument("--include_pretraining", action="store_true",
                        help="Also write pretraining/ (projector, predictor, momentum teacher, queue) from a "
                        "Lightning checkpoint.")
    parser.add_argument("--allow_unsafe_unpickling", action="store_true",
                        help="Load files that torch.load(weights_only=True) refuses. This runs arbitrary code from the "
                        "file: only for checkpoints from a source you trust.")
    add_hub_args(parser)
    args = parser.parse_args(argv)
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from sce_hf import SCEImageProcessor, __version__
    from sce_hf.conversion import CheckpointError, convert_official_checkpoint, load_checkpoint, sha256_of
    from sce_hf.hub import CONVERSION_FILE, PushError, export_pretrained, push_to_hub

    try:
        loaded = load_checkpoint(args.checkpoint, args.allow_unsafe_unpickling)
        video = _video_converter(loaded)
        convert = video.convert_official_video_checkpoint if video else convert_official_checkpoint
        result = convert(loaded, preset=args.preset, include_pretraining=args.include_pretraining,
                         allow_unsafe_unpickling=args.allow_unsafe_unpickling)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result.info.update(source_file=os.path.basename(args.checkpoint), source_sha256=sha256_of(args.checkpoint))
    if args.pretraining_dataset:
        result.info["pretraining_dataset"] = args.pretraining_dataset
    os.makedirs(args.output, exist_ok=True)
    # The provenance record first, so the card written by the export describes the conversion.
    processor_preset = args.processor_preset or result.processor_preset
    record = {**result.info, "sce_hf_version": __version__, "processor_preset": processor_preset}
    with open(os.path.join(args.output, CONVERSION_FILE), "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if video:
        from sce_hf.video import SCEVideoProcessor

        processor = SCEVideoProcessor(num_frames=args.num_frames)
    else:
        processor = SCEImageProcessor.from_preset(processor_preset)
    export_pretrained(result.model, processor, args.output, save_pretraining=False)
    if result.pretraining is not None:
        result.pretraining.save_pretrained(os.path.join(args.output, "pretraining"))
    info = result.info
    print(f"Converted {args.checkpoint} ({info['source_format']}, {info['preset']}) to {os.path.abspath(args.output)}"
          + (" with pretraining/" if result.pretraining is not None else ""))
    if args.push_to_hub:
        try:
            url = push_to_hub(args.output, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                              include_pretraining=args.include_pretraining,
                              commit_message=f"Convert {info['source_file']} (SCE authors' checkpoint)")
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"Pushed to {url}")
    return 0


def _video_converter(loaded):
    """`sce_hf.conversion_video` when the checkpoint holds an R3D video trunk (pytorchvideo keys), else None."""
    try:
        from sce_hf import conversion_video
    except ImportError:  # a build without the video models
        return None
    if not isinstance(loaded, Mapping) or not conversion_video.is_video_checkpoint(loaded):
        return None
    return conversion_video


if __name__ == "__main__":
    sys.exit(main())
