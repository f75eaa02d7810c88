"""SCE learns, not just runs: a tiny encoder on 256 real Fashion-MNIST images."""

import copy

import torch

from sce_hf import SCEConfig, SCEForPreTraining
from sce_hf.augmentations import SCEAugmentation, get_recipe, make_sample_seeds
from sce_hf.data import read_idx


def _own_key_ranked_first(model: SCEForPreTraining, views: list[torch.Tensor]) -> tuple[float, float]:
    """For each image: is its query (view 1) closest to its own key (view 0)?

    Returns the fraction among the loss's candidates (own key + queue) and among the keys of all images + queue.
    """
    model.eval()  # held-back views: batch-norm statistics frozen
    with torch.no_grad():
        keys, queries = model.teacher_embed(views[0]), model.student_embed(views[1])  # (N, d) each
        positive = (queries * keys).sum(dim=1)  # (N,)
        among_candidates = (positive > (queries @ model.queue.T).max(dim=1).values).float().mean().item()
        all_keys = torch.cat([keys, model.queue])  # (N + K, d)
        among_all = ((queries @ all_keys.T).argmax(dim=1) == torch.arange(len(keys))).float().mean().item()
    model.train()
    return among_candidates, among_all


def test_sce_learns_on_real_fashion_mnist(fashion_mnist_dir):
    torch.manual_seed(0)
    images = torch.from_numpy(read_idx(f"{fashion_mnist_dir}/train-images-idx3-ubyte.gz")[:256].copy()).unsqueeze(1)
    config = SCEConfig.from_preset(
        "resnet18-small",
        backbone_config=dict(model_type="resnet", layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64], embedding_size=16),
        projector_hidden_size=128, projector_output_size=64, queue_size=128, symmetric=True,
        split_batchnorm_groups=1, shuffle_teacher_batch=False, momentum_schedule="constant", initial_momentum=0.9,
    )
    model = SCEForPreTraining(config)
    initial = copy.deepcopy(model)
    augment = SCEAugmentation(get_recipe("fashion-mnist", crop_scale=(0.5, 1.0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    losses, max_steps, batch_size = [], 200, 64
    for step in range(max_steps):
        epoch, offset = divmod(step * batch_size, len(images))
        indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))[offset : offset + batch_size]
        output = model(pixel_values=augment(images[indices], make_sample_seeds(0, epoch, indices)))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        model.update_teacher(model.momentum_at(step, max_steps))
        model.enqueue(output.teacher_keys)
        losses.append(output.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))

    # Held-back augmentations: seeds never used in training, milder views (crop, flip).
    held_back = SCEAugmentation(get_recipe("fashion-mnist", crop_scale=(0.7, 1.0), jitter_p=0.0, blur_p=0.0, solarize_p=0.0))
    views = held_back(images, make_sample_seeds(123, 10_000, torch.arange(len(images))))

    # The training loss is not comparable across steps (the queue fills with harder keys), so the loss of the
    # initial and of the trained model are compared on the same views against the same queue.
    initial.queue.copy_(model.queue)
    with torch.no_grad():
        loss_initial, loss_trained = initial(pixel_values=views).loss.item(), model(pixel_values=views).loss.item()
    assert loss_trained < loss_initial - 0.5, f"the loss did not fall: {loss_initial:.3f} -> {loss_trained:.3f}"

    among_candidates, among_all = _own_key_ranked_first(model, views)
    # Chance: 1/129 among the candidates, 1/384 among all keys.
    assert among_candidates > 0.5, f"own key first among its candidates for only {among_candidates:.1%} of the images"
    assert among_all > 0.3, f"own key first among all keys for only {among_all:.1%} of the images"
