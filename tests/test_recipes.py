"""The training recipes carry the values of SCE_SPEC §4, and every recipe parses with the script's flags."""

import glob
import os

import pytest

from tests.tiny import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "training", "configs", "*.yaml")))


def _pretrain():
    return load_script("training/pretrain.py")


def _args(name, *flags):
    return _pretrain().parse_args(["--config", os.path.join(ROOT, "training", "configs", f"{name}.yaml"), "--output_dir", "x", *flags])


def test_recipes__all_present():
    names = {os.path.basename(p)[:-5] for p in RECIPES}
    assert {"fashion-mnist-cpu", "cifar10", "imagenet1k-100ep", "imagenet1k-200ep", "imagenet1k-300ep",
            "imagenet1k-1000ep", "imagenet1k-multicrop"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_recipes__parse_and_build_a_valid_config(path):
    args = _pretrain().parse_args(["--config", path, "--output_dir", "x"])
    config = _pretrain().build_config(args)
    assert config.coeff == 0.5


@pytest.mark.parametrize(
    "name, base_lr, weight_decay, epochs",
    [("imagenet1k-100ep", 0.6, 1e-6, 100), ("imagenet1k-200ep", 0.3, 1e-6, 200), ("imagenet1k-300ep", 0.3, 1e-6, 300),
     ("imagenet1k-1000ep", 0.3, 1.5e-6, 1000), ("imagenet1k-multicrop", 0.3, 1e-6, 200)],
)
def test_recipes__imagenet_values_of_the_paper(name, base_lr, weight_decay, epochs):
    args = _args(name)
    config = _pretrain().build_config(args)
    assert (args.optimizer, args.base_learning_rate, args.weight_decay, args.num_train_epochs) == ("lars", base_lr, weight_decay, epochs)
    assert args.warmup_epochs == 10
    assert (config.queue_size, config.student_temperature, config.teacher_temperature, config.coeff) == (65536, 0.1, 0.07, 0.5)
    assert (config.initial_momentum, config.final_momentum, config.momentum_schedule) == (0.99, 1.0, "cosine")
    assert config.symmetric and config.feature_dim == 2048 and config.projector_output_size == 256
    processes = 16 if name.endswith("multicrop") else 8
    assert args.per_device_train_batch_size * processes == 4096
    assert args.augmentation == ("imagenet-multicrop" if name.endswith("multicrop") else "imagenet")


def test_recipes__cifar10_values_of_the_authors():
    args = _args("cifar10")
    config = _pretrain().build_config(args)
    assert (args.optimizer, args.base_learning_rate, args.weight_decay, args.num_train_epochs, args.warmup_epochs) == ("sgd", 0.06, 5e-4, 200, 5)
    assert args.per_device_train_batch_size == 256
    assert (config.queue_size, config.teacher_temperature, config.momentum_schedule, config.initial_momentum) == (4096, 0.05, "constant", 0.99)
    assert not config.symmetric and config.split_batchnorm_groups == 8 and config.shuffle_teacher_batch
    assert config.small_input_stem and config.predictor_num_layers == 0


def test_recipes__flags_override_the_recipe():
    args = _args("cifar10", "--coeff", "0.3", "--num_train_epochs", "3")
    assert args.coeff == 0.3 and args.num_train_epochs == 3


def test_recipes__unknown_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate_typo: 3\n")
    with pytest.raises(SystemExit):
        _pretrain().parse_args(["--config", str(bad), "--output_dir", "x", "--dataset_name", "d"])
    assert "unknown keys ['learning_rate_typo']" in capsys.readouterr().err
