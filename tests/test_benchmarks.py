"""The benchmark scripts run (tiny sizes on the CPU); their figures live in benchmarks/RESULTS.md."""

from tests.tiny import load_script


def _load(name):
    return load_script(f"benchmarks/{name}.py")


def test_gpu_throughput__tiny_cpu_run():
    (result,) = _load("gpu_throughput").main(
        ["--preset", "resnet18-small", "--image_size", "16", "--batch_size", "4", "--steps", "1", "--warmup", "1",
         "--device", "cpu", "--compile", "no", "--queue_size", "16", "--dtype", "fp32"]
    )
    assert result["images_per_s"] > 0 and result["step_tflop"] > 0
    assert result["mfu"] is None  # no known peak for a CPU


def test_step_overhead__tiny_run():
    result = _load("step_overhead").main(["--batch_size", "8", "--repeats", "1", "--width", "4", "--queue_size", "32"])
    assert result["full_step_s"] > 0
    assert 0 < result["student_fwd_bwd_x2_s"] < result["full_step_s"]


def test_input_pipeline__tiny_run(fashion_mnist_dir):
    result = _load("input_pipeline").main(
        ["--batches", "2", "--max_train_samples", "600", "--num_workers", "0", "--per_device_train_batch_size", "32"]
    )
    assert result["loader_images_per_s"] > 0 and result["model_images_per_s"] > 0


def test_reproduction_table__mean_spread_and_paired_differences():
    rows = [
        {"arm": "SCE (coeff 0.5)", "seed": 0, "epochs": 4, "train_s": 300.0, "knn": 85.0, "linear_probe": 86.0},
        {"arm": "SCE (coeff 0.5)", "seed": 1, "epochs": 4, "train_s": 320.0, "knn": 86.0, "linear_probe": 87.0},
        {"arm": "InfoNCE (coeff 1)", "seed": 0, "epochs": 4, "train_s": 310.0, "knn": 84.0, "linear_probe": 86.5},
        {"arm": "InfoNCE (coeff 1)", "seed": 1, "epochs": 4, "train_s": 310.0, "knn": 84.0, "linear_probe": 86.5},
        {"arm": "random init", "seed": 0, "epochs": 0, "train_s": 0.0, "knn": 80.0, "linear_probe": 75.0},
        {"arm": "InfoNCE (coeff 1)", "seed": 0, "epochs": 8, "train_s": 620.0, "knn": 90.0, "linear_probe": 90.0},
    ]
    text = _load("reproduction").table(rows)
    lines = text.splitlines()
    assert "| SCE (coeff 0.5) | 4 | 2 | 85.50 ± 0.71 | 86.50 ± 0.71 | 5.2 min |" in lines
    assert "| random init | 0 | 1 | 80.00 | 75.00 | 0.0 min |" in lines
    assert "| InfoNCE (coeff 1) | 8 | 1 | 90.00 | 90.00 | 10.3 min |" in lines  # another budget: its own row
    # seed by seed: k-NN 85-84, 86-84 -> +1.50 ± 0.71; linear -0.5, +0.5 -> +0.00 ± 0.71; untrained arms left out,
    # and an arm is only paired with SCE at the same number of epochs (no SCE run at 8 epochs here)
    assert "| InfoNCE (coeff 1) | 4 | 2 | +1.50 ± 0.71 | +0.00 ± 0.71 |" in lines
    paired = text.split("minus")[1]
    assert "| random init |" not in paired and "| InfoNCE (coeff 1) | 8 |" not in paired
