"""`training/pretrain.py` end to end, on a tiny encoder and a few steps per run.

1. Every data source trains, checkpoints and exports: an image folder (PNG and JPEG of varied sizes, cropped by
   the CPU workers), a local parquet file loaded by path (Hub-like data), a `save_to_disk` folder (whole and
   streamed), a stream of parquet shards, and the real Fashion-MNIST files. The exported folder loads with
   `AutoModel` (also in a fresh process that cannot import `sce_hf`, through the folder's remote code) and
   `pretraining/` with `SCEForPreTraining`.
2. An interrupted run resumed from its mid-epoch checkpoint ends bit-identical to a straight run: weights, teacher,
   queue, optimizer state and the losses of every step after the resume; also for a stream read by 1 or 2 workers.
3. A run killed with SIGKILL resumes from `latest`, which never picks a half-written or incomplete checkpoint.
4. A NaN loss stops the run with an error naming the step and the last good checkpoint, which resumes.
5. Two real processes (`accelerate launch`, gloo) each stream their own parquet shard, and their first loss equals
   one process on both shards with its batch norm split in two groups.
6. Bad input: a missing column, unreadable images (skipped and counted, or too many: a clear stop), grayscale,
   RGBA, palette and 1x1 images, an empty dataset, and a resume with another schedule.

Runs go through `main(argv)` in this process where they can (faster), and through subprocesses where a real process
boundary matters (SIGKILL, `accelerate launch`, loading without the package).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sce_hf import SCEForPreTraining, SCEModel
from tests.tiny import run_without_sce_hf


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "pretrain.py"
PYTHON = sys.executable
ACCELERATE = Path(PYTHON).parent / "accelerate"

# A 15k-parameter ResNet with the 3x3 stem, tiny heads, 16 px crops: a step takes a few milliseconds on one thread.
TINY = [
    "--preset", "resnet18-small",
    "--backbone_config", '{"hidden_sizes": [8, 12, 16, 20], "depths": [1, 1, 1, 1], "embedding_size": 8}',
    "--projector_hidden_size", "24", "--projector_output_size", "10", "--predictor_hidden_size", "28",
    "--queue_size", "36", "--split_batchnorm_groups", "1", "--shuffle_teacher_batch", "false",
    "--augmentation", "fashion-mnist", "--crop_size", "16", "--processor_preset", "fashion-mnist",
    "--optimizer", "sgd", "--base_learning_rate", "0.5", "--warmup_epochs", "0.5",
    "--per_device_train_batch_size", "8", "--mixed_precision", "no", "--final_knn", "false",
    "--dataloader_num_workers", "0", "--logging_steps", "1",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a shared 2-core machine two threads
    contending with other processes made a 6-step run take 14 s instead of 0.3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrain():
    """`training/pretrain.py` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("sce_pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_main(pretrain, output_dir, *flags: str) -> dict:
    """`main([...])` in this process, with a fresh Accelerate state (another test may have left one)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return pretrain.main([*TINY, "--output_dir", str(output_dir), *flags])


def script_command(output_dir, *flags: str) -> list[str]:
    return [PYTHON, str(SCRIPT), *TINY, "--output_dir", str(output_dir), *flags]


def launch_two_processes(output_dir, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of the script on 2 CPU processes (gloo); fails the test with the log's tail on an error."""
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script_command(output_dir, *flags)[1:],
    ]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(ACCELERATE_USE_CPU="1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def subprocess_env(**extra: str) -> dict:
    """This session's environment (offline Hub, temporary HF_HOME) for a child, single-threaded on 2 shared cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def read_log(output_dir) -> dict[int, dict]:
    """`train_log.jsonl` as {step: metrics}; a step logged twice (a resumed run) keeps its last line."""
    with open(Path(output_dir) / "train_log.jsonl") as handle:
        return {row["step"]: row for row in map(json.loads, handle)}


def assert_checkpoint(output_dir, name: str) -> dict:
    folder = Path(output_dir) / "checkpoints" / name
    assert (folder / "sce_training_state.json").is_file(), f"no complete checkpoint {folder}: {sorted(os.listdir(folder.parent))}"
    assert (folder / "model.safetensors").is_file() and (folder / "optimizer.bin").is_file()
    return json.loads((folder / "sce_training_state.json").read_text())


def assert_exported(output_dir, steps: int) -> None:
    """The export loads: `pretraining/` with `SCEForPreTraining`, the root with `AutoModel` (package registered)."""
    from transformers import AutoModel

    output_dir = Path(output_dir)
    pretraining = SCEForPreTraining.from_pretrained(output_dir / "pretraining")
    assert pretraining.num_enqueued.item() > 0, "the exported queue was never filled"
    assert all(torch.isfinite(p).all() for p in pretraining.parameters())
    encoder = AutoModel.from_pretrained(output_dir, trust_remote_code=True)
    assert isinstance(encoder, SCEModel)
    torch.testing.assert_close(encoder.state_dict(), pretraining.sce.state_dict(), rtol=0, atol=0)
    assert max(read_log(output_dir)) == steps


FRESH_PROCESS_LOADER = r"""
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model_dir, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 22, 3), dtype=np.uint8))
pixel_values = processor(image, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    pooled = model(pixel_values=pixel_values).pooler_output
torch.save({"module": type(model).__module__, "pixel_values": pixel_values, "pooled": pooled}, out)
"""


def assert_loads_in_fresh_process(output_dir, tmp_path) -> None:
    """`AutoModel` + `AutoImageProcessor` with remote code in a process where `sce_hf` cannot be imported; its
    embedding equals the package's."""
    result = tmp_path / "fresh.pt"
    run_without_sce_hf(FRESH_PROCESS_LOADER, output_dir, result, cwd=tmp_path, env=subprocess_env(), timeout=120)
    loaded = torch.load(result)
    assert not loaded["module"].startswith("sce_hf"), loaded["module"]
    assert loaded["pixel_values"].shape == (1, 3, 16, 16)
    encoder = SCEModel.from_pretrained(output_dir).eval()
    with torch.no_grad():
        expected = encoder(pixel_values=loaded["pixel_values"]).pooler_output
    torch.testing.assert_close(loaded["pooled"], expected)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------------------
# Data


def _random_image(rng, height: int, width: int, mode: str = "RGB") -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_image_folder(root: Path, num_images: int, seed: int = 0) -> Path:
    """`num_images` PNG and JPEG files of 18-40 px (height and width drawn apart) in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(18, 41, size=2)
        _random_image(rng, height, width).save(folder / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("image_folder"), 40)


def _gray_dataset(num_rows: int, seed: int, size: int = 28):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(num_rows)]
    return Dataset.from_dict({"image": images, "label": [i % 2 for i in range(num_rows)]}, features=features)


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    """A folder of two parquet files (shards) of 8 rows each: 28 px grayscale images and labels."""
    folder = tmp_path_factory.mktemp("parquet")
    for shard in range(2):
        _gray_dataset(8, seed=shard + 1).to_parquet(str(folder / f"train-{shard:05d}-of-00002.parquet"))
    return folder


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "dataset"
    _gray_dataset(16, seed=7, size=20).save_to_disk(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------------------------
# 0. --help and argument errors


def test_help_is_clear(pretrain, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset_name", "--train_dir", "--streaming", "--resume_from_checkpoint", "--checkpointing_steps",
                 "--max_bad_image_fraction", "--output_dir", "train_log.jsonl", "'latest'"):
        assert flag in text, f"--help does not mention {flag}"

    with pytest.raises(SystemExit):
        pretrain.main(["--dataset_name", "x"])
    assert "--output_dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--output_dir", "x"])
    assert "Give a data source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--output_dir", "x", "--dataset_name", "x", "--streaming"])
    assert "--streaming needs --max_train_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a recipe's warm-up in epochs means nothing for a stream
        pretrain.main(["--output_dir", "x", "--dataset_name", "x", "--streaming", "--max_train_steps", "9",
                       "--warmup_epochs", "10"])
    assert "--streaming needs --num_warmup_steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 1. Every source, end to end


def test_image_folder_end_to_end(pretrain, image_folder, tmp_path):
    out = tmp_path / "out"
    results = run_main(pretrain, out, "--train_dir", str(image_folder), "--max_train_steps", "3", "--checkpointing_steps", "2")
    assert results["completed_steps"] == 3 and results["num_bad_images"] == 0
    state = assert_checkpoint(out, "step_2")
    assert state["completed_steps"] == 2 and state["steps_per_epoch"] == 5
    assert_exported(out, steps=3)
    assert_loads_in_fresh_process(out, tmp_path)
    args = json.loads((out / "training_args.json").read_text())
    assert args["train_dir"] == str(image_folder) and "hub_token" not in args


def test_parquet_data_files_end_to_end(pretrain, parquet_shards, tmp_path):
    """Hub-like local data: a parquet file path, and a folder of parquet files, as `--dataset_name`."""
    from sce_hf.data import load_image_dataset

    assert len(load_image_dataset(str(parquet_shards))) == 16
    one_file = sorted(parquet_shards.glob("*.parquet"))[0]
    assert len(load_image_dataset(str(one_file))) == 8

    out = tmp_path / "out"
    results = run_main(pretrain, out, "--dataset_name", str(one_file), "--max_train_steps", "3", "--checkpointing_steps", "2")
    assert results["completed_steps"] == 3
    assert_checkpoint(out, "step_2")
    assert_exported(out, steps=3)


def test_saved_dataset_end_to_end(pretrain, saved_dataset, tmp_path):
    """A `save_to_disk` folder, read whole and as a stream."""
    for name, streaming in (("out", []), ("streamed", ["--streaming", "--num_warmup_steps", "1"])):
        out = tmp_path / name
        results = run_main(pretrain, out, "--dataset_name", str(saved_dataset), "--max_train_steps", "3",
                           "--checkpointing_steps", "2", *streaming)
        assert results["completed_steps"] == 3
        assert assert_checkpoint(out, "step_2")["steps_per_epoch"] == (3 if streaming else 2)
        assert_exported(out, steps=3)


def test_streaming_parquet_shards_end_to_end(pretrain, parquet_shards, tmp_path):
    """A stream of 2 parquet shards read by 2 workers; 3 steps of 8 pass the end of the 16-row stream."""
    out = tmp_path / "out"
    results = run_main(pretrain, out, "--dataset_name", str(parquet_shards), "--streaming", "--max_train_steps", "3",
                       "--checkpointing_steps", "2", "--dataloader_num_workers", "2", "--num_warmup_steps", "2")
    assert results["completed_steps"] == 3
    state = assert_checkpoint(out, "step_2")
    assert state["completed_steps"] == 2
    log = read_log(out)
    assert log[3]["train/epoch"] == 1, "the third batch should come from the second pass over the stream"
    peak = 0.5 * 8 / 256  # --num_warmup_steps 2: steps 1 and 2 warm up linearly, step 3 is the cosine's end
    assert [log[step]["train/lr"] for step in (1, 2)] == pytest.approx([peak / 2, peak])
    assert_exported(out, steps=3)
    assert_loads_in_fresh_process(out, tmp_path)


def test_real_fashion_mnist_end_to_end(pretrain, fashion_mnist_dir, tmp_path):
    out = tmp_path / "out"
    results = run_main(pretrain, out, "--dataset_name", "fashion_mnist", "--max_train_samples", "64",
                       "--max_train_steps", "3", "--checkpointing_steps", "2")
    assert results["completed_steps"] == 3
    assert assert_checkpoint(out, "step_2")["steps_per_epoch"] == 8
    assert_exported(out, steps=3)
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 16, "width": 16}


# ------------------------------------------------------------------------------------------------------------------
# 2. Exact resume


class _Interrupted(Exception):
    pass


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Model weights and buffers (student, teacher, queue, pointer) and the optimizer state of a checkpoint."""
    tensors = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    for index, values in optimizer["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def straight_and_resumed(pretrain, monkeypatch, straight: Path, resumed: Path, flags: list[str], interrupt_after: str) -> dict:
    """Run `flags` straight into `straight`; into `resumed`, run them until checkpoint `interrupt_after` is saved
    (then crash), and again with `--resume_from_checkpoint latest`. Check the second run started from that
    checkpoint and every step's loss and learning rate equal the straight run's. Returns the checkpoint's state."""
    run_main(pretrain, straight, *flags)

    save_checkpoint = pretrain.save_checkpoint

    def save_then_crash(accelerator, args, state, name):
        path = save_checkpoint(accelerator, args, state, name)
        if name == interrupt_after:
            raise _Interrupted(path)
        return path

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        run_main(pretrain, resumed, *flags)
    monkeypatch.undo()
    state = assert_checkpoint(resumed, interrupt_after)
    assert not (resumed / "model.safetensors").exists()
    interrupted_at = state["completed_steps"]
    assert max(read_log(resumed)) == interrupted_at

    results = run_main(pretrain, resumed, *flags, "--resume_from_checkpoint", "latest")
    max_steps = results["completed_steps"]
    logged_steps = [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert logged_steps == list(range(1, max_steps + 1)), f"the second run did not start at step {interrupted_at + 1}: {logged_steps}"

    straight_log, resumed_log = read_log(straight), read_log(resumed)
    assert sorted(resumed_log) == sorted(straight_log) == list(range(1, max_steps + 1))
    for step in range(1, max_steps + 1):
        assert resumed_log[step]["train/loss"] == straight_log[step]["train/loss"], f"step {step} loss differs"
        assert resumed_log[step]["train/lr"] == straight_log[step]["train/lr"]
    final_straight = SCEForPreTraining.from_pretrained(straight / "pretraining").state_dict()
    final_resumed = SCEForPreTraining.from_pretrained(resumed / "pretraining").state_dict()
    torch.testing.assert_close(final_resumed, final_straight, rtol=0, atol=1e-6)
    return state


def test_resume_mid_epoch_is_exact(pretrain, image_folder, tmp_path, monkeypatch):
    """6 steps straight == 3 steps, interrupted, then `--resume_from_checkpoint latest` to 6.

    40 images of varied sizes, batch 8: 5 steps per epoch, so the checkpoint at step 3 is mid-epoch and the run
    crosses an epoch boundary. CPU crops in a worker process, seeded augmentations, split teacher batch norm with
    a shuffled teacher batch (which draws from the global RNG the checkpoint restores).
    """
    flags = ["--train_dir", str(image_folder), "--max_train_steps", "6", "--checkpointing_steps", "3",
             "--dataloader_num_workers", "1", "--split_batchnorm_groups", "2", "--shuffle_teacher_batch", "true",
             "--optimizer", "lars"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    state = straight_and_resumed(pretrain, monkeypatch, straight, resumed, flags, interrupt_after="step_3")
    assert (state["epoch"], state["batches_in_epoch"], state["steps_per_epoch"]) == (0, 3, 5), state
    straight_log = read_log(straight)
    assert straight_log[6]["train/epoch"] == 1 and straight_log[5]["train/epoch"] == 0

    a, b = _checkpoint_tensors(straight / "checkpoints" / "step_6"), _checkpoint_tensors(resumed / "checkpoints" / "step_6")
    assert sorted(a) == sorted(b)
    for key in ("model.queue", "model.queue_ptr", "model.num_enqueued"):
        assert key in a, f"{key} is not in the checkpoint"
    assert any(k.startswith("model.teacher_encoder.") for k in a) and any(k.startswith("optimizer.") for k in a)
    at_step_3 = _checkpoint_tensors(resumed / "checkpoints" / "step_3")
    assert not torch.equal(a["model.queue"], at_step_3["model.queue"]), "steps 4-6 changed nothing: the test is vacuous"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_mid_pass_is_exact(pretrain, tmp_path, monkeypatch, workers):
    """A stream of 2 parquet shards of 20 and 21 rows, batch 8, resumed after step 3 of 6. One reader: 5 full
    batches a pass and a last row dropped (a batch of 1 would break batch norm); the rows consumed are skipped in
    the stream. Two workers, one per shard: each yields 2 full batches and drops the rest, the loader interleaves
    them, and the batches consumed are skipped at its output."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        _gray_dataset(20 + shard, seed=10 + shard).to_parquet(str(shards / f"train-{shard}.parquet"))
    flags = ["--dataset_name", str(shards), "--streaming", "--num_warmup_steps", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
             "--dataloader_num_workers", str(workers)]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    state = straight_and_resumed(pretrain, monkeypatch, straight, resumed, flags, interrupt_after="step_3")
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 3), state
    batches_per_pass = 5 if workers == 0 else 4
    epochs = [read_log(straight)[step]["train/epoch"] for step in range(1, 7)]
    assert epochs == [0] * batches_per_pass + [1] * (6 - batches_per_pass), epochs


# ------------------------------------------------------------------------------------------------------------------
# 3. SIGKILL, and what `latest` may pick


def test_sigkill_then_resume_latest(pretrain, saved_dataset, tmp_path, caplog):
    out, max_steps = tmp_path / "out", 60
    flags = ["--dataset_name", str(saved_dataset), "--max_train_steps", str(max_steps), "--checkpointing_steps", "2",
             "--checkpoints_total_limit", "2"]  # fmt: skip
    log_path = tmp_path / "killed_run.log"  # a file, not a pipe: a full pipe would stall the child
    with open(log_path, "w") as log:
        process = subprocess.Popen(script_command(out, *flags), env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_2").exists():
            assert process.poll() is None, f"the run ended before its first checkpoint:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), f"the run finished before it was killed: raise max_steps ({max_steps})"
    complete = pretrain.checkpoint_dirs(str(out))
    assert complete, "no complete checkpoint survived the kill"
    last_step, last_path = complete[-1]
    assert last_step < max_steps

    # Leftovers that `latest` must never pick: a half-written checkpoint, and a folder without a training state.
    junk = out / "checkpoints" / ".tmp-step_99"
    junk.mkdir(exist_ok=True)
    (junk / "sce_training_state.json").write_text(json.dumps({"completed_steps": 99}))
    (junk / "model.safetensors").write_bytes(b"not a safetensors file")
    incomplete = out / "checkpoints" / "step_98"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"junk")
    assert pretrain.checkpoint_dirs(str(out)) == complete

    with caplog.at_level(logging.INFO, logger="pretrain"):
        results = run_main(pretrain, out, *flags, "--resume_from_checkpoint", "latest")
    assert f"Resumed from {last_path} at step {last_step}" in caplog.text
    assert results["completed_steps"] == max_steps
    assert_checkpoint(out, f"step_{max_steps}")
    assert_exported(out, steps=max_steps)
    assert len([name for name in os.listdir(out / "checkpoints") if name.startswith("step_") and name != "step_98"]) == 2

    # A checkpoint given by path must be complete.
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        run_main(pretrain, out, *flags, "--resume_from_checkpoint", str(incomplete))


# ------------------------------------------------------------------------------------------------------------------
# 4. A NaN loss


def test_nan_loss_stops_clearly_and_last_checkpoint_resumes(pretrain, saved_dataset, tmp_path, monkeypatch):
    import sce_hf.pretraining

    out = tmp_path / "out"
    flags = ["--dataset_name", str(saved_dataset), "--max_train_steps", "6", "--checkpointing_steps", "2"]
    real_loss, calls = sce_hf.pretraining.sce_loss, []

    def nan_from_fifth_call(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(sce_hf.pretraining, "sce_loss", nan_from_fifth_call)
    with pytest.raises(pretrain.NonFiniteLossError) as error:
        run_main(pretrain, out, *flags)
    monkeypatch.undo()
    assert len(calls) == 5, "the preset's asymmetric loss makes one call per step: the 5th step must stop the run"
    message = str(error.value)
    assert "nan" in message and "step 5" in message, message
    last_good = out / "checkpoints" / "step_4"
    assert str(last_good) in message, message
    assert not (out / "checkpoints" / "step_6").exists() and not (out / "model.safetensors").exists()
    assert sorted(read_log(out)) == [1, 2, 3, 4]

    # A resume must keep the schedule: another --max_train_steps is refused, naming it.
    with pytest.raises(SystemExit, match=r"different schedule \(max_train_steps: checkpoint 6, now 8\)"):
        run_main(pretrain, out, *flags, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    # So is the same global batch made another way (4 images x 2 accumulated instead of 8 x 1): the position in the
    # epoch counts micro-batches.
    with pytest.raises(SystemExit, match=r"micro_batch_size: checkpoint 8, now 4; gradient_accumulation_steps: checkpoint 1, now 2"):
        run_main(pretrain, out, *flags, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                 "--resume_from_checkpoint", "latest")

    # The last good checkpoint is complete: the run resumes from it and finishes.
    state = assert_checkpoint(out, "step_4")
    assert state["completed_steps"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(str(last_good / "model.safetensors")).values())
    results = run_main(pretrain, out, *flags, "--resume_from_checkpoint", "latest")
    assert results["completed_steps"] == 6
    assert all(np.isfinite(row["train/loss"]) for row in read_log(out).values())
    assert_exported(out, steps=6)


# ------------------------------------------------------------------------------------------------------------------
# 5. Two processes


def test_two_processes_stream_their_own_shard_and_match_one_process(pretrain, parquet_shards, tmp_path):
    """`accelerate launch` with 2 CPU processes, B=8 rows per parquet shard, two steps (two passes over the shards):
    each rank streams its shard, and the mean losses and the exported queue equal one process on the batch
    [shard 0, shard 1] with batch norm split into 2 groups (the processes keep their queues and teachers equal
    without DDP re-sending the buffers)."""
    flags = ["--dataset_name", str(parquet_shards), "--streaming", "--num_warmup_steps", "0", "--max_train_steps", "2"]
    two = tmp_path / "two"
    done = launch_two_processes(two, *flags)
    args = json.loads((two / "training_args.json").read_text())
    assert args["num_processes"] == 2 and args["global_batch_size"] == 16
    assert "processes 2" in done.stderr and "global batch 16" in done.stderr

    one = tmp_path / "one"
    run_main(pretrain, one, *flags, "--per_device_train_batch_size", "16", "--batchnorm_groups", "2")
    for step in (1, 2):
        loss_two, loss_one = read_log(two)[step]["train/loss"], read_log(one)[step]["train/loss"]
        assert loss_two == pytest.approx(loss_one, abs=1e-5), (step, loss_two, loss_one)
    queue_two = SCEForPreTraining.from_pretrained(two / "pretraining").queue
    queue_one = SCEForPreTraining.from_pretrained(one / "pretraining").queue
    torch.testing.assert_close(queue_two, queue_one, atol=1e-5, rtol=0)

    # Negative control: one process on shard 0 twice (what both ranks would see without the shard split) differs.
    shard0 = tmp_path / "shard0"
    shard0.mkdir()
    first = sorted(parquet_shards.glob("*.parquet"))[0]
    for name in ("a.parquet", "b.parquet"):
        shutil.copy(first, shard0 / name)
    control = tmp_path / "control"
    run_main(pretrain, control, *flags, "--dataset_name", str(shard0), "--per_device_train_batch_size", "16",
             "--batchnorm_groups", "2")
    assert abs(read_log(control)[1]["train/loss"] - loss_one) > 1e-3


def test_two_processes_end_a_stream_epoch_together_when_shards_differ(tmp_path):
    """Shard 0 holds one batch per process, shard 1 two: rank 1 must not start a second forward (an all-gather rank 0
    never joins) while rank 0 saves the end-of-epoch checkpoint. Every epoch ends when the first shard does."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _gray_dataset(8, seed=1).to_parquet(str(shards / "train-00000-of-00002.parquet"))
    _gray_dataset(16, seed=2).to_parquet(str(shards / "train-00001-of-00002.parquet"))
    out = tmp_path / "out"
    launch_two_processes(out, "--dataset_name", str(shards), "--streaming", "--num_warmup_steps", "0", "--max_train_steps",
                         "3", "--checkpointing_steps", "epoch")
    log = read_log(out)
    assert [log[step]["train/epoch"] for step in (1, 2, 3)] == [0, 1, 2]  # one step per epoch: rank 0's shard
    assert assert_checkpoint(out, "epoch_2")["completed_steps"] == 2


def test_two_processes_skip_a_batch_one_of_them_cannot_read_together(tmp_path):
    """Rank 1's first batch holds only unreadable images. Skipping it on rank 1 alone would leave rank 0 waiting in
    the forward's all-gather for ever; both ranks must skip it and go on."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    from sce_hf.data import EpochBatchSampler

    num_rows, per_device = 16, 4
    first_batch_of_rank_1 = {ref.index for ref in next(iter(EpochBatchSampler(num_rows, per_device, 2, 1, seed=42, epoch=0)))}
    rng = np.random.default_rng(3)
    images = []
    for index in range(num_rows):
        if index in first_batch_of_rank_1:
            images.append({"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": None})
        else:
            buffer = io.BytesIO()
            _random_image(rng, 20, 20).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
    data = tmp_path / "data"
    Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).save_to_disk(str(data))

    out = tmp_path / "out"
    launch_two_processes(out, "--dataset_name", str(data), "--per_device_train_batch_size", str(per_device),
                         "--max_train_steps", "2", "--max_bad_image_fraction", "0.9", "--seed", "42")
    assert sorted(read_log(out)) == [1, 2]
    assert read_log(out)[2]["train/num_bad_images"] >= per_device  # the skipped batch, and any drawn again in epoch 1


# ------------------------------------------------------------------------------------------------------------------
# 6. Bad input


def test_missing_image_column_lists_the_columns(pretrain, saved_dataset, tmp_path):
    with pytest.raises((ValueError, SystemExit)) as error:
        run_main(pretrain, tmp_path / "out", "--dataset_name", str(saved_dataset), "--image_column_name", "nope",
                 "--max_train_steps", "1")
    message = str(error.value)
    assert "'nope'" in message and "'image'" in message and "'label'" in message, message


def test_empty_dataset_is_a_clear_error(pretrain, tmp_path):
    empty = tmp_path / "empty"
    _gray_dataset(0, seed=0).save_to_disk(str(empty))
    for streaming in ([], ["--streaming", "--num_warmup_steps", "0"]):
        with pytest.raises((ValueError, SystemExit), match="is empty: there is nothing to train on"):
            run_main(pretrain, tmp_path / "out", "--dataset_name", str(empty), "--max_train_steps", "1", *streaming)

    # A stream of an empty data file: the run must stop, not look for a first batch for ever.
    empty_file = tmp_path / "empty.parquet"
    _gray_dataset(0, seed=0).to_parquet(str(empty_file))
    with pytest.raises(SystemExit, match="yielded no batch: the stream is empty or holds fewer than"):
        run_main(pretrain, tmp_path / "out", "--dataset_name", str(empty_file), "--streaming", "--num_warmup_steps", "0",
                 "--max_train_steps", "1")


def test_batch_too_small_for_batch_norm_groups_is_a_clear_error(pretrain, saved_dataset, tmp_path):
    """The resnet18-small preset splits the teacher's batch norm in 8 groups: a batch of 8 leaves 1 image each."""
    with pytest.raises(SystemExit, match=r"--split_batchnorm_groups 8 splits the per-device batch of 8 images into groups of 1"):
        run_main(pretrain, tmp_path / "out", "--dataset_name", str(saved_dataset), "--max_train_steps", "1",
                 "--split_batchnorm_groups", "8")
    with pytest.raises(SystemExit, match=r"--batchnorm_groups 3 .* multiple of 3 and at least 6"):
        run_main(pretrain, tmp_path / "out", "--dataset_name", str(saved_dataset), "--max_train_steps", "1",
                 "--batchnorm_groups", "3")


def _write_odd_images(folder: Path) -> None:
    """Grayscale, grayscale+alpha, RGBA, palette, CMYK JPEG and 1x1 images: all must train."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    _random_image(rng, 21, 17, "L").save(folder / "gray.png")
    _random_image(rng, 19, 25, "LA").save(folder / "gray_alpha.png")
    _random_image(rng, 30, 24, "RGBA").save(folder / "rgba.png")
    _random_image(rng, 22, 22, "P").save(folder / "palette.png")
    _random_image(rng, 26, 20, "CMYK").save(folder / "cmyk.jpg")
    _random_image(rng, 1, 1, "RGB").save(folder / "tiny_rgb.png")
    _random_image(rng, 1, 1, "L").save(folder / "tiny_gray.png")


def test_unreadable_image_is_skipped_counted_and_logged(pretrain, tmp_path, caplog):
    """16 files, batch 8, 2 steps: every file is read once, one of them is junk. With the teacher's batch norm
    split in 2 groups, the batch holding the bad file must still train."""
    folder = tmp_path / "images"
    make_image_folder(folder, 8)
    _write_odd_images(folder / "odd")
    (folder / "odd" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    assert sum(1 for _ in folder.rglob("*.*")) == 16
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        results = run_main(pretrain, out, "--train_dir", str(folder), "--max_train_steps", "2", "--split_batchnorm_groups", "2")
    assert results["completed_steps"] == 2
    assert results["num_bad_images"] == 1
    assert "Skipping unreadable image" in caplog.text
    assert read_log(out)[2]["train/num_bad_images"] == 1
    assert_exported(out, steps=2)


def test_too_many_unreadable_images_stop_the_run(pretrain, tmp_path):
    folder = tmp_path / "images"
    make_image_folder(folder, 8)
    for i in range(8):
        (folder / "dog" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff junk " * i)
    with pytest.raises(SystemExit, match=r"could not be decoded, more than --max_bad_image_fraction 0.01"):
        run_main(pretrain, tmp_path / "out", "--train_dir", str(folder), "--max_train_steps", "2")


# ------------------------------------------------------------------------------------------------------------------
# 7. Optimisation and monitoring options


def test_gradient_accumulation_feeds_the_queue_once_per_optimizer_step(pretrain, saved_dataset, tmp_path, monkeypatch):
    calls = []
    original = SCEForPreTraining.enqueue

    def recording_enqueue(self, keys):
        calls.append(keys.shape[0])
        return original(self, keys)

    monkeypatch.setattr(SCEForPreTraining, "enqueue", recording_enqueue)
    out = tmp_path / "accumulate"
    run_main(pretrain, out, "--dataset_name", str(saved_dataset), "--gradient_accumulation_steps", "2",
             "--max_train_steps", "2", "--warmup_epochs", "0")
    # 2 optimizer steps, each: 2 micro-batches x 8 keys of view 0 (the preset's weak-teacher, non-symmetric mode).
    assert calls == [2 * 8, 2 * 8]
    log = read_log(out)
    assert sorted(log) == [1, 2]
    assert log[1]["train/lr"] == pytest.approx(0.5 * (8 * 2) / 256)  # base lr x global batch / 256, no warm-up
    pretraining = SCEForPreTraining.from_pretrained(out / "pretraining")
    assert pretraining.num_enqueued.item() == 32 and pretraining.queue_ptr.item() == 32


def test_continuing_from_a_pretraining_folder_trains_in_train_mode(pretrain, saved_dataset, tmp_path):
    """`from_pretrained` returns a model in eval mode; the run must switch it back, or batch norm would normalise with
    (and never update) its running statistics."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_main(pretrain, first, "--dataset_name", str(saved_dataset), "--max_train_steps", "2")
    run_main(pretrain, second, "--dataset_name", str(saved_dataset), "--max_train_steps", "1",
             "--model_name_or_path", str(first / "pretraining"))
    before = SCEForPreTraining.from_pretrained(first / "pretraining").state_dict()
    after = SCEForPreTraining.from_pretrained(second / "pretraining").state_dict()
    running = [name for name in before if name.endswith("running_mean")]
    assert running and all(not torch.equal(before[name], after[name]) for name in running), "batch norm did not train"
    assert_exported(second, steps=1)


def test_bf16_and_channels_last(pretrain, saved_dataset, tmp_path):
    out = tmp_path / "bf16"
    run_main(pretrain, out, "--dataset_name", str(saved_dataset), "--max_train_steps", "2", "--mixed_precision", "bf16",
             "--channels_last")
    assert all(np.isfinite(row["train/loss"]) for row in read_log(out).values())
    assert json.loads((out / "training_args.json").read_text())["mixed_precision"] == "bf16"
    assert_exported(out, steps=2)


def test_torch_compile_traces_the_step_and_matches_eager(pretrain, saved_dataset, tmp_path):
    """--torch_compile goes through accelerate's dynamo plugin; aot_eager traces forward and backward (what inductor
    compiles) without generating code, so the losses must equal the eager run's."""
    from torch._dynamo.utils import counters

    flags = ("--dataset_name", str(saved_dataset), "--max_train_steps", "2", "--mixed_precision", "no")
    run_main(pretrain, tmp_path / "eager", *flags)
    torch._dynamo.reset()
    counters.clear()
    run_main(pretrain, tmp_path / "compiled", *flags, "--torch_compile", "--torch_compile_backend", "aot_eager")
    assert counters["stats"]["unique_graphs"] > 0 and counters["aot_autograd"]["total"] > 0  # it was compiled
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2]
    for step in (1, 2):
        assert compiled[step]["train/loss"] == pytest.approx(eager[step]["train/loss"], abs=1e-4)
    assert_exported(tmp_path / "compiled", steps=2)


def test_online_knn_final_knn_and_tensorboard(pretrain, saved_dataset, tmp_path):
    out = tmp_path / "knn"
    results = run_main(pretrain, out, "--dataset_name", str(saved_dataset), "--max_train_steps", "4",
                       "--eval_split", "train", "--eval_every", "1", "--final_knn", "true", "--max_knn_bank_samples", "16",
                       "--knn_k", "3", "--with_tracking", "--report_to", "tensorboard")
    assert 0.0 <= results["knn_top1"] <= 1.0
    (entry,) = [r for r in json.loads((out / "eval_results.json").read_text()) if r["task"] == "knn"]
    assert entry["value"] == round(100 * results["knn_top1"], 2) and entry["settings"]["k"] == 3
    assert any("tfevents" in name for _, _, files in os.walk(out) for name in files)


def test_push_to_hub_offline_fails_with_one_clear_line(pretrain, saved_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "push"
    with pytest.raises(SystemExit, match="offline"):
        run_main(pretrain, out, "--dataset_name", str(saved_dataset), "--max_train_steps", "1", "--push_to_hub",
                 "--hub_model_id", "sce-hf/tiny-test")
    assert_exported(out, steps=1)  # the local export is complete all the same
