"""Convert the SCE authors' checkpoints (SCE_SPEC §9) into `SCEModel` / `SCEForPreTraining` weights.

Two file formats are read:

- **Trunk-only** (the authors' released ResNet-50 downloads): a torchvision ResNet state dict with no prefix
  (`conv1.weight`, `bn1.*`, `layer{1..4}.{i}.conv{1,2,3}.weight`, `layer{1..4}.{i}.bn{1,2,3}.*`,
  `layer{1..4}.0.downsample.{0,1}.*`, no `fc`), possibly under a top-level `state_dict` key.
- **Lightning** (checkpoints written by their training code): `state_dict` with the prefixes `trunk.`,
  `projector.`, `predictor.`, `momentum_trunk.`, `momentum_projector.` and the buffers `queue` (d, K) and
  `queue_ptr`; `hyper_parameters` holds OmegaConf objects, which `torch.load(weights_only=True)` refuses.

torchvision → transformers ResNet names (our `SCEModel` keeps the trunk under `trunk.`):

    conv1 / bn1                        → embedder.embedder.convolution / .normalization
    layerX.Y.convZ / bnZ               → encoder.stages.{X-1}.layers.Y.layer.{Z-1}.convolution / .normalization
    layerX.Y.downsample.0 / .1         → encoder.stages.{X-1}.layers.Y.shortcut.convolution / .normalization

torchvision's ResNet-50 is "v1.5" (a downsampling bottleneck strides in its 3x3 convolution): transformers'
`downsample_in_bottleneck=False`. The authors' CIFAR trunk ("small input": 3x3 stride-1 `conv1`, no max-pool) maps
to `small_input_stem=True`. The projector and predictor (sequences of Linear / BatchNorm1d / ReLU) are mapped
onto ours by order and shape; anything that cannot be mapped is an error that lists it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .configuration_sce import PRESETS, SCEConfig

logger = logging.getLogger(__name__)

UNSAFE_FLAG = "--allow_unsafe_unpickling"
LIGHTNING_PREFIXES = ("trunk.", "projector.", "predictor.", "momentum_trunk.", "momentum_projector.")
LIGHTNING_BUFFERS = ("queue", "queue_ptr")
# Children of the authors' LightningModule that hold no learned weights (GPU augmentation modules may register
# buffers such as normalisation constants): skipped, and reported as skipped.
IGNORED_LIGHTNING_PREFIXES = ("train_transform.", "val_transform.", "test_transform.")
# The dataset each preset's official checkpoints were pretrained on, and the evaluation preprocessing they expect.
PRESET_DATASETS = {
    "resnet50": "ILSVRC/imagenet-1k", "resnet50-small": None, "resnet18": None, "resnet18-small": "uoft-cs/cifar10",
}
PRESET_PROCESSORS = {
    "resnet50": "imagenet", "resnet50-small": "cifar10", "resnet18": "imagenet", "resnet18-small": "cifar10",
}

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv|bn)(\d+)\.(\w+)$")
_DOWNSAMPLE = re.compile(r"^layer(\d+)\.(\d+)\.downsample\.([01])\.(\w+)$")
_OURS_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_OURS_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(\w+)$")
_OURS_SHORTCUT = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that `torch.load(weights_only=True)` refuses (it needs arbitrary unpickling)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def load_checkpoint(path: str, allow_unsafe_unpickling: bool = False) -> Any:
    """`torch.load` the file on the CPU with `weights_only=True`.

    Args:
        path: the checkpoint file.
        allow_unsafe_unpickling: fall back to `weights_only=False` for files that need it (the authors' Lightning
            files carry OmegaConf objects). Unpickling runs arbitrary code from the file: only for trusted files.

    Raises:
        CheckpointError: the file is missing or is not a PyTorch checkpoint.
        UnsafeCheckpointError: the file needs arbitrary unpickling and `allow_unsafe_unpickling` is False.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; pass the path of a .ckpt/.pth/.pt checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None and not allow_unsafe_unpickling:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint: torch.load(weights_only=True) failed "
                f"({_weights_only_reason(error)}). If it is a pickle file from a source you trust, {UNSAFE_FLAG} "
                "loads it without that restriction."
            ) from None
        if refused is not None and not allow_unsafe_unpickling:
            raise UnsafeCheckpointError(
                f"{path} holds a `{refused.group(1)}` object, which torch.load(weights_only=True) refuses. Such files "
                f"(the authors' Lightning checkpoints carry OmegaConf objects) need arbitrary unpickling, which can "
                f"run code from the file: rerun with {UNSAFE_FLAG} only if you trust where the file comes from."
            ) from None
    except Exception as error:  # zip corruption, truncated file, not a torch file at all
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {_first_line(str(error))}") from None
    logger.warning(
        "%s: loading with torch.load(weights_only=False) because %s was given. Unpickling executes arbitrary code "
        "embedded in the file: use this only for files from a source you trust.", path, UNSAFE_FLAG
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {type(error).__name__}: {_first_line(str(error))}"
        ) from None


def load_source(path_or_object: Any, allow_unsafe_unpickling: bool = False) -> tuple[str, Any]:
    """A checkpoint given as a path (loaded with [`load_checkpoint`]) or as an already loaded object, with the name
    error messages use for it (the file name, or "checkpoint")."""
    if isinstance(path_or_object, (str, os.PathLike)):
        path = os.fspath(path_or_object)
        return os.path.basename(path), load_checkpoint(path, allow_unsafe_unpickling)
    return "checkpoint", path_or_object


def _weights_only_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler" in line or "Unsupported" in line]
    return " ".join(lines) if lines else _first_line(str(error))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no details"


@dataclass
class OfficialCheckpoint:
    """The tensors of an authors' checkpoint, split by role (torchvision names, prefixes removed)."""

    format: str  # "trunk-only" or "lightning"
    trunk: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    predictor: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum_trunk: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum_projector: dict[str, torch.Tensor] = field(default_factory=dict)
    queue: torch.Tensor | None = None  # (d, K), the authors' layout
    queue_ptr: torch.Tensor | None = None
    ignored_keys: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_heads(self) -> bool:
        return bool(self.projector)


def split_checkpoint(obj: Any, source: str = "checkpoint") -> OfficialCheckpoint:
    """Recognise the format of a loaded checkpoint and split its state dict by role.

    Raises:
        CheckpointError: the object is not a state dict, or a Lightning state dict holds keys of no known role
            (they are listed).
    """
    metadata: dict[str, Any] = {}
    state = obj
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        metadata["under_state_dict_key"] = True
        for key in ("epoch", "global_step", "pytorch-lightning_version"):
            if isinstance(obj.get(key), (int, float, str)):
                metadata[key] = obj[key]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{source} holds no state dict (got {type(state).__name__}); expected a mapping of names to tensors."
        )
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise CheckpointError(f"{source}: the state dict has entries that are not tensors: {non_tensors[:20]}.")

    if not any(key.startswith("trunk.") for key in state):
        return OfficialCheckpoint(format="trunk-only", trunk=dict(state), metadata=metadata)

    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in LIGHTNING_PREFIXES}
    checkpoint = OfficialCheckpoint(format="lightning", trunk={}, metadata=metadata)
    unknown = []
    for key, value in state.items():  # insertion order = module order, which the head mapping relies on
        prefix = next((p for p in LIGHTNING_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix):]] = value
        elif key == "queue":
            checkpoint.queue = value
        elif key == "queue_ptr":
            checkpoint.queue_ptr = value
        elif key.startswith(IGNORED_LIGHTNING_PREFIXES):
            checkpoint.ignored_keys.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} key(s) of no known role (expected the prefixes {list(LIGHTNING_PREFIXES)} and "
            f"the buffers {list(LIGHTNING_BUFFERS)}): {unknown}"
        )
    if checkpoint.ignored_keys:
        logger.info("Skipping %d augmentation-module buffer(s) (no learned weights): %s", len(checkpoint.ignored_keys),
                    checkpoint.ignored_keys[:10])
    checkpoint.trunk = parts["trunk."]
    checkpoint.projector = parts["projector."]
    checkpoint.predictor = parts["predictor."]
    checkpoint.momentum_trunk = parts["momentum_trunk."]
    checkpoint.momentum_projector = parts["momentum_projector."]
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# The trunk


def torchvision_to_transformers_key(key: str) -> str | None:
    """The transformers `ResNetModel` name of a torchvision ResNet key; None for a key of no known pattern."""
    match = _STEM.match(key)
    if match:
        module = "convolution" if match.group(1) == "conv1" else "normalization"
        return f"embedder.embedder.{module}.{match.group(2)}"
    match = _BLOCK.match(key)
    if match:
        stage, block, kind, index, name = match.groups()
        if int(stage) < 1 or int(index) < 1:
            return None
        module = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{int(block)}.layer.{int(index) - 1}.{module}.{name}"
    match = _DOWNSAMPLE.match(key)
    if match:
        stage, block, index, name = match.groups()
        if int(stage) < 1:
            return None
        module = "convolution" if index == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{int(block)}.shortcut.{module}.{name}"
    return None


def transformers_to_torchvision_key(key: str) -> str | None:
    """The torchvision name of a transformers `ResNetModel` key (the inverse of the mapping above)."""
    match = _OURS_STEM.match(key)
    if match:
        return f"{'conv1' if match.group(1) == 'convolution' else 'bn1'}.{match.group(2)}"
    match = _OURS_BLOCK.match(key)
    if match:
        stage, block, index, module, name = match.groups()
        kind = "conv" if module == "convolution" else "bn"
        return f"layer{int(stage) + 1}.{block}.{kind}{int(index) + 1}.{name}"
    match = _OURS_SHORTCUT.match(key)
    if match:
        stage, block, module, name = match.groups()
        return f"layer{int(stage) + 1}.{block}.downsample.{0 if module == 'convolution' else 1}.{name}"
    return None


def infer_trunk_architecture(trunk: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """Read the ResNet's shape from its torchvision keys: block type, depths, widths, stem.

    Returns:
        `{"layer_type", "depths", "hidden_sizes", "embedding_size", "small_input_stem", "family"}` where `family`
        is `"resnet50"` (bottleneck blocks) or `"resnet18"` (basic blocks), the preset whose heads apply.

    Raises:
        CheckpointError: when the keys are not those of a torchvision ResNet.
    """
    if "conv1.weight" not in trunk:
        sample = sorted(trunk)[:8]
        raise CheckpointError(
            f"{source}: no `conv1.weight`, so the trunk is not a torchvision ResNet (first keys: {sample}). Only the "
            "image ResNet checkpoints convert here (the R3D video ones belong to the video converter)."
        )
    stem = trunk["conv1.weight"]
    if stem.ndim != 4:
        raise CheckpointError(f"{source}: `conv1.weight` has shape {tuple(stem.shape)}; a 2-D ResNet stem is 4-D.")
    blocks: dict[int, set[int]] = {}
    for key in trunk:
        match = _BLOCK.match(key) or _DOWNSAMPLE.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        found = [f"layer{s}" for s in stages]
        raise CheckpointError(f"{source}: ResNet stages layer1..layerN expected, found {found}.")
    depths = [max(blocks[s]) + 1 for s in stages]
    bottleneck = "layer1.0.conv3.weight" in trunk
    last_conv = "conv3" if bottleneck else "conv2"
    hidden_sizes = []
    for s in stages:
        key = f"layer{s}.0.{last_conv}.weight"
        if key not in trunk:
            raise CheckpointError(f"{source}: `{key}` is missing, so the width of stage {s} is unknown.")
        hidden_sizes.append(int(trunk[key].shape[0]))
    kernel = tuple(stem.shape[-2:])
    if kernel not in ((7, 7), (3, 3)):
        raise CheckpointError(
            f"{source}: a {kernel} stem convolution is neither torchvision's 7x7 nor the 3x3 small-input one."
        )
    small = kernel == (3, 3)
    family = "resnet50" if bottleneck else "resnet18"
    return dict(
        layer_type="bottleneck" if bottleneck else "basic",
        depths=depths,
        hidden_sizes=hidden_sizes,
        embedding_size=int(stem.shape[0]),
        num_channels=int(stem.shape[1]),
        small_input_stem=small,
        family=family,
        preset=family + ("-small" if small else ""),
    )


def backbone_config_for(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers ResNet config (as a dict) of an inferred torchvision architecture (ResNet v1.5)."""
    return dict(
        model_type="resnet",
        layer_type=architecture["layer_type"],
        depths=list(architecture["depths"]),
        hidden_sizes=list(architecture["hidden_sizes"]),
        embedding_size=architecture["embedding_size"],
        num_channels=architecture["num_channels"],
        downsample_in_bottleneck=False,
    )


def convert_trunk_state_dict(
    trunk: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    prefix: str = "trunk.",
    source: str = "checkpoint",
    *,
    map_key: Callable[[str], str | None] | None = None,
    reverse_key: Callable[[str], str | None] | None = None,
    what: str = "trunk",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a trunk state dict onto `target` (a state dict with `prefix`-ed names of our model).

    `map_key` renames one source key (default: torchvision ResNet → transformers ResNet, `None` for an unknown key);
    `reverse_key` names a missing target key in the source's naming for the error message (default: the inverse of
    the default `map_key`; pass `None` to list our names only); `what` names the trunk in errors.

    A missing `num_batches_tracked` (some exports drop it; eval mode never reads it) is filled with 0 and reported
    in the second return value; any other missing, unknown or mis-shaped key is an error.

    Returns:
        The converted state dict, and the target keys that were filled.

    Raises:
        CheckpointError: listing every unknown source key, missing target key and shape mismatch.
    """
    if map_key is None:
        map_key, reverse_key = torchvision_to_transformers_key, reverse_key or transformers_to_torchvision_key
    converted: dict[str, torch.Tensor] = {}
    unknown, mismatched = [], []
    for key, value in trunk.items():
        name = map_key(key)
        if name is None or prefix + name not in target:
            unknown.append(key)
            continue
        expected = target[prefix + name]
        if tuple(value.shape) != tuple(expected.shape):
            mismatched.append(f"{key} {tuple(value.shape)} -> {prefix + name} {tuple(expected.shape)}")
            continue
        converted[prefix + name] = value.detach().to(expected.dtype).contiguous()
    missing = [key for key in target if key.startswith(prefix) and key not in converted]
    filled = [key for key in missing if key.endswith("num_batches_tracked")]
    missing = [key for key in missing if key not in filled]
    problems = []
    if unknown:
        hint = " (`fc.*` is a classifier: export the trunk alone)" if any(k.startswith("fc.") for k in unknown) else ""
        problems.append(f"{len(unknown)} unknown key(s){hint}: {unknown}")
    if missing:
        named = [f"{reverse_key(k[len(prefix):]) or '?'} (ours: {k})" for k in missing] if reverse_key else missing
        problems.append(f"{len(missing)} missing key(s): {named}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {mismatched}")
    if problems:
        raise CheckpointError(f"{source}: the {what} does not map onto the model; " + "; ".join(problems))
    for key in filled:
        converted[key] = torch.zeros(target[key].shape, dtype=target[key].dtype)
    return converted, filled


# ---------------------------------------------------------------------------------------------------------------
# The heads (projector, predictor): sequences of Linear / BatchNorm1d / ReLU, mapped by order and shape


def _group_by_module(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Consecutive keys grouped by their module path, in the state dict's order."""
    groups: list[tuple[str, dict[str, torch.Tensor]]] = []
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        if groups and groups[-1][0] == module:
            groups[-1][1][name] = value
        else:
            groups.append((module, {name: value}))
    return groups


def _kind(params: Mapping[str, torch.Tensor]) -> str:
    if "running_mean" in params or "running_var" in params:
        return "batchnorm"
    if "weight" in params and params["weight"].ndim == 2:
        return "linear"
    return "unknown"


def describe_head(state: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The layers of a head state dict in order: `{"module", "kind", "shape", "bias"/"affine"}` each."""
    layers = []
    for module, params in _group_by_module(state):
        kind = _kind(params)
        entry: dict[str, Any] = {"module": module, "kind": kind, "keys": sorted(params)}
        if kind == "linear":
            entry.update(out_features=int(params["weight"].shape[0]), in_features=int(params["weight"].shape[1]),
                         bias="bias" in params)
        elif kind == "batchnorm":
            entry.update(num_features=int(params["running_mean"].shape[0]), affine="weight" in params)
        layers.append(entry)
    return layers


def infer_head_config(
    projector: Mapping[str, torch.Tensor], predictor: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, Any]:
    """`SCEConfig` head settings that reproduce the checkpoint's projector and predictor.

    Raises:
        CheckpointError: when a head is not a Linear/BatchNorm1d sequence our builders can express.
    """
    values: dict[str, Any] = {}
    layers = describe_head(projector)
    linears = [layer for layer in layers if layer["kind"] == "linear"]
    if any(layer["kind"] == "unknown" for layer in layers) or not linears:
        raise CheckpointError(f"{source}: the projector is not a sequence of Linear/BatchNorm1d layers: {layers}")
    values["projector_num_layers"] = len(linears)
    values["projector_output_size"] = linears[-1]["out_features"]
    if len(linears) > 1:
        values["projector_hidden_size"] = linears[0]["out_features"]
    values["projector_last_bias"] = linears[-1]["bias"]
    values["projector_last_batchnorm"] = layers[-1]["kind"] == "batchnorm"
    if predictor:
        layers = describe_head(predictor)
        linears = [layer for layer in layers if layer["kind"] == "linear"]
        if any(layer["kind"] == "unknown" for layer in layers) or not linears:
            raise CheckpointError(f"{source}: the predictor is not a sequence of Linear/BatchNorm1d layers: {layers}")
        values["predictor_num_layers"] = len(linears)
        if len(linears) > 1:
            values["predictor_hidden_size"] = linears[0]["out_features"]
    else:
        values["predictor_num_layers"] = 0
    return values


def _target_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, child) for name, child in module.named_modules()
        if isinstance(child, (nn.Linear, nn.modules.batchnorm._BatchNorm))
    ]


def map_head_state_dict(
    source_state: Mapping[str, torch.Tensor], target: nn.Module, name: str
) -> dict[str, torch.Tensor]:
    """Map a head's state dict onto `target` (our `nn.Sequential`) layer by layer, by order, kind and shape.

    Returns:
        `target`'s state dict filled from `source_state`.

    Raises:
        CheckpointError: naming every layer (source and ours) that could not be paired.
    """
    source_layers = _group_by_module(source_state)
    target_layers = _target_layers(target)
    target_state = target.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    problems = []
    for index in range(max(len(source_layers), len(target_layers))):
        if index >= len(source_layers):
            ours, module = target_layers[index]
            problems.append(f"our {name}.{ours} ({type(module).__name__}) has no counterpart")
            continue
        source_module, params = source_layers[index]
        if index >= len(target_layers):
            problems.append(f"{name}.{source_module} {sorted(params)} has no counterpart in ours")
            continue
        ours, module = target_layers[index]
        expected = {key: target_state[f"{ours}.{key}"] for key in module.state_dict()}
        if set(params) != set(expected) or any(tuple(params[k].shape) != tuple(expected[k].shape) for k in expected):
            got = {k: tuple(v.shape) for k, v in params.items()}
            want = {k: tuple(v.shape) for k, v in expected.items()}
            problems.append(f"{name}.{source_module} {got} does not fit our {name}.{ours} {want}")
            continue
        for key, value in params.items():
            mapped[f"{ours}.{key}"] = value.detach().to(expected[key].dtype).contiguous()
    if problems:
        raise CheckpointError(f"the {name} could not be mapped by order and shape: " + "; ".join(problems))
    return mapped


# ---------------------------------------------------------------------------------------------------------------
# Whole conversion


@dataclass
class ConversionResult:
    """The converted encoder, the pretraining model (when asked) and what to record about the conversion."""

    model: Any  # SCEModel
    pretraining: Any | None  # SCEForPreTraining
    preset: str
    processor_preset: str
    info: dict[str, Any]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_config(
    checkpoint: OfficialCheckpoint, preset: str | None = None, source: str = "checkpoint"
) -> tuple[SCEConfig, str]:
    """The `SCEConfig` of a checkpoint: trunk read from its keys, heads from its heads (else the preset's)."""
    architecture = infer_trunk_architecture(checkpoint.trunk, source)
    inferred = architecture["preset"]
    if preset is None:
        preset = inferred
    elif preset not in PRESETS:
        raise CheckpointError(f"Unknown preset {preset!r}; choose one of {PRESETS}.")
    elif preset != inferred:
        raise CheckpointError(
            f"{source} holds a {inferred} trunk ({architecture['layer_type']} blocks, depths {architecture['depths']}, "
            f"{'3x3 small-input' if architecture['small_input_stem'] else '7x7'} stem), not a {preset}: "
            f"pass --preset {inferred} or omit --preset."
        )
    overrides: dict[str, Any] = {}
    if checkpoint.has_heads:
        overrides.update(infer_head_config(checkpoint.projector, checkpoint.predictor, source))
        if checkpoint.queue is not None:
            if checkpoint.queue.ndim != 2 or checkpoint.queue.shape[0] != overrides["projector_output_size"]:
                raise CheckpointError(
                    f"{source}: `queue` has shape {tuple(checkpoint.queue.shape)}; expected (d, K) with d = "
                    f"{overrides['projector_output_size']}, the projector's output size."
                )
            overrides["queue_size"] = int(checkpoint.queue.shape[1])
        else:
            overrides.update(queue_size=0, in_batch_keys=True)
    config = SCEConfig.from_preset(preset, backbone_config=backbone_config_for(architecture), **overrides)
    return config, preset


def convert_official_checkpoint(
    path_or_object: Any,
    preset: str | None = None,
    include_pretraining: bool = False,
    allow_unsafe_unpickling: bool = False,
) -> ConversionResult:
    """Convert one of the authors' checkpoint files (SCE_SPEC §9) into our models.

    Args:
        path_or_object: a trunk-only file or a Lightning checkpoint of their training code, as a path or already
            loaded with [`load_checkpoint`] (then `source_file` and `source_sha256` are left for the caller).
        preset: `SCEConfig` preset naming the SCE settings of the run (`resnet50`, `resnet18-small`, ...); by
            default the one matching the trunk. It must agree with the trunk read from the file.
        include_pretraining: also build an `SCEForPreTraining` with the student heads, the momentum teacher
            and the queue (Lightning checkpoints only).
        allow_unsafe_unpickling: see [`load_checkpoint`].

    Raises:
        CheckpointError: listing what could not be converted.
    """
    from .modeling_sce import SCEModel

    source, loaded = load_source(path_or_object, allow_unsafe_unpickling)
    checkpoint = split_checkpoint(loaded, source)
    if include_pretraining and not checkpoint.has_heads:
        raise CheckpointError(
            f"{source} is a {checkpoint.format} file without heads (no `projector.` keys): there is no pretraining "
            "state to export. Drop --include_pretraining, or pass a Lightning checkpoint of the authors' training code."
        )
    config, preset = build_config(checkpoint, preset, source)

    with torch.device("meta"):  # every tensor comes from the file: skip the random initialisation
        model = SCEModel(config)
    trunk_state, filled = convert_trunk_state_dict(checkpoint.trunk, model.state_dict(), "trunk.", source)
    _load_into(model, trunk_state, source)

    pretraining = None
    if include_pretraining:
        pretraining = _build_pretraining(checkpoint, config, trunk_state, source)

    info = {
        "source_file": source,
        "source_sha256": sha256_of(os.fspath(path_or_object)) if isinstance(path_or_object, (str, os.PathLike)) else None,
        "source_format": checkpoint.format,
        "preset": preset,
        "architecture": {
            k: v for k, v in infer_trunk_architecture(checkpoint.trunk, source).items() if k not in ("family", "preset")
        },
        "filled_num_batches_tracked": len(filled),
        "ignored_keys": checkpoint.ignored_keys,
        "heads_in_source": checkpoint.has_heads,
        "includes_pretraining": include_pretraining,
        "pretraining_dataset": PRESET_DATASETS.get(preset),
        **{
            f"lightning_{k.replace('-', '_')}": v for k, v in checkpoint.metadata.items() if k != "under_state_dict_key"
        },
        "under_state_dict_key": bool(checkpoint.metadata.get("under_state_dict_key")),
    }
    return ConversionResult(model=model, pretraining=pretraining, preset=preset,
                            processor_preset=PRESET_PROCESSORS[preset], info=info)


def _build_pretraining(checkpoint: OfficialCheckpoint, config: SCEConfig, trunk_state: dict, source: str):
    from .pretraining import SCEForPreTraining

    with torch.device("meta"):
        model = SCEForPreTraining(config)
    target = model.state_dict()
    if not checkpoint.momentum_trunk or not checkpoint.momentum_projector:
        raise CheckpointError(
            f"{source}: the teacher (`momentum_trunk.`, `momentum_projector.`) is missing; the pretraining state "
            "needs it."
        )

    def prefixed(prefix: str, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in values.items()}

    state = prefixed("sce", {k: v.clone() for k, v in trunk_state.items()})  # not shared with the exported encoder
    state.update(prefixed("projector", map_head_state_dict(checkpoint.projector, model.projector, "projector")))
    if config.predictor_num_layers:
        state.update(prefixed("predictor", map_head_state_dict(checkpoint.predictor, model.predictor, "predictor")))
    teacher_target = {k[len("teacher_encoder."):]: v for k, v in target.items() if k.startswith("teacher_encoder.")}
    teacher_trunk, _ = convert_trunk_state_dict(
        checkpoint.momentum_trunk, teacher_target, "trunk.", f"{source} (momentum_trunk)"
    )
    state.update(prefixed("teacher_encoder", teacher_trunk))
    state.update(prefixed("teacher_projector", map_head_state_dict(
        checkpoint.momentum_projector, model.teacher_projector, "momentum_projector")))
    if checkpoint.queue is not None:
        state["queue"] = checkpoint.queue.detach().t().contiguous().to(target["queue"].dtype)  # (d, K) -> (K, d) rows
        pointer = int(checkpoint.queue_ptr.reshape(-1)[0]) if checkpoint.queue_ptr is not None else 0
        if not 0 <= pointer < config.queue_size:
            raise CheckpointError(
                f"{source}: `queue_ptr` = {pointer} is outside the queue of {config.queue_size} keys."
            )
        state["queue_ptr"] = torch.tensor(pointer, dtype=torch.long)
        # The file does not say how many keys were written; a trained run's queue is full of real keys.
        state["num_enqueued"] = torch.tensor(config.queue_size, dtype=torch.long)
    else:
        state["queue"] = torch.zeros(target["queue"].shape)
        state["queue_ptr"] = torch.zeros((), dtype=torch.long)
        state["num_enqueued"] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the pretraining state does not fit SCEForPreTraining; missing {missing}, "
            f"unexpected {unexpected}."
        )
    _load_into(model, state, source)
    model.teacher_encoder.requires_grad_(False)
    model.teacher_projector.requires_grad_(False)
    return model


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a complete state dict into a model built on the meta device; every tensor must become real."""
    model.load_state_dict(state, strict=True, assign=True)
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise CheckpointError(f"{source}: no value for {on_meta} (tensors outside the state dict).")
    model.eval()


__all__ = [
    "CheckpointError",
    "ConversionResult",
    "OfficialCheckpoint",
    "UnsafeCheckpointError",
    "convert_official_checkpoint",
    "convert_trunk_state_dict",
    "infer_head_config",
    "infer_trunk_architecture",
    "load_checkpoint",
    "map_head_state_dict",
    "split_checkpoint",
    "torchvision_to_transformers_key",
    "transformers_to_torchvision_key",
]
