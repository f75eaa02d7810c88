"""sce_hf.evaluation and training/evaluate.py: k-NN, linear probe, retrieval, eval_results.json."""

import json
import os

import pytest
import torch

from sce_hf import SCEImageProcessor, SCEModel
from sce_hf.evaluation import (
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe_on_features,
    processor_transform,
    retrieval_recall_at_k,
)
from sce_hf.hub import add_eval_result, read_eval_results
from tests.tiny import load_script, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate_script():
    return load_script("training/evaluate.py")


def _clusters(centres, per_class, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=generator), labels


def test_knn__perfect_on_separated_clusters():
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    bank, bank_labels = _clusters(centres, per_class=30, spread=0.05, seed=1)
    queries, query_labels = _clusters(centres, per_class=10, spread=0.05, seed=2)
    assert knn_accuracy(bank, bank_labels, queries, query_labels) == 1.0


def test_knn__near_chance_on_random_features():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(2000, 32, generator=generator), torch.randn(1000, 32, generator=generator)
    bank_labels, query_labels = torch.randint(0, 10, (2000,), generator=generator), torch.randint(0, 10, (1000,), generator=generator)
    assert abs(knn_accuracy(bank, bank_labels, queries, query_labels) - 0.1) < 0.04


def test_knn__weighted_votes_by_hand():
    # Query along x; neighbours: two of class 1 at low cosine, one of class 0 at cosine 1. With T small the close
    # one wins; with T large the two far ones win.
    bank = torch.tensor([[1.0, 0.0], [0.2, 1.0], [0.2, -1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, query, k=3, temperature=0.07).item() == 0
    assert knn_predict(bank, labels, query, k=3, temperature=100.0).item() == 1
    with pytest.raises(ValueError, match="same d"):
        knn_predict(bank, labels, torch.zeros(1, 3))


def test_linear_probe__learns_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 8, generator=generator)
    margin = (x[:, 0] + 0.5 * x[:, 1]).abs().gt(0.25) & x[:, 2].abs().gt(0.25)
    x = x[margin][:600]
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()  # 4 classes, separable with a margin
    scores = linear_probe_on_features(x[:400], y[:400], x[400:], y[400:], epochs=50, batch_size=64, learning_rate=2.0, progress=False)
    assert scores["top1"] > 0.95
    shuffled = y[torch.randperm(600, generator=generator)]
    chance = linear_probe_on_features(x[:400], shuffled[:400], x[400:], shuffled[400:], epochs=50, batch_size=64, learning_rate=2.0, progress=False)
    assert chance["top1"] < 0.5


def test_linear_probe__near_constant_features_are_not_blown_up():
    """400 dimensions of noise at std 1e-5 next to 2 informative ones (a collapsed encoder's near-dead channels):
    standardised as a batch norm does (eps 1e-5 on the variance) they stay negligible; divided by their own std
    they would weigh as much as the signal and the probe would fit the noise."""
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(600, 2, generator=generator)
    signal = signal[signal[:, 0].abs() > 0.2][:400]
    y = (signal[:, 0] > 0).long()
    x = torch.cat([signal, 1e-5 * torch.randn(len(signal), 400, generator=generator)], dim=1)
    scores = linear_probe_on_features(x[:100], y[:100], x[100:], y[100:], epochs=100, batch_size=50, learning_rate=1.0,
                                      progress=False)
    assert scores["top1"] > 0.95


def test_features__a_model_without_pooled_output_is_a_clear_error(tiny_fashion_mnist):
    from datasets import load_from_disk
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=16, patch_size=4), add_pooling_layer=False)
    processor = SCEImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    dataset = load_from_disk(tiny_fashion_mnist)["test"].select(range(4))
    with pytest.raises(ValueError, match=r"ViTModel returns no `pooler_output`.*add_pooling_layer=True"):
        extract_features(model, dataset, processor_transform(processor), progress=False)


def test_retrieval__recall_at_k_on_a_hand_built_case():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    query_labels = torch.tensor([1, 0])
    # Centred: bank (0.775, -0.275), (0.675, -0.175), (-0.225, 0.725), (-1.225, -0.275); queries (0.475, -0.475)
    # and (-0.475, 0.475). Query 0 ranks bank 0 (label 0) then bank 1 (label 1): a hit at k=2, not k=1.
    # Query 1 ranks the reverse, bank 2, 3, 1, 0: its label 0 comes at k=4.
    recalls = retrieval_recall_at_k(bank, bank_labels, queries, query_labels, ks=(1, 2, 4))
    assert recalls == {1: 0.0, 2: 0.5, 4: 1.0}


def test_eval_results__keeps_earlier_entries_and_rejects_malformed(tmp_path):
    first = {"task": "knn", "dataset": "d", "split": "test", "metric": "top1_accuracy", "value": 80.0}
    second = {"task": "retrieval", "dataset": "d", "split": "test", "metric": "recall_at_1", "value": 70.0}
    add_eval_result(tmp_path, first)
    add_eval_result(tmp_path, second)
    assert read_eval_results(tmp_path) == [first, second]
    updated = dict(first, value=81.0)
    add_eval_result(tmp_path, updated)  # same task/dataset/split/metric: replaced
    assert read_eval_results(tmp_path) == [second, updated]
    (tmp_path / "eval_results.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="eval_results.json must be a JSON list"):
        read_eval_results(tmp_path)
    (tmp_path / "eval_results.json").write_text(json.dumps([dict(first, value=None)]))  # the Hub rejects null metrics
    with pytest.raises(ValueError, match="must be a number, got None"):
        read_eval_results(tmp_path)
    (tmp_path / "eval_results.json").write_text("[{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        add_eval_result(tmp_path, first)


@pytest.fixture
def tiny_fashion_mnist(tmp_path, fashion_mnist_dir):
    from datasets import DatasetDict

    from sce_hf.data import load_fashion_mnist

    path = tmp_path / "fmnist"
    DatasetDict(train=load_fashion_mnist("train").select(range(120)), test=load_fashion_mnist("test").select(range(40))).save_to_disk(path)
    return str(path)


def _tiny_export(path, **overrides):
    SCEModel(tiny_config(**overrides)).save_pretrained(path)
    SCEImageProcessor.from_preset("fashion-mnist", size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)


def test_evaluate_script__writes_every_entry(tmp_path, tiny_fashion_mnist):
    model_dir = tmp_path / "model"
    _tiny_export(model_dir)
    data = ["--model_name_or_path", str(model_dir), "--dataset_name", tiny_fashion_mnist, "--eval_split", "test",
            "--dataloader_num_workers", "0"]
    script = _evaluate_script()
    script.main(["knn", *data, "--k", "5"])
    script.main(["linear", *data, "--num_train_epochs", "3"])
    script.main(["retrieval", *data])
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert [(r["task"], r["metric"]) for r in results] == [
        ("knn", "top1_accuracy"), ("linear_probe", "top1_accuracy"), ("linear_probe", "top5_accuracy"),
        *[("retrieval", f"recall_at_{k}") for k in (1, 5, 10, 15, 20, 25)],
    ]
    assert all(r["dataset"] == tiny_fashion_mnist and r["split"] == "test" and 0 <= r["value"] <= 100 for r in results)
    assert results[0]["settings"]["k"] == 5 and results[0]["settings"]["num_train"] == 120
    assert results[1]["settings"]["protocol"] == "cached_features"


def test_evaluate_script__raw_pixel_baseline_through_the_same_code(tmp_path, tiny_fashion_mnist):
    (result,) = _evaluate_script().main(["knn", "--baseline", "raw_pixels", "--dataset_name", tiny_fashion_mnist,
                                         "--eval_split", "test", "--output_dir", str(tmp_path / "raw")])
    assert result["model"] == "raw_pixels" and result["value"] > 40  # 120 training images, 10 classes


def test_evaluate_script__processor_that_does_not_fit_the_model_is_a_clear_error(tmp_path, tiny_fashion_mnist, capsys):
    model_dir = tmp_path / "model"
    backbone = dict(model_type="resnet", layer_type="basic", depths=[1, 1], hidden_sizes=[12, 20], embedding_size=8, num_channels=1)
    _tiny_export(model_dir, backbone_config=backbone)  # a 1-channel model, a processor that makes RGB
    with pytest.raises(SystemExit, match=r"do not fit the data.*1 channels.*got 3"):
        _evaluate_script().main(["knn", "--model_name_or_path", str(model_dir), "--dataset_name", tiny_fashion_mnist,
                                 "--eval_split", "test", "--dataloader_num_workers", "0"])


def test_evaluate_script__missing_label_column_lists_the_columns(tmp_path, tiny_fashion_mnist):
    with pytest.raises(ValueError, match=r"no label column 'fine'.*\['image', 'label'\]"):
        _evaluate_script().main(["knn", "--baseline", "raw_pixels", "--dataset_name", tiny_fashion_mnist, "--eval_split",
                                 "test", "--output_dir", str(tmp_path), "--label_column_name", "fine"])


@pytest.mark.slow
def test_knn__raw_pixels_calibration_on_all_of_fashion_mnist(tmp_path, fashion_mnist_dir):
    """60k vs 10k, k=20, T=0.07, no centring: 84.6% measured independently (benchmarks/RESULTS.md)."""
    (result,) = _evaluate_script().main(["knn", "--baseline", "raw_pixels", "--dataset_name", "fashion_mnist",
                                         "--eval_split", "test", "--output_dir", str(tmp_path)])
    assert abs(result["value"] - 84.6) <= 0.1


def test_evaluate_script__any_transformers_encoder_for_comparison(tmp_path, tiny_fashion_mnist):
    """A model that is not SCE (a plain transformers ViT with its own processor) goes through the same evaluation."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit import ViTImageProcessorPil

    model_dir = tmp_path / "vit"
    config = ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                       patch_size=4)
    ViTModel(config).save_pretrained(model_dir)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, do_convert_rgb=True).save_pretrained(model_dir)
    data = ["--model_name_or_path", str(model_dir), "--dataset_name", tiny_fashion_mnist, "--eval_split", "test",
            "--dataloader_num_workers", "0"]
    (knn,) = _evaluate_script().main(["knn", *data, "--k", "5"])
    retrieval = _evaluate_script().main(["retrieval", *data])
    assert knn["model"] == str(model_dir) and knn["value"] > 25  # chance is 10%; random ViT features keep pixel similarity
    assert [r["metric"] for r in retrieval][:2] == ["recall_at_1", "recall_at_5"]
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert [r["task"] for r in saved] == ["knn"] + ["retrieval"] * 6
