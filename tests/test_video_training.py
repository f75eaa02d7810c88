"""Video end to end: `training/pretrain.py --modality video` on mp4 files, `training/evaluate.py` on clips (the test
protocol), `training/finetune.py`, and the Kinetics recipes (SCE_SPEC §4)."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

from sce_hf.video import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--preset", "r3d18", "--backbone_config", '{"hidden_sizes": [8, 12, 16, 20], "embedding_size": 6, "depths": [1, 1, 1, 1]}',
    "--projector_hidden_size", "24", "--projector_output_size", "10", "--predictor_hidden_size", "28", "--queue_size", "36",
]


def _script(name):
    module_name = f"video_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "training", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """ROOT/{train,test}/{left,right}/N.mp4: a bright square drifting left or right, and one broken file."""
    root = tmp_path_factory.mktemp("video_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for direction, name in ((-1, "left"), (1, "right")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                frames = np.zeros((int(rng.integers(6, 12)), 24, 32, 3), dtype=np.uint8)
                x = int(rng.integers(8, 16))
                for t in range(len(frames)):
                    left = int(np.clip(x + direction * 2 * t, 0, 24))
                    frames[t, 8:16, left : left + 8] = (200, 80, 40) if name == "left" else (40, 80, 200)
                write_video(str(folder / f"{i}.mp4"), frames, 8)
    (root / "train" / "left" / "broken.mp4").write_bytes(b"\x00not a video" * 40)
    return root


@pytest.fixture(scope="module")
def pretrained(video_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    results = _script("pretrain").main([
        "--modality", "video", "--train_dir", str(video_dir), "--output_dir", str(output), *TINY,
        "--augmentation", "kinetics", "--crop_size", "16", "--num_frames", "3", "--clip_duration", "0.75",
        "--per_device_train_batch_size", "13", "--max_train_steps", "3", "--optimizer", "sgd", "--base_learning_rate", "0.5",
        "--warmup_epochs", "0", "--mixed_precision", "no", "--dataloader_num_workers", "0", "--logging_steps", "1",
        "--max_bad_image_fraction", "0.5", "--checkpointing_steps", "3",
    ])
    return output, results


def test_pretrain__video_run_from_mp4_files_exports_a_video_encoder(pretrained):
    output, results = pretrained
    assert results["completed_steps"] == 3
    assert results["num_bad_images"] == 3  # one epoch per step (13 videos), the broken file skipped and counted each time
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3] and all(np.isfinite(e["train/loss"]) for e in log)
    files = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "modeling_resnet3d.py", "preprocessor_config.json", "pretraining"} <= files
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SCEVideoProcessor" and processor["num_frames"] == 3
    assert processor["crop_size"] == {"height": 16, "width": 16} and processor["image_mean"] == [0.45] * 3
    model = AutoModel.from_pretrained(output).eval()
    assert model.config.is_video and model(torch.randn(2, 3, 3, 16, 16)).pooler_output.shape == (2, 20)
    assert os.path.isdir(output / "checkpoints" / "step_3")


def test_pretrain__counts_bad_videos(video_dir, tmp_path):
    import datasets

    from sce_hf.augmentations import get_recipe
    from sce_hf.data import EpochBatchSampler, collate_views
    from sce_hf.video import ClipViewsDataset, load_video_dataset

    dataset = load_video_dataset(train_dir=str(video_dir))
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 13
    clips = ClipViewsDataset(dataset, "video", get_recipe("kinetics", crop_size=16), 0, 3, 0.75)
    batches = [collate_views([clips[ref] for ref in refs]) for refs in EpochBatchSampler(13, 13, 1, 0, 0, 0)]
    assert sum(b["num_bad"] for b in batches) == 1


def test_pretrain__video_flags_are_checked(video_dir, capsys):
    with pytest.raises(SystemExit):
        _script("pretrain").parse_args(["--modality", "video", "--preset", "resnet50", "--train_dir", str(video_dir), "--output_dir", "x"])
    assert "needs a video --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script("pretrain").parse_args(["--preset", "r3d18", "--train_dir", str(video_dir), "--output_dir", "x"])


@pytest.mark.parametrize("task", ["retrieval", "linear"])
def test_evaluate__clips_with_the_test_protocol(pretrained, video_dir, task):
    output, _ = pretrained
    # the broken training video has no place in an evaluation set
    results = _script("evaluate").main([
        task, "--modality", "video", "--model_name_or_path", str(output), "--train_dir", str(video_dir),
        "--train_split", "test", "--eval_split", "test", "--num_clips", "4", "--num_crops", "3", "--short_side", "18",
        "--test_crop_size", "16", "--num_train_epochs", "5", "--per_device_eval_batch_size", "16",
        "--dataloader_num_workers", "0", "--ks", "1,5",
    ])
    assert results and all(0 <= r["value"] <= 100 for r in results)
    settings = results[0]["settings"]
    assert settings["modality"] == "video" and (settings["num_clips"], settings["num_crops"], settings["num_frames"]) == (4, 3, 3)
    stored = json.loads((output / "eval_results.json").read_text())
    assert any(entry["task"] == ("retrieval" if task == "retrieval" else "linear_probe") for entry in stored)


def test_finetune__a_few_steps_then_the_test_protocol(pretrained, video_dir, tmp_path):
    output, _ = pretrained
    results = _script("finetune").main([
        "--model_name_or_path", str(output), "--train_dir", str(video_dir), "--train_split", "test", "--eval_split", "test",
        "--output_dir", str(tmp_path), "--num_frames", "3", "--clip_duration", "0.75", "--crop_size", "16",
        "--short_side_range", "16,20", "--test_short_side", "18", "--num_clips", "2", "--num_crops", "1",
        "--per_device_train_batch_size", "3", "--max_train_steps", "2", "--dataloader_num_workers", "0",
    ])
    assert results["completed_steps"] == 2 and 0 <= results["top1"] <= 1
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert classifier.config.id2label == {0: "left", 1: "right"} and classifier.config.classifier_dropout == 0.8
    assert classifier(torch.randn(1, 3, 3, 16, 16)).logits.shape == (1, 2)
    assert {e["task"] for e in json.loads((tmp_path / "eval_results.json").read_text())} == {"finetune"}


@pytest.mark.parametrize("name, depth, feature_dim", [("kinetics400-r3d18", 18, 512), ("kinetics400-r3d50", 50, 2048)])
def test_recipes__kinetics_values_of_the_authors(name, depth, feature_dim):
    pretrain = _script("pretrain")
    args = pretrain.parse_args(["--config", os.path.join(ROOT, "training", "configs", f"{name}.yaml"), "--output_dir", "x"])
    config = pretrain.build_config(args)
    assert args.modality == "video" and config.is_video and config.feature_dim == feature_dim
    assert (args.optimizer, args.base_learning_rate, args.weight_decay, args.num_train_epochs, args.warmup_epochs) == ("lars", 2.4, 1e-6, 200, 35)
    assert args.per_device_train_batch_size * 8 == 512
    assert (config.queue_size, config.student_temperature, config.teacher_temperature, config.coeff) == (65536, 0.1, 0.05, 0.5)
    assert (config.initial_momentum, config.final_momentum, config.momentum_schedule, config.symmetric) == (0.99, 1.0, "cosine", True)
    assert (args.num_frames, args.crop_size, args.clip_duration, args.temporal_difference_p, args.augmentation) == (8, 224, 2.56, 0.2, "kinetics")
    assert config.projector_output_size == 256 and config.projector_hidden_size == (1024 if depth == 18 else 4096)


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(f"video_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moving_fashion_mnist(tmp_path_factory):
    from sce_hf.data import FASHION_MNIST_DIR

    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):  # as conftest's fixture
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (make test does it)")
    root = tmp_path_factory.mktemp("moving_fashion_mnist")
    summary = _benchmark("make_moving_fashion_mnist").main(
        ["--output_dir", str(root), "--train_per_class", "1", "--test_per_class", "1", "--num_frames", "6"])
    return root, summary


def test_moving_fashion_mnist__real_items_written_as_mp4(moving_fashion_mnist):
    from sce_hf.video import load_video_dataset, open_video, read_clip

    root, summary = moving_fashion_mnist
    assert (summary["train"], summary["test"]) == (10, 10)
    train = load_video_dataset(train_dir=str(root))
    assert train.features["label"].names[0] == "0_T-shirt_top" and sorted(set(train["label"])) == list(range(10))
    video = open_video(train[3]["video"])
    frames = read_clip(video, 0.0, video.duration, 6)
    assert frames.shape == (6, 64, 64, 3) and video.duration == pytest.approx(6 / 8)
    assert frames[0].max() > 100 and (frames[0] < 20).mean() > 0.5  # a bright item on a black canvas
    assert not np.array_equal(frames[0], frames[-1])  # it moves


def test_video_benchmark__tiny_run(tmp_path, moving_fashion_mnist):
    os.symlink(moving_fashion_mnist[0], tmp_path / "data")  # the benchmark generates its data only when missing
    summary = _benchmark("video_benchmark").main([
        "--output_dir", str(tmp_path), "--max_train_steps", "2", "--per_device_train_batch_size", "5",
        "--num_clips", "2", "--dataloader_num_workers", "0",
    ])
    assert set(summary["results"]) == {"sce", "random", "random_no_zero_init"}
    assert all(0 <= r["R@1"] <= r["R@5"] <= 100 for r in summary["results"].values())
    assert os.path.isfile(tmp_path / "video_benchmark.json") and "pretrain" in summary["commands"]
