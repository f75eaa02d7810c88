"""Export folders users download, their evaluation records, and the push to the Hugging Face Hub.

An export folder holds the encoder alone (what `AutoModel` loads): `config.json`, `model.safetensors`,
`preprocessor_config.json`, the remote-code files, `eval_results.json` and `README.md` (the model card), plus the
record of how the weights were made (`training_args.json` for our runs, `conversion.json` for converted
checkpoints). The pretraining heads, teacher and queue go in `pretraining/` for those who continue training.
Uploads take an allowlist of these files (plus `pretraining/` when asked), never `checkpoints/`.

The model card is rendered by `sce_hf.model_card` (which reads these records): `export_pretrained` writes it,
`add_eval_result` re-renders it and a push renders it for the target repository. `model_card` imports this module,
so the functions here import it where they use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    from .model_card import refresh_model_card
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
        refresh_model_card(output_dir, create=True)


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


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


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
    for result in results:
        if isinstance(result["value"], bool) or not isinstance(result["value"], (int, float)):
            raise ValueError(f"{path}: the value of {result['task']} {result['metric']} must be a number, got "
                             f"{result['value']!r}; fix or delete the entry.")
    return results


def add_eval_result(model_dir: str, result: dict) -> list[dict]:
    """Add (or replace, when task, dataset, split and metric match) one result in `eval_results.json`.

    A generated model card in the folder is re-rendered with the new result.
    """
    from .model_card import refresh_model_card

    results = read_eval_results(model_dir)
    same = lambda r: all(r.get(k) == result.get(k) for k in ("task", "dataset", "split", "metric"))  # noqa: E731
    results = [r for r in results if not same(r)] + [result]
    _write_json(os.path.join(model_dir, EVAL_RESULTS_FILE), results)
    refresh_model_card(model_dir, create=False)
    return results


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
    from .model_card import is_generated_card, render_model_card

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
        if "/" not in hub_model_id:  # NAME in the token's namespace: the card's snippets need the full id
            hub_model_id = f"{api.whoami()['name']}/{hub_model_id}"
            uploads, card_text = prepare_push(model_dir, hub_model_id, include_pretraining, template_path)
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=source) for path, source in uploads]
        api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(hub_model_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            hub_model_id, operations=operations, commit_message=commit_message, revision=revision, repo_type="model"
        )
    except PushError:
        raise
    except Exception as error:  # noqa: BLE001 - every failure becomes one line for the user
        raise _push_error(error, hub_model_id) from error
    if card_text is not None:
        _write_text(os.path.join(model_dir, README_FILE), card_text)
    return str(getattr(info, "commit_url", info))


__all__ = [
    "EXPORT_FILES",
    "PushError",
    "add_eval_result",
    "export_pretrained",
    "prepare_push",
    "push_to_hub",
    "read_eval_results",
    "upload_allowlist",
]
