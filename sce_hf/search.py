"""Gallery index for image-similarity search: embed a dataset once, search it by cosine similarity.

Every gallery image goes through the encoder and its image processor (`sce_hf.evaluation.extract_features`,
batched, with a progress bar); the `pooler_output` features are L2-normalised, so an inner product is a cosine
similarity, and held with the dataset as a float32 column indexed by faiss (`datasets.Dataset.add_faiss_index`
with `METRIC_INNER_PRODUCT`). Exact search (`Flat`) is the default; `ivf` and `hnsw` build approximate indexes for
large galleries, whose recall against exact search :meth:`GalleryIndex.recall_at_k` measures.

The index is saved in a folder and reused when the model and the gallery are unchanged, keyed by fingerprints of
both (:func:`model_fingerprint`, :func:`dataset_fingerprint`); a stale one is rebuilt:

```
index_dir/
  gallery_index.json     fingerprints, sizes, index type (written last: a folder without it is incomplete)
  embeddings.npy         float32 (num_images, feature_dim), L2-normalised
  faiss-{type}.index     `Dataset.save_faiss_index` of each index type built on these embeddings
```

faiss is an optional dependency (the `demo` extra); it is imported when an index is built or loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import decode_image
from .evaluation import extract_features, pooled_features, processor_transform


logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw")
LABEL_COLUMN_FALLBACKS = ("label", "labels", "fine_label")
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
INDEX_FORMAT_VERSION = 1
META_FILE = "gallery_index.json"
EMBEDDINGS_FILE = "embeddings.npy"


class SearchHit(NamedTuple):
    """One search result: the gallery row, its cosine similarity to the query and its label (None if unlabelled)."""

    index: int
    score: float
    label: str | None


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


# Config keys that do not change the embeddings (where and how the model was saved; the weights' dtype is hashed
# with the weights).
_UNHASHED_KEYS = ("transformers_version", "auto_map", "architectures", "dtype", "torch_dtype")


def _without_private_keys(values: dict) -> dict:
    return {k: v for k, v in values.items() if not k.startswith("_") and k not in _UNHASHED_KEYS}


def model_fingerprint(model: torch.nn.Module, processor: Any | None = None) -> str:
    """A hex digest of what decides the embeddings: the model's class, config and weights, and the processor's
    settings. Where the model was loaded from (a folder, a Hub id) and the transformers version do not count.

    Hashes every tensor of the state dict (about 0.1 s for a ResNet-18).
    """
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    config_dict = _without_private_keys(config.to_dict()) if config is not None else {}
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    if processor is not None:
        digest.update(json.dumps(_without_private_keys(processor.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset, *, split: str | None = None, max_images: int | None = None, image_column: str = "image") -> str:
    """A hex digest of the gallery: the `datasets` fingerprint of the loaded split (a hash of its data or of the
    files it was built from), the split, the image limit, the image column and the number of rows."""
    payload = json.dumps(
        {
            "fingerprint": getattr(dataset, "_fingerprint", None),
            "split": split,
            "max_images": max_images,
            "image_column": image_column,
            "num_rows": len(dataset),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def default_index_dir(model_fp: str, dataset_fp: str) -> str:
    """Where an index lives when no folder is given: `$SCE_HF_CACHE` or `$HF_HOME/sce_hf/indexes`, one folder
    per (model, gallery) pair."""
    from huggingface_hub import constants

    root = os.environ.get("SCE_HF_CACHE") or os.path.join(constants.HF_HOME, "sce_hf", "indexes")
    key = hashlib.blake2b(f"{model_fp}:{dataset_fp}".encode(), digest_size=8).hexdigest()
    return os.path.join(root, key)


# ---------------------------------------------------------------------------------------------------------------
# faiss


def faiss_factory_string(index_type: str, num_vectors: int) -> str | None:
    """The faiss `index_factory` string of an index type for `num_vectors` vectors (None: exact `IndexFlat`).

    `ivf`: `IVF{nlist},Flat` with nlist ≈ 4·√N, at most N / 39 (faiss wants 39 training points per centroid);
    `hnsw`: `HNSW32` (32 links per node).
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index type {index_type!r}; choose one of {INDEX_TYPES}.")
    if index_type == "flat":
        return None
    if index_type == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(num_vectors)), num_vectors // 39))
        return f"IVF{nlist},Flat"
    return "HNSW32"


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is in the demo extra
        raise ImportError("The gallery index needs faiss: `pip install 'sce-hf[demo]'` (or `pip install faiss-cpu`).") from error
    return faiss


def _set_search_parameters(faiss_index, index_type: str, nprobe: int, ef_search: int) -> None:
    faiss = _import_faiss()
    if index_type == "ivf":
        faiss.extract_index_ivf(faiss_index).nprobe = nprobe
    elif index_type == "hnsw":
        faiss.ParameterSpace().set_index_parameter(faiss_index, "efSearch", ef_search)


# ---------------------------------------------------------------------------------------------------------------
# The index


def l2_normalize(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as C-contiguous float32 (N, d)."""
    features = torch.as_tensor(features)
    return np.ascontiguousarray(F.normalize(features.float(), dim=-1).numpy(), dtype=np.float32)


def _save_or_warn(save: Callable[[str], None], index_dir: str) -> bool:
    """Run `save(index_dir)`; a full disk or a read-only cache must not throw away a finished embedding pass, so a
    failure is a warning (the index is served from memory and rebuilt on the next start)."""
    try:
        save(index_dir)
        return True
    except (OSError, RuntimeError) as error:  # faiss raises RuntimeError for I/O errors
        logger.warning("Could not save the gallery index to %s (%s: %s): serving it from memory; it will be rebuilt on "
                       "the next start. Point --index (SCE_INDEX) at a writable folder to keep it.",
                       index_dir, type(error).__name__, error)
        return False


class GalleryIndex:
    r"""A gallery of images searchable by cosine similarity of their embeddings.

    Build one with :meth:`GalleryIndex.build` (embeds, or reuses a saved index); then :meth:`query` an image.

    Attributes:
        dataset (`datasets.Dataset`): the gallery with the embeddings column (`embedding_column`) and a faiss
            index named `index_name`.
        embeddings (`np.ndarray` of shape `(num_images, feature_dim)`): float32, L2-normalised.
        index_type (`str`): `"flat"` (exact), `"ivf"` or `"hnsw"`.
        reused (`bool`): the embeddings came from a saved index rather than the model.
        build_seconds (`float`): time spent embedding the gallery (0 when reused).
        index_dir (`str` or None): where the index is saved.

    Example:

    ```python
    >>> index = GalleryIndex.build(model, processor, dataset, image_column="image", index_dir="outputs/index")
    >>> index.query(Image.open("shoe.png"), k=5)
    [SearchHit(index=42, score=0.93, label='Sneaker'), ...]
    ```
    """

    def __init__(
        self,
        dataset,
        embeddings: np.ndarray,
        *,
        model: torch.nn.Module | None,
        processor: Any | None,
        image_column: str,
        label_column: str | None = None,
        index_type: str = "flat",
        nprobe: int = 16,
        ef_search: int = 128,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        faiss_index_file: str | None = None,
        model_fp: str | None = None,
        dataset_fp: str | None = None,
    ):
        """Index precomputed `embeddings` (float32 `(len(dataset), feature_dim)`, L2-normalised) of `dataset`.

        :meth:`build` is the usual way in; this builds the faiss index (or loads `faiss_index_file`) without
        saving anything. `model` and `processor` embed queries (:meth:`query`); without them only
        :meth:`search` by embedding works.
        """
        faiss = _import_faiss()
        from datasets import List, Value

        if embeddings.ndim != 2 or embeddings.shape[0] != len(dataset):
            raise ValueError(
                f"`embeddings` must have shape ({len(dataset)}, feature_dim), one row per gallery image, got "
                f"{tuple(embeddings.shape)}."
            )
        if index_type not in INDEX_TYPES:
            raise ValueError(f"Unknown index type {index_type!r}; choose one of {INDEX_TYPES}.")
        self.model = model
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.index_type = index_type
        self.max_image_pixels = max_image_pixels
        self.model_fp = model_fp
        self.dataset_fp = dataset_fp
        self.reused = False
        self.build_seconds = 0.0
        self.index_dir: str | None = None
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.images = dataset.select_columns([image_column])
        self.embedding_column = "embeddings" if "embeddings" not in dataset.column_names else "sce_embeddings"
        self.index_name = self.embedding_column
        num_images, dim = self.embeddings.shape
        self._labels, self._label_names = self._read_labels(dataset, label_column)

        import pyarrow as pa

        column = pa.FixedSizeListArray.from_arrays(pa.array(self.embeddings.reshape(-1)), dim)
        self.dataset = dataset.add_column(
            self.embedding_column,
            column,
            new_fingerprint=hashlib.blake2b(f"{dataset._fingerprint}:{model_fp}".encode(), digest_size=8).hexdigest(),
            feature=List(Value("float32"), length=dim),
        )
        if faiss_index_file is not None:
            self.dataset.load_faiss_index(self.index_name, faiss_index_file)
        else:
            factory = faiss_factory_string(index_type, num_images)
            self.dataset.add_faiss_index(
                column=self.embedding_column,
                index_name=self.index_name,
                string_factory=factory,
                metric_type=faiss.METRIC_INNER_PRODUCT,
                train_size=num_images if index_type == "ivf" else None,
                batch_size=4096,
            )
        _set_search_parameters(self.faiss_index, index_type, nprobe, ef_search)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        processor: Any,
        dataset,
        *,
        image_column: str = "image",
        label_column: str | None = None,
        index_type: str = "flat",
        index_dir: str | None = None,
        split: str | None = None,
        max_images: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        progress: bool = True,
        nprobe: int = 16,
        ef_search: int = 128,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        save: bool = True,
    ) -> "GalleryIndex":
        """Embed `dataset` with `model` and `processor`, or load the index saved in `index_dir` when it was built
        by the same model on the same gallery.

        Args:
            model: an encoder whose output has `pooler_output` `(batch_size, feature_dim)` (an `SCEModel`).
            processor: its image processor (PIL image → `pixel_values` `(1, C, H, W)`).
            dataset (`datasets.Dataset`): the gallery (already cut to `max_images`).
            image_column / label_column: its columns (`label_column` None: no labels in the captions).
            index_type: `"flat"` (exact), `"ivf"` or `"hnsw"` (approximate).
            index_dir: the folder of the saved index (default: :func:`default_index_dir`).
            split, max_images: how the gallery was chosen; part of its fingerprint.
            batch_size, num_workers: of the embedding pass.
            nprobe (IVF), ef_search (HNSW): search-time accuracy settings of the approximate indexes.
            save: write the index to `index_dir`.

        Raises:
            ValueError: a missing column (listing the dataset's columns) or an unknown index type.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"Unknown index type {index_type!r}; choose one of {INDEX_TYPES}.")
        for column in (image_column, label_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(f"The gallery has no column {column!r}; its columns are {dataset.column_names}.")
        model_fp = model_fingerprint(model, processor)
        dataset_fp = dataset_fingerprint(dataset, split=split, max_images=max_images, image_column=image_column)
        index_dir = index_dir or default_index_dir(model_fp, dataset_fp)
        common = dict(
            model=model, processor=processor, image_column=image_column, label_column=label_column,
            index_type=index_type, nprobe=nprobe, ef_search=ef_search, max_image_pixels=max_image_pixels,
            model_fp=model_fp, dataset_fp=dataset_fp,
        )

        embeddings, reason = _load_saved_embeddings(index_dir, model_fp, dataset_fp, len(dataset))
        if embeddings is not None:
            faiss_file = os.path.join(index_dir, f"faiss-{index_type}.index")
            has_faiss = os.path.isfile(faiss_file)
            logger.info(
                "Reusing the gallery embeddings in %s (same model and gallery)%s", index_dir,
                "" if has_faiss else f"; building its {index_type} index",
            )
            try:
                index = cls(dataset, embeddings, faiss_index_file=faiss_file if has_faiss else None, **common)
                if index.faiss_index.ntotal != len(dataset) or index.faiss_index.d != embeddings.shape[1]:
                    raise RuntimeError(f"it holds {index.faiss_index.ntotal} vectors of {index.faiss_index.d} dimensions")
            except RuntimeError as error:  # a damaged faiss file: rebuild the index from the saved embeddings
                logger.warning("Could not use %s (%s); rebuilding the %s index.", faiss_file, error, index_type)
                index, has_faiss = cls(dataset, embeddings, **common), False
            index.reused = True
            index.index_dir = index_dir
            if save and not has_faiss:
                _save_or_warn(index._save_faiss, index_dir)
            return index

        logger.info("Embedding %d gallery images (%s)", len(dataset), reason)
        start = time.perf_counter()
        embeddings = embed_dataset(model, processor, dataset, image_column, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress)
        build_seconds = time.perf_counter() - start
        logger.info("Embedded %d images in %.1f s (%.0f images/s)", len(dataset), build_seconds,
                    len(dataset) / max(build_seconds, 1e-9))
        index = cls(dataset, embeddings, **common)
        index.build_seconds = build_seconds
        index.index_dir = index_dir
        if save and not _save_or_warn(index.save, index_dir):
            index.index_dir = None
        return index

    def save(self, index_dir: str) -> None:
        """Write the embeddings, the faiss index and the fingerprints to `index_dir` (see the module docstring).

        The metadata file goes first out and last in, so an interrupted save leaves an index that is rebuilt.
        """
        os.makedirs(index_dir, exist_ok=True)
        meta_path = os.path.join(index_dir, META_FILE)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for name in os.listdir(index_dir):
            if name.startswith("faiss-") and name.endswith(".index"):
                os.remove(os.path.join(index_dir, name))
        tmp = os.path.join(index_dir, f".{EMBEDDINGS_FILE}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, self.embeddings)
        os.replace(tmp, os.path.join(index_dir, EMBEDDINGS_FILE))
        self._save_faiss(index_dir)
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "model_fingerprint": self.model_fp,
            "dataset_fingerprint": self.dataset_fp,
            "num_images": int(self.embeddings.shape[0]),
            "feature_dim": int(self.embeddings.shape[1]),
            "image_column": self.image_column,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = f"{meta_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            json.dump(meta, handle, indent=2)
        os.replace(tmp, meta_path)
        self.index_dir = index_dir
        logger.info("Saved the gallery index to %s", index_dir)

    def _save_faiss(self, index_dir: str) -> None:
        path = os.path.join(index_dir, f"faiss-{self.index_type}.index")
        tmp = f"{path}.{os.getpid()}.tmp"
        self.dataset.save_faiss_index(self.index_name, tmp)
        os.replace(tmp, path)

    @staticmethod
    def _read_labels(dataset, label_column: str | None) -> tuple[np.ndarray | None, list[str] | None]:
        if label_column is None:
            return None, None
        from datasets import ClassLabel

        feature = dataset.features.get(label_column)
        values = dataset.select_columns([label_column]).with_format("numpy")[label_column]
        names = feature.names if isinstance(feature, ClassLabel) else None
        return np.asarray(values), names

    # -- search ------------------------------------------------------------------------------------------------

    @property
    def faiss_index(self):
        """The underlying `faiss.Index`."""
        return self.dataset.get_index(self.index_name).faiss_index

    @property
    def feature_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def label(self, row: int) -> str | None:
        """The label of gallery row `row` as text (a class name when the column is a `ClassLabel`)."""
        if self._labels is None:
            return None
        value = self._labels[row]
        if self._label_names is not None and 0 <= int(value) < len(self._label_names):
            return self._label_names[int(value)]
        return str(value)

    def image(self, row: int) -> Image.Image:
        """Gallery image `row`, decoded (its own mode and size)."""
        value = self.images[int(row)][self.image_column]
        return value if isinstance(value, Image.Image) else decode_image(value, max_pixels=None)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised embeddings of PIL images, float32 `(len(images), feature_dim)`."""
        device = next(self.model.parameters()).device
        pixel_values = self.processor(list(images), return_tensors="pt")["pixel_values"].to(device)
        return l2_normalize(pooled_features(self.model(pixel_values=pixel_values), self.model).cpu())

    def search(self, embedding: np.ndarray, k: int = 10) -> list[SearchHit]:
        """The `k` gallery rows most similar to one L2-normalised embedding `(feature_dim,)`, best first."""
        if k < 1:
            raise ValueError(f"`k` must be at least 1, got {k}.")
        k = min(int(k), len(self))
        query = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32).reshape(1, -1))
        result = self.dataset.search(self.index_name, query, k)
        return [
            SearchHit(int(i), float(s), self.label(int(i)))
            for s, i in zip(result.scores, result.indices)
            if i >= 0  # faiss pads with -1 when an approximate index finds fewer than k
        ]

    def query(self, image: Image.Image | str | os.PathLike | bytes | dict, k: int = 10) -> list[SearchHit]:
        """The `k` gallery images most similar to `image`, best first, as (row index, cosine similarity, label).

        `image` is a PIL image, a path, encoded bytes or a `{"bytes", "path"}` dict.

        Raises:
            sce_hf.data.BadImageError: the image cannot be decoded, is truncated, or has more than
                `max_image_pixels` pixels (a decompression bomb).
        """
        decoded = decode_image(image, max_pixels=self.max_image_pixels)
        return self.search(self.embed_images([decoded])[0], k)

    def recall_at_k(self, k: int = 10, num_queries: int = 1000, seed: int = 0) -> float:
        """Recall@k of this index against exact search: the mean fraction of each query's true k nearest
        neighbours (exact inner product) that this index returns in its k. Queries are `num_queries` gallery
        embeddings drawn at random; each query's own row is left out of both lists. 1.0 for a `flat` index.
        """
        faiss = _import_faiss()
        num_images = len(self)
        if num_images < 2:
            return 1.0
        k = min(k, num_images - 1)
        rng = np.random.default_rng(seed)
        rows = rng.choice(num_images, size=min(num_queries, num_images), replace=False)
        queries = self.embeddings[rows]
        exact = faiss.IndexFlatIP(self.feature_dim)
        exact.add(self.embeddings)
        _, true_ids = exact.search(queries, k + 1)
        _, found_ids = self.faiss_index.search(queries, k + 1)
        hits = 0
        for row, truth, found in zip(rows, true_ids, found_ids):
            truth = [i for i in truth if i != row][:k]
            found = [i for i in found if i != row and i >= 0][:k]
            hits += len(set(truth) & set(found))
        return hits / (len(rows) * k)


def embed_dataset(
    model: torch.nn.Module,
    processor: Any,
    dataset,
    image_column: str = "image",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings of every image of `dataset`, in order: float32 `(len(dataset), feature_dim)`.

    Raises:
        ValueError: a gallery image cannot be decoded (`BadImageError`), or the processor's output does not fit
            the model; the message says which.
    """
    try:
        features = extract_features(
            model, dataset, processor_transform(processor), image_column, batch_size=batch_size,
            num_workers=num_workers, progress=progress, description="embedding gallery",
        )
    except ValueError as error:
        raise ValueError(f"Cannot embed the gallery: {error}") from error
    return l2_normalize(features)


def _load_saved_embeddings(index_dir: str, model_fp: str, dataset_fp: str, num_images: int) -> tuple[np.ndarray | None, str]:
    """The embeddings saved in `index_dir` if they match the fingerprints, else (None, why they cannot be used)."""
    meta_path = os.path.join(index_dir, META_FILE)
    if not os.path.isfile(meta_path):
        return None, f"no saved index in {index_dir}"
    try:
        with open(meta_path) as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return None, f"unreadable {meta_path}: {error}"
    if meta.get("format_version") != INDEX_FORMAT_VERSION:
        return None, "the saved index has another format version"
    if meta.get("model_fingerprint") != model_fp:
        return None, f"the saved index in {index_dir} was built with another model; rebuilding"
    if meta.get("dataset_fingerprint") != dataset_fp:
        return None, f"the saved index in {index_dir} was built on another gallery; rebuilding"
    try:
        embeddings = np.load(os.path.join(index_dir, EMBEDDINGS_FILE))
    except (OSError, ValueError) as error:
        return None, f"unreadable embeddings in {index_dir}: {error}"
    if embeddings.ndim != 2 or embeddings.shape[0] != num_images or embeddings.dtype != np.float32:
        return None, f"the saved embeddings in {index_dir} have shape {embeddings.shape}, not ({num_images}, d)"
    return embeddings, "reused"


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "GalleryIndex",
    "INDEX_TYPES",
    "LABEL_COLUMN_FALLBACKS",
    "SearchHit",
    "dataset_fingerprint",
    "default_index_dir",
    "embed_dataset",
    "faiss_factory_string",
    "l2_normalize",
    "model_fingerprint",
]
