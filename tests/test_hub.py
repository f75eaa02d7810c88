"""Export folders, model cards, the push (against a recording stand-in for `HfApi`, and the real client offline),
and loading an export by Hub id from a Hugging Face cache laid out by hand."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled
from PIL import Image

from sce_hf import SCEForPreTraining, SCEImageProcessor, SCEModel
from sce_hf.hub import (
    PushError,
    add_eval_result,
    export_pretrained,
    push_to_hub,
    read_eval_results,
    upload_allowlist,
)
from sce_hf.model_card import CARD_MARKER
from tests.tiny import load_script, run_without_sce_hf, tiny_config

REPO = Path(__file__).resolve().parent.parent
http = importlib.import_module(HTTPError.__module__.split(".")[0])  # the HTTP client huggingface_hub uses (httpx2 or httpx)
TRAINING_ARGS = {
    "config": "training/configs/fashion-mnist-cpu.yaml", "dataset_name": "fashion_mnist", "train_split": "train",
    "eval_split": "test", "preset": "resnet18-small", "backbone_config": {"hidden_sizes": [12, 20]},
    "num_train_epochs": 8, "max_train_steps": 1872, "per_device_train_batch_size": 256, "num_processes": 1,
    "gradient_accumulation_steps": 1, "global_batch_size": 256, "optimizer": "sgd", "base_learning_rate": 0.06,
    "peak_learning_rate": 0.06, "weight_decay": 0.0005, "sgd_momentum": 0.9, "warmup_epochs": 1,
    "augmentation": "fashion-mnist", "mixed_precision": "bf16", "device": "cpu", "seed": 42, "sce_hf_version": "0.1.0",
    "wall_time_seconds": 1234.5, "hub_model_id": None, "push_to_hub": False,
}
RESULTS = [
    {"task": "knn", "dataset": "fashion_mnist", "split": "test", "metric": "top1_accuracy", "value": 87.1,
     "settings": {"k": 20, "temperature": 0.07, "bank_split": "train"}},
    {"task": "linear_probe", "dataset": "fashion_mnist", "split": "test", "metric": "top1_accuracy", "value": 88.42,
     "settings": {"epochs": 100, "learning_rate": 0.1}},
    {"task": "linear_probe", "dataset": "fashion_mnist", "split": "test", "metric": "top5_accuracy", "value": 99.5,
     "settings": {"epochs": 100, "learning_rate": 0.1}},
    {"task": "retrieval", "dataset": "uoft-cs/cifar10", "split": "test", "metric": "recall_at_1", "value": 41.0,
     "settings": {"centred": True}},
]
# What each entry must become in the model-index, spelled out here rather than taken from sce_hf.hub.
TASK_TYPES = {"knn": "image-classification", "linear_probe": "image-classification", "retrieval": "image-feature-extraction"}
METRIC_NAMES = {("knn", "top1_accuracy"): "k-NN top-1 accuracy", ("linear_probe", "top1_accuracy"): "Linear probe top-1 accuracy",
                ("linear_probe", "top5_accuracy"): "Linear probe top-5 accuracy", ("retrieval", "recall_at_1"): "Retrieval recall@1"}
METRIC_TYPES = {"top1_accuracy": "accuracy", "top5_accuracy": "accuracy", "recall_at_1": "recall"}
DATASET_TYPES = {"fashion_mnist": "zalando-datasets/fashion_mnist", "uoft-cs/cifar10": "uoft-cs/cifar10"}  # Hub ids


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def training_output(tmp_path) -> Path:
    """A folder as `training/pretrain.py` leaves it: the export, pretraining/, checkpoints/ and the train log."""
    out = tmp_path / "run"
    model = SCEForPreTraining(tiny_config())
    export_pretrained(model, SCEImageProcessor.from_preset("cifar10"), str(out), TRAINING_ARGS)
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"training state")
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model card


def test_card__model_index_equals_eval_results(training_output):
    for result in RESULTS:
        add_eval_result(str(training_output), result)
    add_eval_result(str(training_output), {**RESULTS[0], "value": 87.3})  # same task/dataset/split/metric: replaced
    entries = read_eval_results(str(training_output))
    assert len(entries) == len(RESULTS) and [e["value"] for e in entries if e["task"] == "knn"] == [87.3]

    card = ModelCard.load(training_output / "README.md")
    got = sorted(
        (r.task_type, r.dataset_type, r.dataset_split, r.metric_type, r.metric_name, r.metric_value, json.dumps(r.metric_args, sort_keys=True))
        for r in card.data.eval_results
    )
    expected = sorted(
        (TASK_TYPES[e["task"]], DATASET_TYPES[e["dataset"]], e["split"], METRIC_TYPES[e["metric"]], METRIC_NAMES[(e["task"], e["metric"])],
         e["value"], json.dumps(e["settings"], sort_keys=True))
        for e in entries
    )
    assert got == expected
    # The table in the body shows the same numbers.
    for entry in entries:
        assert f"**{entry['value']}**" in card.text


def test_card__metadata_recipe_usage_limitations_citations(training_output):
    card = ModelCard.load(training_output / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0" and data.datasets == ["zalando-datasets/fashion_mnist"]
    assert {"sce", "self-supervised-learning", "contrastive-learning", "image-feature-extraction", "custom_code"} <= set(data.tags)
    assert CARD_MARKER in card.text
    text = card.text
    for key, value in TRAINING_ARGS.items():  # every hyper-parameter of the run
        assert f"| `{key}` |" in text, key
    for fragment in ("Global batch | 256 (256 per device x 1 processes x 1 accumulation)", "Epochs (`num_train_epochs`) | 8", "Hardware | cpu",
                     "Wall time | 0:20:34", "sce_hf version | 0.1.0", "`coeff` | 0.5", "`teacher_temperature` | 0.07",
                     "--config training/configs/fashion-mnist-cpu.yaml"):
        assert fragment in text, fragment
    for fragment in ('AutoModel.from_pretrained("ORG/NAME", trust_remote_code=True)',
                     'pipeline("image-feature-extraction", model="ORG/NAME", trust_remote_code=True, pool=True)',
                     "AutoModelForImageClassification", "freeze_encoder=True",
                     "python demo/app.py --model_name_or_path ORG/NAME", "## Limitations",
                     "arxiv.org/abs/2111.14585", "2212.11187", "WACV", "Machine Vision and Applications",
                     "transformers (version 5 or later)"):
        assert fragment in text, fragment


def test_card__local_data_paths_are_not_published(tmp_path):
    out = tmp_path / "run"
    private = "/home/someone/private-data/shoes"
    args = {**TRAINING_ARGS, "dataset_name": None, "train_dir": private, "output_dir": "/home/someone/runs/shoes"}
    export_pretrained(SCEForPreTraining(tiny_config()), SCEImageProcessor.from_preset("cifar10"), str(out), args)
    add_eval_result(str(out), {"task": "knn", "dataset": private, "split": "test", "metric": "top1_accuracy", "value": 61.5})
    card = ModelCard.load(out / "README.md")
    assert "/home/someone" not in str(card), "a local path reached the public card"
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_name) == ("shoes", "local data (shoes)")
    assert "…/shoes" in card.text and "local data (shoes)" in card.text


def test_card__video_results_are_video_tasks(tmp_path):
    from tests.test_video_model import tiny_video_config

    out = tmp_path / "video"
    export_pretrained(SCEModel(tiny_video_config()), None, str(out), {**TRAINING_ARGS, "dataset_name": "ucf101"})
    add_eval_result(str(out), {"task": "linear_probe", "dataset": "ucf101", "split": "test", "metric": "top1_accuracy", "value": 50.0})
    add_eval_result(str(out), {"task": "retrieval", "dataset": "ucf101", "split": "test", "metric": "recall_at_1", "value": 40.0})
    types = {r.metric_name: r.task_type for r in ModelCard.load(out / "README.md").data.eval_results}
    assert types == {"Linear probe top-1 accuracy": "video-classification", "Retrieval recall@1": "feature-extraction"}


def test_card__without_results_says_so(training_output):
    card = ModelCard.load(training_output / "README.md")
    assert "No evaluation results yet" in card.text
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "**" not in card.text.split("## Evaluation results")[1].split("## How to use")[0]


def test_card__any_sce_model_exports_and_a_hand_written_readme_is_kept(tmp_path):
    out = tmp_path / "encoder"
    export_pretrained(SCEModel(tiny_config()), SCEImageProcessor(), str(out))
    assert "pretraining" not in os.listdir(out) and CARD_MARKER in (out / "README.md").read_text()
    assert "No training record" in (out / "README.md").read_text()
    (out / "README.md").write_text("# My own card\n")
    add_eval_result(str(out), RESULTS[0])
    export_pretrained(SCEModel(tiny_config()), SCEImageProcessor(), str(out))
    assert (out / "README.md").read_text() == "# My own card\n"


# ---------------------------------------------------------------------------------------------------------------
# Push, with a recording stand-in for HfApi


class RecordingApi:
    """Records the calls `push_to_hub` makes on an `HfApi`."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[tuple[str, str, dict]] = []
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def whoami(self):
        self.calls.append(("whoami", "", {}))
        return {"name": "someone"}

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, {**kwargs, "operations": list(operations)}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

    def call(self, name):
        return [c for c in self.calls if c[0] == name]


EXPECTED_DATA = {"config.json", "model.safetensors", "preprocessor_config.json", "eval_results.json", "training_args.json", "README.md"}


def expected_upload(folder: Path) -> set[str]:
    """The data files and every remote-code file `save_pretrained` copied (which depend on the package's modules)."""
    code = {f for f in os.listdir(folder) if f.endswith(".py")}
    assert {"configuration_sce.py", "modeling_sce.py", "image_processing_sce.py"} <= code
    return EXPECTED_DATA | code


def test_push__a_bare_name_goes_to_the_token_namespace_and_the_card_says_so(training_output):
    api = RecordingApi()
    push_to_hub(str(training_output), "sce-tiny", api=api)
    assert [c[1] for c in api.call("create_repo")] == ["someone/sce-tiny"]
    (commit,) = api.call("create_commit")
    (readme,) = [op.path_or_fileobj for op in commit[2]["operations"] if op.path_in_repo == "README.md"]
    assert b'from_pretrained("someone/sce-tiny"' in readme and b'"sce-tiny"' not in readme


def test_push__creates_the_repo_and_uploads_exactly_the_allowlist(training_output):
    add_eval_result(str(training_output), RESULTS[0])
    api = RecordingApi()
    url = push_to_hub(str(training_output), "org/sce-tiny", private=True, revision="v1", commit_message="First release", api=api)
    assert url == "https://huggingface.co/org/sce-tiny/commit/0123abc"
    [(_, repo, kwargs)] = api.call("create_repo")
    assert repo == "org/sce-tiny" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert [(c[1], c[2]["branch"]) for c in api.call("create_branch")] == [("org/sce-tiny", "v1")]
    [(_, repo, commit)] = api.call("create_commit")
    assert repo == "org/sce-tiny" and commit["revision"] == "v1" and commit["commit_message"] == "First release"
    paths = {op.path_in_repo for op in commit["operations"]}
    assert paths == expected_upload(training_output)
    readme = next(op for op in commit["operations"] if op.path_in_repo == "README.md").path_or_fileobj
    assert b'AutoModel.from_pretrained("org/sce-tiny"' in readme and b"name: sce-tiny" in readme
    assert (training_output / "README.md").read_bytes() == readme  # after a push, the folder holds the pushed card
    add_eval_result(str(training_output), RESULTS[1])  # a later result keeps the card's repository id
    assert 'AutoModel.from_pretrained("org/sce-tiny"' in (training_output / "README.md").read_text()

    # pretrain.py's call: public, default branch, and pretraining/ only when asked.
    api = RecordingApi()
    push_to_hub(str(training_output), "org/sce-tiny", private=False, token=None, commit_message="End of training", api=api)
    assert api.call("create_repo")[0][2]["private"] is False and not api.call("create_branch")
    assert api.call("create_commit")[0][2]["revision"] is None
    api = RecordingApi()
    push_to_hub(str(training_output), "org/sce-tiny", include_pretraining=True, api=api)
    paths = {op.path_in_repo for op in api.call("create_commit")[0][2]["operations"]}
    pretraining = {f"pretraining/{f}" for f in os.listdir(training_output / "pretraining")}
    assert {"pretraining/config.json", "pretraining/model.safetensors"} <= pretraining and paths - expected_upload(training_output) == pretraining
    assert not any(p.startswith("checkpoints") or p == "train_log.jsonl" for p in paths)
    assert "checkpoints/step_2/model.safetensors" not in upload_allowlist(str(training_output), include_pretraining=True)


def _http_error(status: int) -> HfHubHTTPError:
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error: refused\nmore details", response=http.Response(status, request=request))


@pytest.mark.parametrize("error, expected", [
    (OfflineModeIsEnabled("offline"), "offline mode is on"),
    (_http_error(401), "rejected the token"),
    (_http_error(403), "403 Forbidden"),
    (_http_error(500), "refused the push to org/sce-tiny (500)"),
    (http.ConnectError("[Errno 111] Connection refused"), "cannot reach the Hub"),
])
def test_push__failures_are_one_line_and_leave_the_folder_unchanged(training_output, error, expected):
    before = folder_hashes(training_output)
    with pytest.raises(PushError) as raised:
        push_to_hub(str(training_output), "org/sce-tiny", api=RecordingApi(fail_with=error))
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert folder_hashes(training_output) == before


def test_push__not_an_export(tmp_path):
    with pytest.raises(PushError, match="not an exported model folder"):
        push_to_hub(str(tmp_path), "org/x", api=RecordingApi())


def _push_script():
    return load_script("training/push_to_hub.py")


def test_push_script__offers_no_push_to_hub_flag(capsys):
    """Pushing is what the script does: a `--push_to_hub` switch there would only mislead."""
    with pytest.raises(SystemExit):
        _push_script().parse_args(["--model_dir", "x", "--hub_model_id", "org/name", "--push_to_hub"])
    assert "unrecognized arguments: --push_to_hub" in capsys.readouterr().err


def test_push_script__dry_run_lists_files_and_prints_the_card(training_output, capsys):
    add_eval_result(str(training_output), RESULTS[0])
    before = folder_hashes(training_output)
    assert _push_script().main(["--model_dir", str(training_output), "--hub_model_id", "org/sce-tiny", "--dry_run",
                                "--hub_private_repo", "--revision", "v2"]) == 0
    out = capsys.readouterr().out
    assert "org/sce-tiny (private, revision v2" in out
    listed = {line.split()[0] for line in out.split("----- README.md -----")[0].splitlines() if line.startswith("  ")}
    assert listed == expected_upload(training_output)
    card = out.split("----- README.md -----\n", 1)[1]
    assert card.startswith("---\n") and "model-index" in card and "value: 87.1" in card and "org/sce-tiny" in card
    assert folder_hashes(training_output) == before


def test_push_script__offline_real_client_fails_with_one_line(training_output):
    before = folder_hashes(training_output)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_not_a_real_token")
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "push_to_hub.py"), "--model_dir", str(training_output),
         "--hub_model_id", "org/sce-tiny", "--hub_private_repo"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "offline" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert folder_hashes(training_output) == before


# ---------------------------------------------------------------------------------------------------------------
# Loading by Hub id from a cache laid out by hand


_LOAD_BY_ID = textwrap.dedent(
    """
    import os
    import torch
    from PIL import Image
    from huggingface_hub import hf_hub_download
    from transformers import AutoModel, pipeline

    repo_id, snapshot, inputs_path, image_path, outputs_path = sys.argv[1:6]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    resolved = hf_hub_download(repo_id, "config.json")  # the hand-laid cache resolves
    assert os.path.samefile(os.path.dirname(resolved), snapshot), (resolved, snapshot)
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        pooled = model(torch.load(inputs_path)).pooler_output
    extractor = pipeline("image-feature-extraction", model=repo_id, trust_remote_code=True, pool=True)
    from_pipeline = torch.as_tensor(extractor(Image.open(image_path)))
    torch.save({"pooled": pooled, "pipeline": from_pipeline}, outputs_path)
    """
)


def test_load_by_hub_id_from_a_hand_laid_cache(tmp_path):
    model = SCEModel(tiny_config()).eval()
    processor = SCEImageProcessor.from_preset("cifar10")
    export = tmp_path / "export"
    export_pretrained(model, processor, str(export))
    add_eval_result(str(export), RESULTS[0])

    hf_home, commit = tmp_path / "hf_home", "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--org--sce-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in upload_allowlist(str(export)):
        shutil.copy(export / name, snapshot / name)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "inputs.pt")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    run_without_sce_hf(_LOAD_BY_ID, "org/sce-tiny", snapshot, tmp_path / "inputs.pt", tmp_path / "image.png",
                       tmp_path / "outputs.pt", cwd=tmp_path, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(outputs["pooled"], model(x).pooler_output, atol=1e-5, rtol=0)
        expected = model(**processor(Image.open(tmp_path / "image.png"), return_tensors="pt")).pooler_output
    torch.testing.assert_close(outputs["pipeline"].reshape(expected.shape), expected, atol=1e-5, rtol=0)
