"""The wheel users `pip install` works outside the checkout: it carries the model card template and writes cards."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Run in a process whose `sce_hf` is the installed wheel: PYTHONPATH comes before the checkout's editable install,
# and the checkout (after it) only provides `tests.tiny`.
EXPORT_WITH_INSTALLED_WHEEL = """
import json, sys
import sce_hf
from sce_hf import SCEForPreTraining, SCEImageProcessor
from sce_hf.hub import add_eval_result, export_pretrained
from tests.tiny import tiny_config

assert sce_hf.__file__.startswith(sys.argv[1]), sce_hf.__file__
export_pretrained(SCEForPreTraining(tiny_config()), SCEImageProcessor.from_preset("cifar10"), sys.argv[2],
                  {"dataset_name": "fashion_mnist", "num_train_epochs": 1})
add_eval_result(sys.argv[2], {"task": "knn", "dataset": "fashion_mnist", "split": "test",
                              "metric": "top1_accuracy", "value": 12.5})
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_wheel__ships_the_model_card_template_and_an_installed_package_writes_cards(tmp_path):
    # Built from a copy: setuptools leaves build/ next to pyproject.toml, and a stale one would leak into wheels.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("sce_hf", "model_cards"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "wheel")], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("sce_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "sce_hf/model_cards/template.md" in names
        assert archive.read("sce_hf/model_cards/template.md") == (REPO / "model_cards" / "template.md").read_bytes()
    assert not any(name.startswith(("tests/", "training/", "benchmarks/")) for name in names)

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "-q", "--target", str(site)], cwd=tmp_path)
    export = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    _run([sys.executable, "-c", EXPORT_WITH_INSTALLED_WHEEL, str(site), str(export)], cwd=tmp_path, env=env)

    card = (export / "README.md").read_text()
    assert "sce-hf:generated-card" in card and "12.5" in card
    assert json.loads((export / "eval_results.json").read_text())[0]["value"] == 12.5
