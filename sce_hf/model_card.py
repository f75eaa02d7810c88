"""Model cards of export folders, rendered from `model_cards/template.md` with `huggingface_hub.ModelCard`.

The card's metadata carries a `model-index` with every entry of `eval_results.json`; its body the training recipe
(`training_args.json`) or the conversion record (`conversion.json`), usage, limitations and citations. A generated
card carries a marker line: `export_pretrained` writes it, `add_eval_result` re-renders it, and a README without
the marker (written by hand) is never overwritten.

The template ships in wheels as `sce_hf/model_cards/template.md` (pyproject maps the repository's `model_cards/`
folder there); a checkout reads it from `model_cards/` directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .hub import CONVERSION_FILE, README_FILE, TRAINING_ARGS_FILE, _read_json, _write_text, read_eval_results


logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
_WHEEL_TEMPLATE = _PACKAGE_DIR / "model_cards" / "template.md"  # a wheel holds the template inside the package
DEFAULT_TEMPLATE = _WHEEL_TEMPLATE if _WHEEL_TEMPLATE.is_file() else _PACKAGE_DIR.parent / "model_cards" / "template.md"
CARD_MARKER = "sce-hf:generated-card"
DEFAULT_LICENSE = "apache-2.0"
PLACEHOLDER_REPO_ID = "ORG/NAME"
BASE_TAGS = ("sce", "self-supervised-learning", "contrastive-learning", "image-feature-extraction", "vision")
# The authors distribute their code under CeCILL 2.1; converted weights keep their terms.
AUTHORS_LICENSE = {
    "license": "other",
    "license_name": "cecill-2.1",
    "license_link": "https://cecill.info/licences/Licence_CeCILL_V2.1-en.html",
}

# Dataset names -> (Hub id or None, display name). Other names are shown as given.
KNOWN_DATASETS = {
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST"),
    "zalando-datasets/fashion_mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST"),
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10"),
    "uoft-cs/cifar10": ("uoft-cs/cifar10", "CIFAR-10"),
    "imagenet-1k": ("ILSVRC/imagenet-1k", "ImageNet-1k"),
    "ILSVRC/imagenet-1k": ("ILSVRC/imagenet-1k", "ImageNet-1k"),
    "kinetics400": (None, "Kinetics-400"),  # no canonical Hub copy
}
# eval_results.json task -> (model-index task type, label used in metric names)
TASKS = {
    "knn": ("image-classification", "k-NN"),
    "linear_probe": ("image-classification", "Linear probe"),
    "linear": ("image-classification", "Linear probe"),
    "finetune": ("image-classification", "Fine-tuning"),
    "retrieval": ("image-feature-extraction", "Retrieval"),
}
TASK_NAMES = {"image-classification": "Image Classification", "image-feature-extraction": "Image Retrieval",
              "video-classification": "Video Classification", "feature-extraction": "Video Retrieval"}
VIDEO_TASK_TYPES = {"image-classification": "video-classification", "image-feature-extraction": "feature-extraction"}
SCE_SETTINGS = (
    "coeff", "student_temperature", "teacher_temperature", "queue_size", "in_batch_keys", "exact_self_exclusion",
    "initial_momentum", "final_momentum", "momentum_schedule", "symmetric", "num_global_views",
    "split_batchnorm_groups", "shuffle_teacher_batch", "projector_num_layers", "projector_hidden_size",
    "projector_output_size", "projector_last_batchnorm", "projector_last_bias", "predictor_num_layers",
    "predictor_hidden_size", "small_input_stem", "pooling",
)
VIDEO_MODEL_TYPE = "r3d"  # the video trunk's model_type (modeling_resnet3d.py)
WALL_TIME_KEYS = ("wall_time_seconds", "wall_time_s", "train_runtime", "train_wall_time_seconds", "wall_time")


def _metric_label(metric: str) -> str:
    match = re.fullmatch(r"top(\d+)_accuracy", metric)
    if match:
        return f"top-{match.group(1)} accuracy"
    match = re.fullmatch(r"recall_at_(\d+)", metric)
    if match:
        return f"recall@{match.group(1)}"
    return metric.replace("_", " ")


def _metric_type(metric: str) -> str:
    if metric.endswith("accuracy"):
        return "accuracy"
    if metric.startswith("recall_at_"):
        return "recall"
    return metric


def _is_local_path(dataset: str) -> bool:
    """Whether a recorded dataset is a folder or file of the training machine (not a name or a Hub id)."""
    return (dataset not in KNOWN_DATASETS and not _looks_like_hub_id(dataset)
            and any(sep in dataset for sep in ("/", os.sep)))


def dataset_identity(dataset: str) -> tuple[str, str]:
    """`(model-index dataset type, display name)` of a recorded dataset: a Hub id where one is known, else the
    name as given; a local folder or file is shown by its last path component (a card never publishes a local
    path)."""
    if dataset in KNOWN_DATASETS:
        hub_id, display = KNOWN_DATASETS[dataset]
        return hub_id or dataset, display
    if not _is_local_path(dataset):
        return dataset, dataset
    name = os.path.basename(os.path.normpath(dataset)) or "data"
    return name, f"local data ({name})"


def eval_result_to_card(entry: Mapping[str, Any], modality: str = "image"):
    """One `eval_results.json` entry as a `huggingface_hub.EvalResult` (a `model-index` metric).

    The task type is `image-classification` (`video-classification` for video encoders) for k-NN, linear probes
    and fine-tuning, `image-feature-extraction` (`feature-extraction`) for retrieval; the metric name says the
    protocol ("k-NN top-1 accuracy"), its args hold the settings.
    """
    from huggingface_hub import EvalResult

    task = str(entry["task"])
    task_type, task_label = TASKS.get(task, ("image-feature-extraction", task.replace("_", " ")))
    if modality == "video":
        task_type = VIDEO_TASK_TYPES[task_type]
    dataset_type, dataset_name = dataset_identity(str(entry["dataset"]))
    settings = entry.get("settings") or None
    return EvalResult(
        task_type=task_type,
        task_name=TASK_NAMES.get(task_type, task_type),
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=entry.get("split"),
        metric_type=_metric_type(str(entry["metric"])),
        metric_name=f"{task_label} {_metric_label(str(entry['metric']))}",
        metric_value=entry["value"],
        metric_args=dict(settings) if settings else None,
    )


def is_generated_card(path: str) -> bool:
    """Whether the README at `path` was generated by this module (it carries the marker line)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return CARD_MARKER in handle.read()
    except FileNotFoundError:
        return False


def _card_repo_id(model_dir: str) -> str | None:
    """The Hub id a previous card was rendered for, or the run's `--hub_model_id`."""
    readme = os.path.join(model_dir, README_FILE)
    if is_generated_card(readme):
        with open(readme, encoding="utf-8") as handle:
            match = re.search(re.escape(CARD_MARKER) + r" repo_id=(\S+)", handle.read())
        if match:
            return match.group(1)
    args_path = os.path.join(model_dir, TRAINING_ARGS_FILE)
    if os.path.isfile(args_path):
        value = _read_json(args_path).get("hub_model_id")
        if isinstance(value, str) and value:
            return value
    return None


def _looks_like_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None
        and not os.path.exists(value)
    )


def _num_parameters(path: str) -> int | None:
    """Number of parameters (batch-norm statistics excluded) in a safetensors file, read from its header."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__" and not k.endswith(buffers))


def _human(count: int | None) -> str:
    if count is None:
        return "an unknown number of"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _trunk_description(config: Mapping[str, Any]) -> tuple[str, str]:
    """(short name, one-line description) of the trunk in `config.json`."""
    backbone = config.get("backbone_config") or {}
    model_type = backbone.get("model_type", "unknown")
    if model_type == VIDEO_MODEL_TYPE:
        layer_type, depths = backbone.get("layer_type"), list(backbone.get("depths") or [])
        name = f"R3D-{sum(depths) * (3 if layer_type == 'bottleneck' else 2) + 2}"
        return name, (f"{name} (slow-only 3-D ResNet, {layer_type} blocks, depths {depths}, widths "
                      f"{backbone.get('hidden_sizes')}); input clips (batch, frames, 3, height, width)")
    if model_type == "resnet":
        layer_type, depths = backbone.get("layer_type"), list(backbone.get("depths") or [])
        widths = list(backbone.get("hidden_sizes") or [])
        block = 3 if layer_type == "bottleneck" else 2
        name = f"ResNet-{sum(depths) * block + 2}"
        standard = [256, 512, 1024, 2048] if layer_type == "bottleneck" else [64, 128, 256, 512]
        width_note = "" if widths == standard else f", widths {widths}"
        stem = "3x3 stride-1 stem, no max-pool (small inputs)" if config.get("small_input_stem") else "7x7 stem"
        v15 = layer_type == "bottleneck" and not backbone.get("downsample_in_bottleneck")
        v15 = ", torchvision v1.5 layout" if v15 else ""
        return name, f"{name} ({layer_type} blocks, depths {depths}{width_note}, {stem}{v15})"
    return model_type, f"a transformers `{model_type}` trunk"


def _preprocessing(processor: Mapping[str, Any]) -> tuple[str, int | None]:
    if not processor:
        return "no `preprocessor_config.json` (use the processor the model was trained with)", None
    size = (processor.get("size") or {}).get("shortest_edge")
    crop = (processor.get("crop_size") or {}).get("height")
    parts = []
    if processor.get("do_convert_rgb", True):
        parts.append("RGB")
    if processor.get("do_resize") and size:
        parts.append(f"shorter side resized to {size} px")
    if processor.get("do_center_crop") and crop:
        parts.append(f"centre crop {crop}x{crop}")
    if processor.get("do_normalize"):
        mean = [round(v, 4) for v in processor.get("image_mean", [])]
        std = [round(v, 4) for v in processor.get("image_std", [])]
        parts.append(f"normalised with mean {mean}, std {std}")
    return ", ".join(parts), crop


def _cell(value: Any) -> str:
    """A value as a markdown table cell."""
    if isinstance(value, (dict, list, tuple, bool, float)) or value is None:
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} ({seconds:.0f} s)"


def _recipe_summary(args: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []

    def add(name: str, value: Any) -> None:
        if value not in (None, "", []):
            rows.append((name, _cell(value) if not isinstance(value, str) else value.replace("|", "\\|")))

    data = args.get("dataset_name") or args.get("train_dir")
    if data:
        config_name = args.get("dataset_config_name")
        add("Data", f"`{_without_local_path(data)}`" + (f" (config `{config_name}`)" if config_name else "")
            + (f", split `{args['train_split']}`" if args.get("train_split") else "")
            + (f", first {args['max_train_samples']} images" if args.get("max_train_samples") else ""))
    add("Preset", args.get("preset"))
    if args.get("backbone_config"):
        add("Trunk overrides", args["backbone_config"])
    add("Epochs (`num_train_epochs`)", args.get("num_train_epochs"))
    add("Optimizer steps (`max_train_steps`)", args.get("max_train_steps"))
    for key, label in (("completed_steps", "Completed steps"), ("epochs_completed", "Completed epochs")):
        add(label, args.get(key))
    per_device = args.get("per_device_train_batch_size")
    if args.get("global_batch_size") is not None:
        detail = ""
        if per_device is not None:
            detail = (f" ({per_device} per device x {args.get('num_processes', 1)} processes x "
                      f"{args.get('gradient_accumulation_steps', 1)} accumulation)")
        add("Global batch", f"{args['global_batch_size']}{detail}")
    if args.get("optimizer"):
        lr = f"base {args.get('base_learning_rate')} x batch / 256"
        if args.get("peak_learning_rate") is not None:
            lr += f" = {args['peak_learning_rate']:.4g}" if isinstance(args["peak_learning_rate"], (int, float)) else ""
        add("Optimizer", f"{args['optimizer']}, lr {lr}, weight decay {args.get('weight_decay')}, "
            f"momentum {args.get('sgd_momentum')}, {args.get('warmup_epochs')} warm-up epochs, cosine decay")
    add("Augmentation", args.get("augmentation"))
    add("Mixed precision", args.get("mixed_precision"))
    hardware = args.get("hardware") or args.get("device")
    if hardware:
        add("Hardware", f"{hardware}" + (f", {args['num_processes']} process(es)" if args.get("num_processes") else ""))
    wall = next((args[k] for k in WALL_TIME_KEYS if args.get(k) is not None), None)
    add("Wall time", _duration(wall) if wall is not None else "not recorded")
    add("Seed", args.get("seed"))
    add("sce_hf version", args.get("sce_hf_version"))
    return rows


def _limitations(config: Mapping[str, Any], crop: int | None, dataset: str | None, origin: str) -> list[str]:
    lines = []
    if crop is not None and crop < 64:
        lines.append(
            f"Trained for {crop} px inputs: larger images are resized down by the processor, so fine detail is lost; "
            "the features suit small, centred objects."
        )
    if dataset and KNOWN_DATASETS.get(dataset, ("", ""))[1] == "Fashion-MNIST":
        lines.append(
            "Pretrained on Fashion-MNIST (28 px grayscale clothing): a small demonstration model; its features do "
            "not transfer to natural photographs."
        )
    if origin == "converted":
        reference = ("a pytorchvideo-named R3D's" if config.get("backbone_config", {}).get("model_type") == VIDEO_MODEL_TYPE
                     else "a torchvision ResNet's")
        lines.append(
            f"Converted weights: the conversion is tested to reproduce {reference} pooled features to 1e-5; "
            "this card's evaluation section only lists what was measured on this export."
        )
    if config.get("backbone_config", {}).get("model_type") == "resnet":
        lines.append("Batch-norm statistics come from the pretraining data; fine-tuning on very different images may "
                     "need them re-estimated.")
    return lines


def _without_local_path(value: Any) -> Any:
    """An absolute local path as `…/last-component` (the card is public; the folders of the machine are not)."""
    if isinstance(value, str) and os.path.isabs(value) and not _looks_like_hub_id(value):
        return f"…/{os.path.basename(os.path.normpath(value))}"
    return value


def _dataset_label(dataset: str | None, display: str | None) -> str:
    if not dataset:
        return "not recorded"
    if _is_local_path(dataset):  # its name only
        return display
    return f"{display} (`{dataset}`)" if display and display != dataset else f"`{dataset}`"


def _demo_dataset(dataset: str | None, hub_dataset: str | None) -> str:
    """A dataset for the demo and evaluation commands: the training one, unless it is ImageNet-sized."""
    if not dataset or hub_dataset == "ILSVRC/imagenet-1k":
        return "DATASET"
    if hub_dataset and _looks_like_hub_id(hub_dataset):
        return hub_dataset
    return "DATASET" if _is_local_path(dataset) else dataset


def _card_inputs(model_dir: str, repo_id: str | None) -> tuple[Any, dict[str, Any]]:
    """The `ModelCardData` and the template variables of a folder."""
    from huggingface_hub import ModelCardData

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{model_dir} has no config.json: it is not an exported model folder (run export_pretrained first)."
        )
    config = _read_json(config_path)
    processor_path = os.path.join(model_dir, "preprocessor_config.json")
    processor = _read_json(processor_path) if os.path.isfile(processor_path) else {}
    args_path = os.path.join(model_dir, TRAINING_ARGS_FILE)
    training_args = _read_json(args_path) if os.path.isfile(args_path) else None
    conversion_path = os.path.join(model_dir, CONVERSION_FILE)
    conversion = _read_json(conversion_path) if os.path.isfile(conversion_path) else None
    results = read_eval_results(model_dir)

    origin = "converted" if conversion else "trained" if training_args is not None else "unknown"
    repo_id = repo_id or _card_repo_id(model_dir)
    model_name = (repo_id or os.path.basename(os.path.abspath(model_dir))).split("/")[-1]
    trunk_name, trunk_description = _trunk_description(config)

    dataset = None
    if training_args:
        dataset = training_args.get("dataset_name") or training_args.get("train_dir")
    elif conversion:
        dataset = conversion.get("pretraining_dataset")
    hub_dataset, dataset_display = dataset_identity(dataset) if dataset else (None, None)
    datasets = [hub_dataset] if hub_dataset and _looks_like_hub_id(hub_dataset) else None

    base_model = None
    if training_args and _looks_like_hub_id(training_args.get("model_name_or_path")):
        base_model = training_args["model_name_or_path"]

    tags = list(BASE_TAGS)
    model_type = (config.get("backbone_config") or {}).get("model_type")
    modality = "video" if model_type == VIDEO_MODEL_TYPE else "image"
    if modality == "video":
        tags = [t for t in tags if t != "image-feature-extraction"] + ["video"]
    if model_type:
        tags.append(model_type)
    if config.get("auto_map"):
        tags.append("custom_code")
    if origin == "converted":
        tags.append("converted-checkpoint")
    metrics = sorted({_metric_type(str(r["metric"])) for r in results}) or None
    license_fields = dict(AUTHORS_LICENSE) if origin == "converted" else {"license": DEFAULT_LICENSE}
    if training_args and training_args.get("license"):
        license_fields = {"license": training_args["license"]}

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction" if modality == "image" else None,  # no video feature pipeline
        tags=tags,
        datasets=datasets,
        metrics=metrics,
        base_model=base_model,
        model_name=model_name if results else None,
        eval_results=[eval_result_to_card(r, modality) for r in results] or None,
        **license_fields,
    )

    preprocessing, crop = _preprocessing(processor)
    backbone = config.get("backbone_config") or {}
    feature_dim = (backbone.get("hidden_sizes") or [None])[-1] or backbone.get("hidden_size")
    version = (training_args or {}).get("sce_hf_version") or (conversion or {}).get("sce_hf_version")
    if version is None:
        from . import __version__ as version
    title = f"SCE {trunk_name}" + (f" pretrained on {dataset_display}" if dataset_display else "")
    rows = [
        dict(
            task=TASKS.get(str(r["task"]), ("", str(r["task"])))[1],
            dataset=_cell(dataset_identity(str(r["dataset"]))[1]),
            split=_cell(r.get("split") or ""),
            metric=_metric_label(str(r["metric"])),
            value=_cell(r["value"]),
            settings=", ".join(
                f"{k}={_cell(v)}" for k, v in sorted((r.get("settings") or {}).items()) if v is not None
            ),
        )
        for r in results
    ]
    conversion_rows = []
    if conversion:
        labels = [("source_file", "Source file"), ("source_sha256", "SHA-256"), ("source_format", "Format"),
                  ("preset", "Preset"), ("architecture", "Trunk read from the file"),
                  ("filled_num_batches_tracked", "`num_batches_tracked` filled with 0"),
                  ("ignored_keys", "Skipped buffers (augmentation modules)"),
                  ("lightning_epoch", "Epoch (Lightning)"), ("lightning_global_step", "Global step (Lightning)"),
                  ("sce_hf_version", "Converted with sce_hf")]
        conversion_rows = [
            (label, _cell(conversion[key])) for key, label in labels if conversion.get(key) not in (None, [], "")
        ]
    context = dict(
        marker=CARD_MARKER + (f" repo_id={repo_id}" if repo_id else ""),
        title=title,
        origin=origin,
        modality=modality,
        num_frames=processor.get("num_frames"),
        repo_id=repo_id or PLACEHOLDER_REPO_ID,
        trunk_description=trunk_description,
        feature_dim=feature_dim,
        num_parameters=_human(_num_parameters(os.path.join(model_dir, "model.safetensors"))),
        preprocessing=preprocessing,
        dataset_label=_dataset_label(dataset, dataset_display),
        demo_dataset=_demo_dataset(dataset, hub_dataset),
        sce_hf_version=version,
        results=rows,
        recipe_config=_without_local_path((training_args or {}).get("config")),
        recipe_summary=_recipe_summary(training_args or {}),
        training_args=[(k, _cell(_without_local_path(v))) for k, v in sorted((training_args or {}).items())],
        sce_settings=[(k, _cell(config[k])) for k in SCE_SETTINGS if k in config],
        conversion=conversion,
        conversion_rows=conversion_rows,
        limitations=_limitations(config, crop, dataset, origin),
    )
    return card_data, context


def render_model_card(model_dir: str, hub_model_id: str | None = None, template_path: str | None = None):
    """The model card of an export folder, rendered from `model_cards/template.md` (a `huggingface_hub.ModelCard`).

    Args:
        model_dir: the export folder (`config.json` at least; every other record is optional).
        hub_model_id: the repository the card is for (usage snippets, `model-index` name); default: the one a
            previous card was rendered for, else the run's `hub_model_id`, else a placeholder.
        template_path: another Jinja template.

    Raises:
        FileNotFoundError: when the template is missing.
        ValueError: when a record in the folder is not valid JSON or `config.json` is missing.
    """
    from huggingface_hub import ModelCard

    template = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template {template} not found: reinstall sce-hf (wheels ship it as "
            "sce_hf/model_cards/template.md) or pass template_path."
        )
    card_data, context = _card_inputs(model_dir, hub_model_id)
    card = ModelCard.from_template(card_data, template_path=str(template), **context)
    card.content = re.sub(r"\n{3,}", "\n\n", card.content)  # tidy blank runs left by template conditionals
    return card


def write_model_card(
    model_dir: str, hub_model_id: str | None = None, *, overwrite: bool = False, template_path: str | None = None
) -> bool:
    """Render the card into `model_dir/README.md`; returns whether it was written.

    A README without the generated-card marker (a hand-written one) is kept unless `overwrite`.
    """
    path = os.path.join(model_dir, README_FILE)
    if os.path.exists(path) and not is_generated_card(path) and not overwrite:
        logger.info("%s was written by hand (no generated-card marker): keeping it.", path)
        return False
    card = render_model_card(model_dir, hub_model_id, template_path)
    _write_text(path, str(card))
    return True


def refresh_model_card(model_dir: str, create: bool) -> None:
    """Re-render a generated card (or create one, when `create` or the folder holds our records); never raises:
    the weights and results are already saved, and `training/push_to_hub.py` renders the card again."""
    readme = os.path.join(model_dir, README_FILE)
    records = any(os.path.isfile(os.path.join(model_dir, f)) for f in (TRAINING_ARGS_FILE, CONVERSION_FILE))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    if not (is_generated_card(readme) or (not os.path.exists(readme) and (create or records))):
        return
    try:
        write_model_card(model_dir)
    except Exception as error:  # noqa: BLE001 - a card problem must not lose a finished run
        logger.warning("Could not render the model card of %s (%s: %s); the weights and results are saved. "
                       "See `python training/push_to_hub.py --model_dir %s --hub_model_id ORG/NAME --dry_run`.",
                       model_dir, type(error).__name__, error, model_dir)


__all__ = [
    "CARD_MARKER",
    "DEFAULT_TEMPLATE",
    "dataset_identity",
    "eval_result_to_card",
    "is_generated_card",
    "refresh_model_card",
    "render_model_card",
    "write_model_card",
]
