"""Evaluation of frozen encoders: feature extraction and weighted k-NN classification.

The weighted k-NN follows the protocol common to self-supervised libraries (Wu et al., 2018): features are
L2-normalised, each query takes its k most cosine-similar bank items, and each neighbour votes for its label with
weight exp(cosine / T).
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
            output = model(pixel_values=pixel_values.to(device))
            pooled = output.pooler_output if hasattr(output, "pooler_output") else output[1]
            features.append(pooled.flatten(1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(features)


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
        votes = torch.zeros(queries.shape[0], num_classes)
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


__all__ = ["extract_features", "knn_accuracy", "knn_predict", "processor_transform", "raw_pixel_features"]
