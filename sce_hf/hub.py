"""Export folders users download, their model cards, and the push to the Hugging Face Hub.

An export folder holds the encoder alone (what `AutoModel` loads): `config.json`, `model.safetensors`,
`preprocessor_config.json`, the remote-code files, `eval_results.json` and `README.md` (the model card), plus the
record of how the weights were made (`training_args.json` for our runs, `conversion.json` for converted
checkpoints). The pretraining heads, teacher and queue go in `pretraining/` for those who continue training.
Uploads take an allowlist of these files (plus `pretraining/` when asked), never `checkpoints/`.

The card is rendered from `model_cards/template.md` with `huggingface_hub.ModelCard`: its metadata carries a
`model-index` with every entry of `eval_results.json`, its body the training recipe, usage, limitations and
citations. A generated card carries a marker line; `export_pretrained` writes it and `add_eval_result` re-renders
it, and a README without the marker (written by hand) is never overwritten.
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

logger = logging.getLogger(__name__)

EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "configuration_sce.py",
    "modeling_sce.py",
    "modeling_resnet3d.py",
    "image_processing_sce.py",
    "eval_results.json",
    "training_args.json",
    "conversion.json",
    "README.md",
)
PRETRAINING_DIR = "pretraining"
EVAL_RESULTS_FILE = "eval_results.json"
TRAINING_ARGS_FILE = "training_args.json"
CONVERSION_FILE = "conversion.json"
README_FILE = "README.md"
# Remote-code files `save_pretrained` copies next to the weights (transformers' naming), uploaded with them.
REMOTE_CODE_PATTERN = re.compile(r"(configuration|modeling|image_processing|video_processing|processing)_\w+\.py")
CARD_MARKER = "sce-hf:generated-card"
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"
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
TASK_NAMES = {"image-classification": "Image Classification", "image-feature-extraction": "Image Retrieval"}
SCE_SETTINGS = (
    "coeff", "student_temperature", "teacher_temperature", "queue_size", "in_batch_keys", "exact_self_exclusion",
    "initial_momentum", "final_momentum", "momentum_schedule", "symmetric", "num_global_views",
    "split_batchnorm_groups", "shuffle_teacher_batch", "projector_num_layers", "projector_hidden_size",
    "projector_output_size", "projector_last_batchnorm", "projector_last_bias", "predictor_num_layers",
    "predictor_hidden_size", "small_input_stem", "pooling",
)
VIDEO_MODEL_TYPE = "r3d"  # the video trunk's model_type (modeling_resnet3d.py)
WALL_TIME_KEYS = ("wall_time_seconds", "wall_time_s", "train_runtime", "train_wall_time_seconds", "wall_time")


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_pretrained(
    model,
    processor,
    output_dir: str,
    training_args: dict | None = None,
    save_pretraining: bool = True,
    *,
    write_card: bool = True,
) -> None:
    """Write an encoder (from an `SCEForPreTraining`, an `SCEForImageClassification` or an `SCEModel`) and its
    processor as a Hub-ready folder, with its model card.

    Args:
        model: the model to export; its encoder goes to the folder's root.
        processor: the image processor saved with it (None: the ImageNet evaluation transform, with a warning).
        output_dir: the export folder (created if needed).
        training_args: the run's arguments, written to `training_args.json` (the card's training recipe).
        save_pretraining: for an `SCEForPreTraining`, also save it whole to `output_dir/pretraining/`.
        write_card: render `README.md` (a hand-written README, without the generated-card marker, is kept).
    """
    from .pretraining import SCEForPreTraining

    os.makedirs(output_dir, exist_ok=True)
    encoder = getattr(model, "sce", model)
    encoder.save_pretrained(output_dir)
    if processor is None:
        from .image_processing_sce import SCEImageProcessor

        logger.warning("No image processor given: exporting the ImageNet evaluation transform (256 -> 224).")
        processor = SCEImageProcessor()
    processor.save_pretrained(output_dir)
    if save_pretraining and isinstance(model, SCEForPreTraining):
        model.save_pretrained(os.path.join(output_dir, PRETRAINING_DIR))
    if training_args is not None:
        _write_json(os.path.join(output_dir, TRAINING_ARGS_FILE), training_args)
    if write_card:
        _refresh_card(output_dir, create=True)


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it.") from error


# ---------------------------------------------------------------------------------------------------------------
# Evaluation results


def read_eval_results(model_dir: str) -> list[dict]:
    """The list of results in `model_dir/eval_results.json` (empty when the file does not exist).

    Raises:
        ValueError: when the file is not a JSON list of objects with `task`, `dataset`, `metric` and `value`.
    """
    path = os.path.join(model_dir, EVAL_RESULTS_FILE)
    if not os.path.exists(path):
        return []
    results = _read_json(path)
    required = {"task", "dataset", "metric", "value"}
    if not isinstance(results, list) or not all(isinstance(r, dict) and required <= set(r) for r in results):
        raise ValueError(f"{path} must be a JSON list of objects with the keys {sorted(required)}; fix or delete it.")
    return results


def add_eval_result(model_dir: str, result: dict) -> list[dict]:
    """Add (or replace, when task, dataset, split and metric match) one result in `eval_results.json`.

    A generated model card in the folder is re-rendered with the new result.
    """
    results = read_eval_results(model_dir)
    same = lambda r: all(r.get(k) == result.get(k) for k in ("task", "dataset", "split", "metric"))  # noqa: E731
    results = [r for r in results if not same(r)] + [result]
    _write_json(os.path.join(model_dir, EVAL_RESULTS_FILE), results)
    _refresh_card(model_dir, create=False)
    return results


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


def eval_result_to_card(entry: Mapping[str, Any]):
    """One `eval_results.json` entry as a `huggingface_hub.EvalResult` (a `model-index` metric).

    The task type is `image-classification` for k-NN, linear probes and fine-tuning, `image-feature-extraction`
    for retrieval; the metric name says the protocol ("k-NN top-1 accuracy"), its args hold the settings.
    """
    from huggingface_hub import EvalResult

    task = str(entry["task"])
    task_type, task_label = TASKS.get(task, ("image-feature-extraction", task.replace("_", " ")))
    dataset = str(entry["dataset"])
    settings = entry.get("settings") or None
    return EvalResult(
        task_type=task_type,
        task_name=TASK_NAMES.get(task_type, task_type),
        dataset_type=dataset,
        dataset_name=KNOWN_DATASETS.get(dataset, (dataset, dataset))[1],
        dataset_split=entry.get("split"),
        metric_type=_metric_type(str(entry["metric"])),
        metric_name=f"{task_label} {_metric_label(str(entry['metric']))}",
        metric_value=entry["value"],
        metric_args=dict(settings) if settings else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Model card


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
        add("Data", f"`{data}`" + (f" (config `{config_name}`)" if config_name else "")
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
        lines.append(
            "Converted weights: the conversion is tested to reproduce a torchvision ResNet's pooled features to 1e-5; "
            "this card's evaluation section only lists what was measured on this export."
        )
    if config.get("backbone_config", {}).get("model_type") == "resnet":
        lines.append("Batch-norm statistics come from the pretraining data; fine-tuning on very different images may "
                     "need them re-estimated.")
    return lines


def _dataset_label(dataset: str | None, display: str | None) -> str:
    if not dataset:
        return "not recorded"
    return f"{display} (`{dataset}`)" if display and display != dataset else f"`{dataset}`"


def _demo_dataset(dataset: str | None, hub_dataset: str | None) -> str:
    """A dataset for the demo and evaluation commands: the training one, unless it is ImageNet-sized."""
    if not dataset or hub_dataset == "ILSVRC/imagenet-1k":
        return "DATASET"
    return hub_dataset if hub_dataset and _looks_like_hub_id(hub_dataset) else dataset


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
    hub_dataset, dataset_display = KNOWN_DATASETS.get(dataset, (dataset, dataset)) if dataset else (None, None)
    if dataset and dataset not in KNOWN_DATASETS and not _looks_like_hub_id(dataset):  # a local folder or file
        dataset_display = f"local data ({os.path.basename(os.path.normpath(dataset))})"
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
        eval_results=[eval_result_to_card(r) for r in results] or None,
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
            dataset=_cell(KNOWN_DATASETS.get(str(r["dataset"]), (r["dataset"], r["dataset"]))[1]),
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
        recipe_config=(training_args or {}).get("config"),
        recipe_summary=_recipe_summary(training_args or {}),
        training_args=[(k, _cell(v)) for k, v in sorted((training_args or {}).items())],
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
        FileNotFoundError: when the template is missing (it ships in the repository, not in the wheel).
        ValueError: when a record in the folder is not valid JSON or `config.json` is missing.
    """
    from huggingface_hub import ModelCard

    template = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template {template} not found: run from a checkout of the sce_hf repository "
            "(model_cards/template.md) or pass template_path."
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


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _refresh_card(model_dir: str, create: bool) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# Push


def upload_allowlist(model_dir: str, include_pretraining: bool = False) -> list[str]:
    """The files of `model_dir` a push uploads, relative to it (never `checkpoints/` or logs)."""
    files = [f for f in EXPORT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    files += sorted(
        f for f in os.listdir(model_dir)
        if REMOTE_CODE_PATTERN.fullmatch(f) and f not in files and os.path.isfile(os.path.join(model_dir, f))
    )
    pretraining = os.path.join(model_dir, PRETRAINING_DIR)
    if include_pretraining and os.path.isdir(pretraining):
        files += sorted(
            f"{PRETRAINING_DIR}/{f}" for f in os.listdir(pretraining)
            if os.path.isfile(os.path.join(pretraining, f)) and not f.endswith(".tmp")
        )
    return files


NO_TOKEN = "no Hugging Face token; pass --hub_token, set HF_TOKEN or run `hf auth login`."


class PushError(RuntimeError):
    """A push that did not happen, with one line saying why."""


def prepare_push(
    model_dir: str, hub_model_id: str, include_pretraining: bool = False, template_path: str | None = None
) -> tuple[list[tuple[str, str | bytes]], str | None]:
    """What a push uploads: `(path_in_repo, local path or bytes)` pairs, and the card text when it is rendered.

    A generated card (or a missing README) is rendered afresh for `hub_model_id`, in memory: the folder is not
    modified. A hand-written README is uploaded as it is.

    Raises:
        PushError: the folder is not an export, or its card cannot be rendered.
    """
    if not os.path.isdir(model_dir):
        raise PushError(
            f"{model_dir}: no such folder; pass the output folder of training or conversion as --model_dir."
        )
    files = upload_allowlist(model_dir, include_pretraining)
    missing = [f for f in ("config.json", "model.safetensors") if f not in files]
    if missing:
        raise PushError(f"{model_dir} is not an exported model folder ({', '.join(missing)} missing); export it first.")
    if include_pretraining and not any(f.startswith(PRETRAINING_DIR + "/") for f in files):
        raise PushError(f"--include_pretraining: {model_dir}/{PRETRAINING_DIR}/ holds no files.")
    readme = os.path.join(model_dir, README_FILE)
    card_text = None
    if not os.path.exists(readme) or is_generated_card(readme):
        try:
            card_text = str(render_model_card(model_dir, hub_model_id, template_path))
        except (OSError, ValueError) as error:
            raise PushError(f"cannot render the model card of {model_dir}: {_first_line(error)}") from error
        if not card_text.endswith("\n"):
            card_text += "\n"
        if README_FILE not in files:
            files.append(README_FILE)
    uploads: list[tuple[str, str | bytes]] = [
        (f, card_text.encode("utf-8") if f == README_FILE and card_text is not None else os.path.join(model_dir, f))
        for f in files
    ]
    return uploads, card_text


def _first_line(error: BaseException | str) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _push_error(error: Exception, repo: str) -> PushError:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return PushError(f"cannot push to {repo}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to push.")
    if isinstance(error, LocalTokenNotFoundError):
        return PushError(f"cannot push to {repo}: {NO_TOKEN}")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return PushError(f"the Hub rejected the token for {repo} (401 Unauthorized): pass a valid write token "
                             "with --hub_token or HF_TOKEN.")
        if status == 403:
            return PushError(f"the Hub refused the push to {repo} (403 Forbidden): the token cannot write to this "
                             "namespace.")
        code = f" ({status})" if status else ""
        return PushError(f"the Hub refused the push to {repo}{code}: {_first_line(error)}")
    if isinstance(error, (HTTPError, ConnectionError, TimeoutError)):
        return PushError(f"cannot reach the Hub at {constants.ENDPOINT} to push {repo} ({type(error).__name__}: "
                         f"{_first_line(error)}); check the network, proxy or HF_ENDPOINT.")
    return PushError(f"cannot push to {repo}: {type(error).__name__}: {_first_line(error)}")


def push_to_hub(
    model_dir: str,
    hub_model_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload SCE encoder",
    token: str | None = None,
    include_pretraining: bool = False,
    api=None,
    template_path: str | None = None,
) -> str:
    """Upload the allowlisted files of `model_dir` to `hub_model_id` in one commit; returns the commit URL.

    The card is re-rendered for `hub_model_id` in memory and uploaded; the folder is not touched unless the push
    succeeds, after which its generated README is updated to the card that was pushed.

    Args:
        model_dir: the export folder.
        hub_model_id: `ORG/NAME`; the repository is created (with `private`) when it does not exist.
        revision: a branch to commit to (created from `main` when missing); default `main`.
        include_pretraining: also upload `pretraining/` (heads, teacher, queue).
        api: an `HfApi`-like client (`create_repo`, `create_branch`, `create_commit`); default
            `huggingface_hub.HfApi(token=token)`.

    Raises:
        PushError: with one line naming the cause (not an export, offline mode, no token, refused, network).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if not isinstance(hub_model_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", hub_model_id):
        raise PushError(f"--hub_model_id must be ORG/NAME (or NAME, in your namespace), got {hub_model_id!r}.")
    uploads, card_text = prepare_push(model_dir, hub_model_id, include_pretraining, template_path)
    if api is None:
        if not constants.HF_HUB_OFFLINE and token is None and get_token() is None:
            raise PushError(f"cannot push to {hub_model_id}: {NO_TOKEN}")
        api = HfApi(token=token)
    try:
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=source) for path, source in uploads]
        api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(hub_model_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            hub_model_id, operations=operations, commit_message=commit_message, revision=revision, repo_type="model"
        )
    except Exception as error:  # noqa: BLE001 - every failure becomes one line for the user
        raise _push_error(error, hub_model_id) from error
    if card_text is not None:
        _write_text(os.path.join(model_dir, README_FILE), card_text)
    return str(getattr(info, "commit_url", info))


__all__ = [
    "CARD_MARKER",
    "EXPORT_FILES",
    "PushError",
    "add_eval_result",
    "eval_result_to_card",
    "export_pretrained",
    "is_generated_card",
    "prepare_push",
    "push_to_hub",
    "read_eval_results",
    "render_model_card",
    "upload_allowlist",
    "write_model_card",
]
