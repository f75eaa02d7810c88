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
