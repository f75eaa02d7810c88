"""Convert the SCE authors' video checkpoints (R3D-18 / R3D-50, SCE_SPEC §9) into `SCEModel` / `SCEForPreTraining`.

The authors' video trunks are pytorchvideo ResNet3D models held by eztorch's `VideoHeadModel` under `trunk.model.`
(a parameter-free pooling head under `trunk.head.`). Our R3D trunk (`modeling_resnet3d.py`) uses pytorchvideo's module
names, so the key mapping is a prefix change:

    trunk.model.blocks.0.conv.weight                           → trunk.blocks.0.conv.weight            (stem)
    trunk.model.blocks.0.norm.{weight,bias,running_*,...}      → trunk.blocks.0.norm.*
    trunk.model.blocks.S.res_blocks.I.branch1_conv.weight      → trunk.blocks.S.res_blocks.I.branch1_conv.weight
    trunk.model.blocks.S.res_blocks.I.branch1_norm.*           → trunk.blocks.S.res_blocks.I.branch1_norm.*
    trunk.model.blocks.S.res_blocks.I.branch2.{conv,norm}_{a,b,c}.*  → the same under trunk.blocks.S...

Accepted files: Lightning checkpoints of their training code (`state_dict` with `trunk.`, `projector.`,
`predictor.`, `momentum_trunk.`, `momentum_projector.`, `queue`, `queue_ptr`), read with the image converter's
`split_checkpoint`; and trunk-only files whose keys start with `model.blocks.` or `blocks.` (optionally under
`state_dict`). The architecture (basic or bottleneck blocks, depths, widths, stem and temporal kernels) is read from
the weights; strides cannot be, and are the slow-only design of SCE_SPEC §2.1 (spatial 1, 2, 2, 2; no temporal).

The command line is the image converter's, which recognises video checkpoints (`is_video_checkpoint`):

    python training/convert_official_checkpoint.py --checkpoint r3d18.ckpt --output outputs/sce-r3d18 [--include_pretraining]
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .configuration_sce import SCEConfig
from .conversion import (
    CheckpointError,
    ConversionResult,
    OfficialCheckpoint,
    convert_trunk_state_dict,
    infer_head_config,
    load_source,
    map_head_state_dict,
    sha256_of,
    split_checkpoint,
)
from .modeling_resnet3d import R3D_MODEL_TYPE

logger = logging.getLogger(__name__)

_TRUNK_PREFIXES = ("model.", "")  # after `trunk.`: eztorch's VideoHeadModel.model; trunk-only files may lack it
_STAGE_BLOCK = re.compile(r"^blocks\.(\d+)\.res_blocks\.(\d+)\.")
_R3D_PRESETS = {("basic", (2, 2, 2, 2)): "r3d18", ("bottleneck", (3, 4, 6, 3)): "r3d50"}


def _strip(key: str) -> str | None:
    for prefix in _TRUNK_PREFIXES:
        if key.startswith(prefix + "blocks."):
            return key[len(prefix):]
    return None


def is_video_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a loaded checkpoint with a `state_dict` key) holds a pytorchvideo R3D trunk."""
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return any(k.endswith("blocks.0.conv.weight") and getattr(v, "ndim", 0) == 5 for k, v in state.items())


def pytorchvideo_to_sce_key(key: str) -> str | None:
    """Our R3D trunk's name (without the `trunk.` prefix) of an authors' trunk key (`model.blocks...` or
    `blocks...`); None for a key of no known pattern."""
    return _strip(key)


def infer_r3d_architecture(trunk: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """Read an R3D's shape from its pytorchvideo keys.

    Returns:
        The `R3DConfig` fields (as a dict with `model_type`), plus `preset` (`"r3d18"`, `"r3d50"` or None).

    Raises:
        CheckpointError: the keys are not those of a pytorchvideo ResNet3D.
    """
    state = {name: value for key, value in trunk.items() if (name := _strip(key)) is not None}
    stem = state.get("blocks.0.conv.weight")
    if stem is None or stem.ndim != 5:
        raise CheckpointError(
            f"{source}: no 5-D `blocks.0.conv.weight`, so the trunk is not a pytorchvideo ResNet3D (first keys: "
            f"{sorted(trunk)[:8]})."
        )
    blocks: dict[int, set[int]] = {}
    for key in state:
        match = _STAGE_BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(f"{source}: stages blocks.1..blocks.N expected, found {[f'blocks.{s}' for s in stages]}.")
    bottleneck = "blocks.1.res_blocks.0.branch2.conv_c.weight" in state
    last = "conv_c" if bottleneck else "conv_b"
    hidden_sizes, temporal = [], []
    for s in stages:
        for name in (f"blocks.{s}.res_blocks.0.branch2.{last}.weight", f"blocks.{s}.res_blocks.0.branch2.conv_a.weight"):
            if name not in state:
                raise CheckpointError(f"{source}: `{name}` is missing, so stage {s} cannot be read.")
        hidden_sizes.append(int(state[f"blocks.{s}.res_blocks.0.branch2.{last}.weight"].shape[0]))
        temporal.append(int(state[f"blocks.{s}.res_blocks.0.branch2.conv_a.weight"].shape[2]))
    layer_type = "bottleneck" if bottleneck else "basic"
    depths = [max(blocks[s]) + 1 for s in stages]
    return dict(
        model_type=R3D_MODEL_TYPE,
        layer_type=layer_type,
        depths=depths,
        hidden_sizes=hidden_sizes,
        embedding_size=int(stem.shape[0]),
        num_channels=int(stem.shape[1]),
        stem_kernel_size=[int(k) for k in stem.shape[2:]],
        conv_a_temporal_kernel_sizes=temporal,
        preset=_R3D_PRESETS.get((layer_type, tuple(depths))),
    )


def convert_video_trunk_state_dict(
    trunk: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], prefix: str = "trunk.", source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an authors' R3D trunk state dict onto `target` (a state dict with `prefix`-ed names of our R3D).

    A missing `num_batches_tracked` is filled with 0; any other missing, unknown or mis-shaped key is an error.

    Raises:
        CheckpointError: listing every unknown source key, missing target key and shape mismatch.
    """
    converted, _ = convert_trunk_state_dict(
        trunk, target, prefix, source, map_key=pytorchvideo_to_sce_key, reverse_key=None, what="R3D trunk"
    )
    return converted


def _read(obj: Any, source: str) -> OfficialCheckpoint:
    checkpoint = split_checkpoint(obj, source)
    # eztorch's VideoHeadModel may register its (parameter-free) pooling head: nothing to convert there.
    checkpoint.trunk = {k: v for k, v in checkpoint.trunk.items() if not k.startswith("head.")}
    checkpoint.momentum_trunk = {k: v for k, v in checkpoint.momentum_trunk.items() if not k.startswith("head.")}
    return checkpoint


def build_video_config(checkpoint: OfficialCheckpoint, preset: str | None = None, source: str = "checkpoint") -> tuple[SCEConfig, str]:
    """The `SCEConfig` of a video checkpoint: R3D read from its keys, heads from its heads (else the preset's)."""
    architecture = infer_r3d_architecture(checkpoint.trunk, source)
    inferred = architecture.pop("preset") or ("r3d50" if architecture["layer_type"] == "bottleneck" else "r3d18")
    if preset is None:
        preset = inferred
    elif preset not in ("r3d18", "r3d50"):
        raise CheckpointError(f"{source} holds a video (R3D) trunk: pass --preset r3d18 or r3d50, not {preset!r}.")
    elif preset != inferred:
        raise CheckpointError(f"{source} holds an {inferred.upper()} trunk ({architecture['layer_type']} blocks), "
                              f"not {preset}: pass --preset {inferred} or leave --preset out.")
    overrides: dict[str, Any] = {}
    if checkpoint.has_heads:
        overrides.update(infer_head_config(checkpoint.projector, checkpoint.predictor, source))
        if checkpoint.queue is not None:
            overrides["queue_size"] = int(checkpoint.queue.shape[1])
        else:
            overrides.update(queue_size=0, in_batch_keys=True)
    return SCEConfig.from_preset(preset, backbone_config=architecture, **overrides), preset


def convert_official_video_checkpoint(
    path_or_object: Any, preset: str | None = None, include_pretraining: bool = False, allow_unsafe_unpickling: bool = False
) -> ConversionResult:
    """Convert an authors' R3D checkpoint (a file path, or an already loaded object) into our models.

    Raises:
        CheckpointError: listing what could not be converted.
    """
    from .modeling_sce import SCEModel
    from .pretraining import SCEForPreTraining

    source, obj = load_source(path_or_object, allow_unsafe_unpickling)
    checkpoint = _read(obj, source)
    if include_pretraining and not checkpoint.has_heads:
        raise CheckpointError(f"{source} has no heads (no `projector.` keys): there is no pretraining state to export.")
    config, preset = build_video_config(checkpoint, preset, source)
    model = SCEModel(config)
    trunk_state = convert_video_trunk_state_dict(checkpoint.trunk, model.state_dict(), "trunk.", source)
    model.load_state_dict(trunk_state, strict=True)
    model.eval()

    pretraining = None
    if include_pretraining:
        pretraining = SCEForPreTraining(config)
        if not checkpoint.momentum_trunk or not checkpoint.momentum_projector:
            raise CheckpointError(f"{source}: the teacher (`momentum_trunk.`, `momentum_projector.`) is missing.")
        state = {f"sce.{k}": v.clone() for k, v in trunk_state.items()}
        teacher_target = pretraining.teacher_encoder.state_dict()
        state.update({f"teacher_encoder.{k}": v for k, v in convert_video_trunk_state_dict(
            checkpoint.momentum_trunk, teacher_target, "trunk.", f"{source} (momentum_trunk)").items()})
        for name, part in (("projector", checkpoint.projector), ("predictor", checkpoint.predictor),
                           ("teacher_projector", checkpoint.momentum_projector)):
            if name == "predictor" and not config.predictor_num_layers:
                continue
            state.update({f"{name}.{k}": v for k, v in map_head_state_dict(part, getattr(pretraining, name), name).items()})
        if checkpoint.queue is not None:
            queue = checkpoint.queue.detach()
            pointer = int(checkpoint.queue_ptr.reshape(-1)[0]) if checkpoint.queue_ptr is not None else 0
            if queue.ndim != 2 or queue.shape[0] != config.projector_output_size or not 0 <= pointer < queue.shape[1]:
                raise CheckpointError(
                    f"{source}: the queue has shape {tuple(queue.shape)} and pointer {pointer}; expected "
                    f"({config.projector_output_size}, K) keys of the projector's size and a pointer in [0, K)."
                )
            state["queue"] = queue.t().contiguous().float()  # (d, K) -> one key per row
            state["queue_ptr"] = torch.tensor(pointer)
            state["num_enqueued"] = torch.tensor(config.queue_size)
        else:
            state.update(queue=pretraining.queue.clone(), queue_ptr=pretraining.queue_ptr.clone(),
                         num_enqueued=pretraining.num_enqueued.clone())
        try:
            pretraining.load_state_dict(state, strict=True)
        except RuntimeError as error:  # shapes the heads' inference did not catch
            raise CheckpointError(f"{source}: the pretraining state does not fit {preset}: {str(error).splitlines()[-1].strip()}") from None
        pretraining.teacher_encoder.requires_grad_(False)
        pretraining.teacher_projector.requires_grad_(False)

    info = {
        "source_file": source,
        "source_sha256": sha256_of(os.fspath(path_or_object)) if isinstance(path_or_object, (str, os.PathLike)) else None,
        "source_format": checkpoint.format,
        "preset": preset,
        "architecture": {k: v for k, v in config.backbone_config.to_dict().items()
                         if k in ("layer_type", "depths", "hidden_sizes", "embedding_size", "stem_kernel_size",
                                  "conv_a_temporal_kernel_sizes")},
        "heads_in_source": checkpoint.has_heads,
        "includes_pretraining": include_pretraining,
        "pretraining_dataset": "kinetics400",
    }
    return ConversionResult(model=model, pretraining=pretraining, preset=preset, processor_preset="kinetics", info=info)


__all__ = [
    "build_video_config",
    "convert_official_video_checkpoint",
    "convert_video_trunk_state_dict",
    "infer_r3d_architecture",
    "is_video_checkpoint",
    "pytorchvideo_to_sce_key",
]
