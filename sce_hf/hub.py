"""Export folders users download, their model cards, and the push to the Hugging Face Hub.

An export folder holds the encoder alone (what `AutoModel` loads): `config.json`, `model.safetensors`,
`preprocessor_config.json`, the remote-code files, `eval_results.json` and `README.md`; the pretraining heads,
teacher and queue go in `pretraining/` for those who continue training. Uploads take an allowlist of these
files (plus `pretraining/` when asked), never `checkpoints/`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)

EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "configuration_sce.py",
    "modeling_sce.py",
    "modeling_resnet3d.py",
    "image_processing_sce.py",
    "eval_results.json",
    "training_args.json",
    "README.md",
)
PRETRAINING_DIR = "pretraining"
EVAL_RESULTS_FILE = "eval_results.json"


def export_pretrained(model, processor, output_dir: str, training_args: dict | None = None, save_pretraining: bool = True) -> None:
    """Write the encoder of an `SCEForPreTraining` (or an `SCEModel`) and its processor as a Hub-ready folder.

    With `save_pretraining`, the whole pretraining model goes to `output_dir/pretraining/`.
    """
    os.makedirs(output_dir, exist_ok=True)
    encoder = getattr(model, "sce", model)
    encoder.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if save_pretraining and encoder is not model:
        model.save_pretrained(os.path.join(output_dir, PRETRAINING_DIR))
    if training_args is not None:
        _write_json(os.path.join(output_dir, "training_args.json"), training_args)


def read_eval_results(model_dir: str) -> list[dict]:
    """The list of results in `model_dir/eval_results.json` (empty when the file does not exist).

    Raises:
        ValueError: when the file is not a JSON list of objects with `task`, `dataset`, `metric` and `value`.
    """
    path = os.path.join(model_dir, EVAL_RESULTS_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it.") from error
    required = {"task", "dataset", "metric", "value"}
    if not isinstance(results, list) or not all(isinstance(r, dict) and required <= set(r) for r in results):
        raise ValueError(f"{path} must be a JSON list of objects with the keys {sorted(required)}; fix or delete it.")
    return results


def add_eval_result(model_dir: str, result: dict) -> list[dict]:
    """Add (or replace, when task, dataset, split and metric match) one result in `eval_results.json`."""
    results = read_eval_results(model_dir)
    same = lambda r: all(r.get(k) == result.get(k) for k in ("task", "dataset", "split", "metric"))  # noqa: E731
    results = [r for r in results if not same(r)] + [result]
    _write_json(os.path.join(model_dir, EVAL_RESULTS_FILE), results)
    return results


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def upload_allowlist(model_dir: str, include_pretraining: bool = False) -> list[str]:
    """The files of `model_dir` a push uploads, relative to it."""
    files = [f for f in EXPORT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    pretraining = os.path.join(model_dir, PRETRAINING_DIR)
    if include_pretraining and os.path.isdir(pretraining):
        files += sorted(os.path.join(PRETRAINING_DIR, f) for f in os.listdir(pretraining) if os.path.isfile(os.path.join(pretraining, f)))
    return files


class PushError(RuntimeError):
    """A push that did not happen, with one line saying why."""


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
) -> str:
    """Upload the allowlisted files of `model_dir` to `hub_model_id` in one commit; returns the commit URL.

    `api` defaults to `huggingface_hub.HfApi(token=token)`. The local folder is never modified.

    Raises:
        PushError: with one line naming the cause (offline mode, no token, refused, network).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    files = upload_allowlist(model_dir, include_pretraining)
    if "model.safetensors" not in files or "config.json" not in files:
        raise PushError(f"{model_dir} is not an exported model folder (config.json and model.safetensors missing).")
    api = api or HfApi(token=token)
    try:
        api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(hub_model_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=hub_model_id,
            folder_path=model_dir,
            allow_patterns=files,
            revision=revision,
            commit_message=commit_message,
        )
    except OfflineModeIsEnabled as error:
        raise PushError(f"cannot push to {hub_model_id}: offline mode is on (unset HF_HUB_OFFLINE to push).") from error
    except HfHubHTTPError as error:
        raise PushError(f"the Hub refused the push to {hub_model_id}: {str(error).splitlines()[0]}") from error
    except Exception as error:  # network errors (httpx), missing token, ...
        raise PushError(f"cannot push to {hub_model_id}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    return str(getattr(info, "commit_url", info))


__all__ = [
    "EXPORT_FILES",
    "PushError",
    "add_eval_result",
    "export_pretrained",
    "push_to_hub",
    "read_eval_results",
    "upload_allowlist",
]
