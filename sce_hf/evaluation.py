"""Evaluation of frozen encoders: feature extraction, weighted k-NN, linear probe and retrieval R@k.

The weighted k-NN follows the protocol common to self-supervised libraries (Wu et al., 2018): features are
L2-normalised, each query takes its k most cosine-similar bank items, and each neighbour votes for its label with
weight exp(cosine / T). Retrieval follows the authors (SCE_SPEC §5.3); the linear probe SCE_SPEC §6.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import decode_image, without_image_decoding


logger = logging.getLogger(__name__)

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, for the cached-feature probe's standardisation


class _ProcessedImages(torch.utils.data.Dataset):
    def __init__(self, dataset, image_column: str, transform: Callable):
        self.dataset = without_image_decoding(dataset, image_column)
        self.image_column = image_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(decode_image(self.dataset[index][self.image_column]))


def processor_transform(processor) -> Callable:
    """A PIL image → (C, H, W) float tensor through an image processor (the evaluation transform)."""

    def transform(image):
        return processor(image, return_tensors="pt")["pixel_values"][0]

    return transform


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset,
    transform: Callable,
    image_column: str = "image",
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "features",
) -> torch.Tensor:
    """`pooler_output` of `model` for every image of `dataset`, in order, as float32 (N, feature_dim) on CPU.

    `model` is any encoder whose output has `pooler_output` (an `SCEModel`, or another `AutoModel`); it runs in
    eval mode (batch-norm statistics frozen) and is put back in its previous mode afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        _ProcessedImages(dataset, image_column, transform), batch_size=batch_size, num_workers=num_workers
    )
    was_training = model.training
    model.eval()
    features = []
    try:
        for pixel_values in tqdm(loader, desc=description, disable=not progress, leave=False):
            features.append(pooled_features(model(pixel_values=pixel_values.to(device)), model).cpu())
    finally:
        model.train(was_training)
    return torch.cat(features)


def pooled_features(output, model: torch.nn.Module | None = None) -> torch.Tensor:
    """The `(B, d)` float32 features of a model output: its `pooler_output` (flattened: a ResNet's is
    `(B, d, 1, 1)`).

    Raises:
        ValueError: when the output has no pooled representation (e.g. a ViT saved without its pooling layer).
    """
    if isinstance(output, (tuple, list)):  # return_dict=False: (last_hidden_state, pooler_output, ...)
        pooled = output[1] if len(output) > 1 else None
    else:
        pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        name = type(model).__name__ if model is not None else "the model"
        raise ValueError(
            f"{name} returns no `pooler_output`: evaluation needs one vector per image. Load the model with its "
            "pooling layer (e.g. `add_pooling_layer=True` for ViT) or use an encoder that pools."
        )
    return pooled.flatten(1).float()


def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""Weighted k-NN labels of the queries.

    For query q with neighbours n_1..n_k (the bank items of highest cosine similarity s_j), the score of class c
    is :math:`\sum_j \mathbb 1[y_{n_j} = c] \exp(s_j / T)`; the prediction is the arg-max.

    Args:
        bank_features (`torch.Tensor` of shape `(N, d)`), bank_labels (`torch.Tensor` of shape `(N,)`).
        query_features (`torch.Tensor` of shape `(Q, d)`): features are L2-normalised here.
        k (`int`, defaults to 20), temperature (`float`, defaults to 0.07).

    Returns:
        `torch.Tensor` of shape `(Q,)`: predicted labels.
    """
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Features must be (N, d) and (Q, d) with the same d, got {tuple(bank_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if bank_labels.shape != (bank_features.shape[0],):
        raise ValueError(f"`bank_labels` must have shape ({bank_features.shape[0]},), got {tuple(bank_labels.shape)}.")
    if k < 1 or not temperature > 0:
        raise ValueError(f"`k` must be >= 1 and `temperature` > 0, got k={k}, temperature={temperature}.")
    k = min(k, bank_features.shape[0])
    num_classes = num_classes or int(bank_labels.max()) + 1
    bank = F.normalize(bank_features.float(), dim=1)
    labels = bank_labels.long()
    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        queries = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (in [0, 1]) of :func:`knn_predict`."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predictions = knn_predict(bank_features, bank_labels, query_features, k, temperature, num_classes)
    return (predictions == query_labels.long()).float().mean().item()


def retrieval_recall_at_k(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10, 15, 20, 25),
    chunk_size: int = 1024,
) -> dict[int, float]:
    r"""Retrieval recall R@k as the authors report it (SCE_SPEC §5.3).

    Each set is centred by subtracting its own mean, then L2-normalised; similarity is the cosine. R@k is the
    fraction of queries whose k nearest bank items hold at least one item of the query's label.

    Args:
        bank_features (`torch.Tensor` of shape `(N, d)`), bank_labels (`(N,)`),
        query_features (`torch.Tensor` of shape `(Q, d)`), query_labels (`(Q,)`).

    Returns:
        `dict[int, float]`: R@k in [0, 1] for each k.
    """
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Features must be (N, d) and (Q, d) with the same d, got {tuple(bank_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"`ks` must be positive integers, got {ks}.")
    bank = F.normalize(bank_features.float() - bank_features.float().mean(dim=0), dim=1)
    queries_all = F.normalize(query_features.float() - query_features.float().mean(dim=0), dim=1)
    max_k = min(max(ks), bank.shape[0])
    hits = {k: 0 for k in ks}
    for start in range(0, queries_all.shape[0], chunk_size):
        queries = queries_all[start : start + chunk_size]
        neighbours = (queries @ bank.T).topk(max_k, dim=1).indices  # (q, max_k)
        same = bank_labels.long()[neighbours] == query_labels.long()[start : start + chunk_size, None]  # (q, max_k)
        for k in ks:
            hits[k] += same[:, :k].any(dim=1).sum().item()
    return {k: hits[k] / queries_all.shape[0] for k in ks}


def linear_probe_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    r"""The fast linear probe: a linear layer trained on cached features of the frozen encoder.

    Features are standardised with the training set's mean and variance as a frozen batch norm without affine
    parameters does, :math:`(x - \mu) / \sqrt{\sigma^2 + 10^{-5}}` (a near-constant feature is not blown up); the
    layer is trained with SGD (momentum 0.9, `weight_decay`, lr = `learning_rate` × batch / 256) and a cosine
    schedule, with the cross-entropy loss (SCE_SPEC §6, without augmentation).

    Args:
        train_features (`torch.Tensor` of shape `(N, d)`), train_labels (`(N,)`),
        test_features (`torch.Tensor` of shape `(Q, d)`, or `(Q, V, d)` for V views per test item, e.g. the 10 clips
            x 3 crops of a video: then the softmax predictions are averaged over the views, SCE_SPEC §5.3),
        test_labels (`(Q,)`).

    Returns:
        `dict` with `top1` and `top5` (in [0, 1]) on the test features and the final training loss.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = train_features.mean(dim=0)
    std = (train_features.var(dim=0, unbiased=False) + BATCH_NORM_EPS).sqrt()
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    batch_size = min(batch_size, train_x.shape[0])
    lr = learning_rate * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, train_x.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    labels = train_labels.long()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(train_x.shape[0], generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        scores = head(test_x)  # (Q, classes), or (Q, V, classes)
        if scores.ndim == 3:
            scores = scores.softmax(dim=-1).mean(dim=1)  # predictions averaged over each item's views
    top5 = scores.topk(min(5, num_classes), dim=1).indices
    return {
        "top1": (scores.argmax(dim=1) == test_labels.long()).float().mean().item(),
        "top5": (top5 == test_labels.long()[:, None]).any(dim=1).float().mean().item(),
        "train_loss": loss.item(),
    }


def linear_probe_with_augmentation(
    encoder: torch.nn.Module,
    train_dataset,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    crop_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_column: str = "image",
    epochs: int = 90,
    batch_size: int = 256,
    learning_rate: float = 0.1,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """The authors' linear evaluation (SCE_SPEC §6): a frozen encoder (eval mode), a linear layer trained with SGD
    (momentum 0.9, no weight decay, lr = `learning_rate` × batch / 256, cosine) on random-resized crops
    (scale 0.08–1) with horizontal flips; tested on `test_features` from the evaluation transform.

    Slower than :func:`linear_probe_on_features` (the encoder runs every epoch); meant for accelerators.
    """
    from .augmentations import SCEAugmentation, ViewRecipe
    from .data import EpochBatchSampler, ViewsDataset, collate_views

    device = next(encoder.parameters()).device
    view = ViewRecipe(crop_size=crop_size, crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                      solarize_p=0.0, flip_p=0.5, mean=tuple(mean), std=tuple(std))
    augment = SCEAugmentation([view])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(test_features.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(head.weight)  # as the cached-feature probe: the result does not depend on an initial draw
    torch.nn.init.zeros_(head.bias)
    lr = learning_rate * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = len(train_dataset) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    dataset = ViewsDataset(train_dataset, image_column, [view], seed, crop_on_device=False)
    labels = train_labels.long()
    was_training = encoder.training
    encoder.eval()
    try:
        for epoch in tqdm(range(epochs), desc="linear probe (augmented)", disable=not progress, leave=False):
            sampler = EpochBatchSampler(len(train_dataset), batch_size, 1, 0, seed, epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views,
                                                 num_workers=num_workers)
            for batch in loader:
                if batch.get("views") is None:
                    continue
                (pixel_values,) = augment([batch["views"][0].to(device)], batch["sample_seeds"])
                with torch.no_grad():
                    features = pooled_features(encoder(pixel_values=pixel_values), encoder)
                loss = F.cross_entropy(head(features), labels[batch["indices"]].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    finally:
        encoder.train(was_training)
    with torch.no_grad():
        logits = head(test_features.to(device).float()).cpu()
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    return {
        "top1": (logits.argmax(dim=1) == test_labels.long()).float().mean().item(),
        "top5": (top5 == test_labels.long()[:, None]).any(dim=1).float().mean().item(),
    }


def raw_pixel_features(dataset, image_column: str = "image", size: int | None = None, center: bool = False) -> torch.Tensor:
    """Flattened pixels in [0, 1] (N, H·W·C) as features: the raw-pixel baseline. `center` subtracts each image's mean."""
    dataset = without_image_decoding(dataset, image_column)
    rows = []
    for row in dataset:
        image = decode_image(row[image_column])
        if size is not None:
            image = image.resize((size, size))
        rows.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)  # RGB; gray is replicated, cosine unchanged
    features = torch.from_numpy(np.stack(rows))
    return features - features.mean(dim=1, keepdim=True) if center else features


__all__ = [
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_on_features",
    "linear_probe_with_augmentation",
    "pooled_features",
    "processor_transform",
    "raw_pixel_features",
    "retrieval_recall_at_k",
]
