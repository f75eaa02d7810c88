"""Two CPU processes (gloo) compute what one process computes on the whole global batch.

`accelerate.debug_launcher` forks two processes that join a gloo process group (ENVIRONMENT.md, "accelerate with
2 processes on a CPU machine"). Each rank reads its inputs from files in a temporary folder, works on its slice of
the global batch, and `torch.save`s its results; the parent test then compares them with a single-process run on
the whole batch:

1. `sce_loss` with the keys all-gathered across ranks (SCE_SPEC §1.4, §8.4: positive of local row i on rank r at
   column r·B + i), averaged over ranks as DDP averages gradients, equals the single-process loss on the full
   batch (and so do the query gradients); enqueueing the gathered keys (view 0 of all ranks, then view 1,
   SCE_SPEC §2.3, §8.7) leaves every rank's queue equal to the single-process queue.
2. A whole `SCEForPreTraining` training step under DistributedDataParallel (per-sample seeded augmentations, plain
   per-process batch norm) equals one process whose every batch norm is split into 2 groups (SCE_SPEC §2.4):
   loss, keys, student and teacher parameters, queue and pointer, and the batch-norm running statistics.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F


accelerate = pytest.importorskip("accelerate")

from sce_hf import SCEForPreTraining  # noqa: E402
from sce_hf.augmentations import SCEAugmentation, get_recipe  # noqa: E402
from sce_hf.batchnorm import convert_to_split_batchnorm  # noqa: E402
from sce_hf.losses import sce_loss  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


WORLD_SIZE = 2
LOCAL_BATCH = 4  # B: images per process; the global batch is WORLD_SIZE * B
EMBED_DIM = 10  # tiny_config's projector_output_size
QUEUE_SIZE = 36  # tiny_config's queue_size: not a multiple of the 16 keys per step, so the ring wraps mid-step
NUM_ENQUEUE_STEPS = 3  # 3 x 16 keys > 36: the pointer wraps around
NUM_TRAIN_STEPS = 2  # the 2nd step's loss uses the queue and teacher that the 1st step updated
LEARNING_RATE = 0.1
MOMENTUM = 0.99
IMAGE_SIZE = 16
# float64 trunk and heads: in float32, two SGD steps of this tiny model (batch norm over 4 samples, τ_m = 0.07)
# amplify rounding to ~1e-4 on the parameters, as much between a float32 and a float64 single-process run as
# between 2 processes and 1. In float64 the two runs agree to ~1e-13 (the embeddings are still cast to float32).
MODEL_DTYPE = torch.float64
STEP_ATOL = 1e-8
LOSS_KWARGS = dict(coeff=0.3, temperature=0.1, target_temperature=0.07)


def _rank_slice(rank: int) -> slice:
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _rank_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, as DDP averages gradients."""
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _launch(worker, *args) -> list[dict]:
    """Run `worker(*args)` in WORLD_SIZE forked gloo processes; return what each rank saved to `args[0]`."""
    tmpdir = args[0]
    accelerate.debug_launcher(worker, args=args, num_processes=WORLD_SIZE)
    results = []
    for rank in range(WORLD_SIZE):
        path = os.path.join(tmpdir, f"rank{rank}.pt")
        assert os.path.exists(path), f"rank {rank} wrote no results"
        results.append(torch.load(path))
    return results


def _finish(tmpdir: str, results: dict) -> None:
    torch.save(results, os.path.join(tmpdir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------------------------
# 1. The loss with gathered keys, and the queue


def _loss_queue_worker(tmpdir: str, in_batch_keys: bool) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD_SIZE
    data = torch.load(os.path.join(tmpdir, "data.pt"))
    rows = _rank_slice(rank)

    # The loss on this rank's slice, with the keys of every rank as candidates in in-batch-keys mode.
    query = data["query"][rows].clone().requires_grad_(True)
    key = data["key"][rows].clone()
    gathered = _all_gather(key)
    kwargs = dict(LOSS_KWARGS, in_batch_keys=in_batch_keys)
    if in_batch_keys:
        kwargs.update(gathered_keys=gathered, positive_offset=rank * LOCAL_BATCH)
    loss = sce_loss(query, key, data["queue"], **kwargs)
    loss.backward()

    # The queue: every rank builds the same model (same seed), then enqueues the gathered keys of each step.
    torch.manual_seed(0)
    model = SCEForPreTraining(tiny_config("resnet"))
    initial_queue = model.queue.clone()
    for step_keys in data["step_keys"]:  # (V, 2B, d): view v's keys of the whole global batch
        local = [view_keys[rows] for view_keys in step_keys]
        model.enqueue(torch.cat([_all_gather(view_keys) for view_keys in local]))  # view 0 of all ranks, then view 1

    _finish(
        tmpdir,
        dict(
            gathered=gathered,
            loss=loss.detach(),
            loss_mean=_rank_mean(loss),
            query_grad=query.grad,  # gradient of this rank's loss; DDP would divide it by the world size
            initial_queue=initial_queue,
            queue=model.queue.clone(),
            queue_ptr=model.queue_ptr.clone(),
            num_enqueued=model.num_enqueued.clone(),
        ),
    )


@pytest.mark.parametrize("in_batch_keys", [False, True], ids=["queue_only", "in_batch_keys"])
def test_loss_and_queue_match_single_process(tmp_path, in_batch_keys):
    generator = torch.Generator().manual_seed(1234)
    global_batch = WORLD_SIZE * LOCAL_BATCH

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    data = dict(
        query=unit(global_batch, EMBED_DIM),
        key=unit(global_batch, EMBED_DIM),
        queue=unit(QUEUE_SIZE, EMBED_DIM),
        step_keys=[unit(2, global_batch, EMBED_DIM).float() for _ in range(NUM_ENQUEUE_STEPS)],
    )
    torch.save(data, tmp_path / "data.pt")
    ranks = _launch(_loss_queue_worker, str(tmp_path), in_batch_keys)

    # Single process, whole batch: the gathered keys are the batch's own keys and the offset is 0.
    query = data["query"].clone().requires_grad_(True)
    kwargs = dict(LOSS_KWARGS, in_batch_keys=in_batch_keys)
    if in_batch_keys:
        kwargs.update(gathered_keys=data["key"], positive_offset=0)
    loss = sce_loss(query, data["key"], data["queue"], **kwargs)
    loss.backward()

    torch.manual_seed(0)
    model = SCEForPreTraining(tiny_config("resnet"))
    for step_keys in data["step_keys"]:
        model.enqueue(torch.cat(list(step_keys)))

    for rank, result in enumerate(ranks):
        _assert_close(result["gathered"], data["key"], 0.0, f"rank {rank} gathered keys")
        _assert_close(result["loss_mean"], loss.detach(), 1e-6, f"rank {rank} rank-mean loss")
        # d(mean over ranks of the local losses)/dq = the local gradient / world size = the full-batch gradient.
        _assert_close(
            result["query_grad"] / WORLD_SIZE, query.grad[_rank_slice(rank)], 1e-6, f"rank {rank} query gradient"
        )
        _assert_close(result["initial_queue"], ranks[0]["initial_queue"], 0.0, f"rank {rank} initial queue")
        _assert_close(result["queue"], model.queue, 0.0, f"rank {rank} queue")
        assert result["queue_ptr"].item() == model.queue_ptr.item() == (NUM_ENQUEUE_STEPS * 2 * global_batch) % QUEUE_SIZE
        assert result["num_enqueued"].item() == model.num_enqueued.item() == NUM_ENQUEUE_STEPS * 2 * global_batch
    # The per-rank losses differ (each holds its own anchors): the comparison above is not trivially satisfied.
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
    # The queue really moved: its last-written rows hold the last step's keys.
    assert not torch.equal(model.queue, ranks[0]["initial_queue"])


# ------------------------------------------------------------------------------------------------------------------
# 2. A whole SCEForPreTraining step under DDP vs one process with split batch norm


def _pretraining_config(in_batch_keys: bool):
    return tiny_config("resnet", split_batchnorm_groups=1, shuffle_teacher_batch=False, in_batch_keys=in_batch_keys)


def _build_model(in_batch_keys: bool, split_batchnorm_groups: int = 1) -> SCEForPreTraining:
    """The same initialisation in every process; every batch norm (student and teacher) split if asked."""
    torch.manual_seed(0)
    model = SCEForPreTraining(_pretraining_config(in_batch_keys))
    # Split before the cast: convert_to_split_batchnorm builds float32 layers whatever the model's dtype.
    convert_to_split_batchnorm(model, split_batchnorm_groups)
    model.to(MODEL_DTYPE)
    model.train()
    return model


def _augment(images: torch.Tensor, seeds: torch.Tensor) -> list[torch.Tensor]:
    views = SCEAugmentation(get_recipe("fashion-mnist", crop_size=IMAGE_SIZE))(images, seeds)
    return [view.to(MODEL_DTYPE) for view in views]


def _step_seeds(data: dict, step: int) -> torch.Tensor:
    return data["seeds"] + 1000 * step


def _training_step_worker(tmpdir: str, in_batch_keys: bool) -> None:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    data = torch.load(os.path.join(tmpdir, "data.pt"))
    rows = _rank_slice(rank)

    model = _build_model(in_batch_keys)
    # broadcast_buffers=False: each rank keeps its own batch-norm running statistics, so their mean over ranks can
    # be compared with split batch norm's (with the default, rank 0's statistics overwrite the others' each forward).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.13 deprecates broadcast_buffers
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LEARNING_RATE)
    results: dict = dict(views=[], loss=[], loss_mean=[], keys=[])
    for step in range(NUM_TRAIN_STEPS):
        views = _augment(data["images"][rows], _step_seeds(data, step)[rows])
        out = ddp(pixel_values=views)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_teacher(MOMENTUM)
        model.enqueue(out.teacher_keys)
        results["views"].append(views)
        results["loss"].append(out.loss.detach())
        results["loss_mean"].append(_rank_mean(out.loss))
        results["keys"].append(out.teacher_keys)
    results["state"] = {name: value.detach().clone() for name, value in model.state_dict().items()}
    _finish(tmpdir, results)


@pytest.mark.parametrize("in_batch_keys", [False, True], ids=["queue_only", "in_batch_keys"])
def test_pretraining_step_matches_split_batchnorm_single_process(tmp_path, in_batch_keys):
    generator = torch.Generator().manual_seed(4321)
    global_batch = WORLD_SIZE * LOCAL_BATCH
    data = dict(
        images=torch.randint(0, 256, (global_batch, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8),
        seeds=torch.arange(global_batch, dtype=torch.int64) + 1000,
    )
    torch.save(data, tmp_path / "data.pt")
    ranks = _launch(_training_step_worker, str(tmp_path), in_batch_keys)

    # Single process on the whole batch: every batch norm (student and teacher) split into one group per process.
    model = _build_model(in_batch_keys, split_batchnorm_groups=WORLD_SIZE)
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    reference: dict = dict(views=[], loss=[], keys=[])
    for step in range(NUM_TRAIN_STEPS):
        views = _augment(data["images"], _step_seeds(data, step))
        out = model(pixel_values=views)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_teacher(MOMENTUM)
        model.enqueue(out.teacher_keys)
        reference["views"].append(views)
        reference["loss"].append(out.loss.detach())
        reference["keys"].append(out.teacher_keys)
    state = model.state_dict()
    parameter_names = {name for name, _ in model.named_parameters()}
    assert any(name.startswith("teacher_") for name in parameter_names)
    assert state["queue"].shape == (QUEUE_SIZE, EMBED_DIM)

    for rank, result in enumerate(ranks):
        for step in range(NUM_TRAIN_STEPS):
            where = f"rank {rank} step {step}"
            # Per-sample seeding: a rank's views are the global batch's views of its samples.
            for v, (local, full) in enumerate(zip(result["views"][step], reference["views"][step])):
                _assert_close(local, full[_rank_slice(rank)], 1e-6, f"{where} view {v}")
            _assert_close(result["loss_mean"][step], reference["loss"][step], STEP_ATOL, f"{where} rank-mean loss")
            _assert_close(result["keys"][step], reference["keys"][step], STEP_ATOL, f"{where} gathered keys")
        assert set(result["state"]) == set(state)
        for name, expected in state.items():
            actual = result["state"][name]
            if name in parameter_names or name in ("queue", "queue_ptr", "num_enqueued"):
                _assert_close(actual, expected, STEP_ATOL, f"rank {rank} {name}")
            elif name.endswith("num_batches_tracked"):
                assert actual.item() == expected.item(), f"rank {rank} {name}: {actual.item()} != {expected.item()}"
    # Batch-norm running statistics follow linear updates: their mean over ranks is split batch norm's.
    for name, expected in state.items():
        if name.endswith(("running_mean", "running_var")):
            mean = torch.stack([result["state"][name] for result in ranks]).mean(0)
            _assert_close(mean, expected, STEP_ATOL, f"rank-mean {name}")

    # Not vacuous: the ranks saw different data, and the step moved the student, the teacher and the queue.
    assert not torch.allclose(ranks[0]["loss"][0], ranks[1]["loss"][0])
    assert torch.isfinite(torch.stack(reference["loss"])).all()
    for name in ("sce.trunk.embedder.embedder.convolution.weight", "teacher_projector.0.weight", "queue"):
        assert not torch.allclose(state[name], initial[name]), f"{name} did not change"
    assert state["queue_ptr"].item() == (NUM_TRAIN_STEPS * 2 * global_batch) % QUEUE_SIZE
