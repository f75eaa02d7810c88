"""Dataset sources for SCE, and the CPU side of the input pipeline.

Sources: a Hub dataset id, a folder written by `Dataset.save_to_disk`, an image folder, a stream, and Fashion-MNIST
from the Debian package's files when the Hub cannot be reached. CPU workers decode images (skipping and counting
the unreadable ones), convert them to RGB and either hand over one uint8 batch (all images of one size: the
device crops) or crop every view to its size (variable sizes), as the authors do. Everything else runs batched
on the training device (`sce_hf.augmentations`).

Sampling is deterministic and resumable: a seeded permutation per epoch, cut into global batches, each process
taking its slice; every sample's augmentation seed comes from (run seed, epoch, dataset index).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .augmentations import ViewRecipe, make_sample_seeds, sample_crop_box, view_generator


logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "zalando-datasets/fashion_mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_COLUMN_FALLBACKS = ("image", "img", "images", "pixel_values")
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a photo was held
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


# ---------------------------------------------------------------------------------------------------------------
# Sources


def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): uint8 images (N, H, W) or labels (N,)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", directory: str = FASHION_MNIST_DIR):
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` as a `datasets.Dataset` (image, label)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has the splits 'train' and 'test', got {split!r}.")
    images_path = os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images_path):
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {directory}: install them with `apt-get install dataset-fashion-mnist` "
            "(`make setup` does it) or pass a Hub id the machine can reach."
        )
    images = read_idx(images_path)
    labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(FASHION_MNIST_LABELS))})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """Load one split of an image dataset.

    Args:
        dataset_name: a Hub id, a folder written by `save_to_disk`, a local folder laid out as a Hub dataset
            (e.g. parquet files), one data file (`.parquet`, `.arrow`, `.csv`, `.json`, `.jsonl`: its rows are the
            split "train"), or `fashion_mnist` (the Debian package's files when the Hub is unreachable or offline
            mode is set).
        dataset_config_name: the Hub dataset's configuration.
        train_dir: an image folder (`load_dataset("imagefolder")`; sub-folders become labels).
        split: the split to read.
        streaming: return a `datasets.IterableDataset`.

    Raises:
        ValueError: for no source or two sources, an unknown split (listing the known ones) or an empty split.
    """
    import datasets

    if (dataset_name is None) == (train_dir is None):
        raise ValueError("Give exactly one data source: `--dataset_name NAME_OR_PATH` or `--train_dir FOLDER`.")
    if train_dir is not None:
        if not os.path.isdir(train_dir):
            raise ValueError(f"`--train_dir` {train_dir!r} is not a folder.")
        dataset = datasets.load_dataset("imagefolder", data_dir=train_dir, split="train", streaming=streaming, cache_dir=cache_dir)
    elif os.path.isdir(dataset_name) and _is_saved_dataset(dataset_name):
        dataset = _load_saved_split(dataset_name, split)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif os.path.isfile(dataset_name):
        extension = os.path.splitext(dataset_name)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"`--dataset_name` {dataset_name!r} is a file `datasets` cannot read: give a data file "
                f"({', '.join(DATA_FILE_BUILDERS)}), a folder of them, a `save_to_disk` folder or a Hub id."
            )
        try:
            dataset = datasets.load_dataset(
                DATA_FILE_BUILDERS[extension], data_files=dataset_name, split=split, streaming=streaming, cache_dir=cache_dir
            )
        except ValueError as error:
            if "split" in str(error).lower():
                raise ValueError(f"Split {split!r} not found in {dataset_name}: a single data file holds the split 'train'.") from error
            raise
    elif dataset_name in FASHION_MNIST_NAMES and (_hub_offline() or not _hub_reachable()):
        logger.info("Reading Fashion-MNIST (%s) from the Debian package's files in %s", split, FASHION_MNIST_DIR)
        dataset = load_fashion_mnist(split)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        if dataset_name in FASHION_MNIST_NAMES:
            dataset_name = "zalando-datasets/fashion_mnist"
        try:
            dataset = datasets.load_dataset(
                dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
            )
        except ValueError as error:
            if "split" in str(error).lower() or "Unknown split" in str(error):
                raise ValueError(f"Split {split!r} not found in {dataset_name}: {error}") from error
            raise
    if not streaming and len(dataset) == 0:
        raise ValueError(f"The {split!r} split of {dataset_name or train_dir} is empty: there is nothing to train on.")
    return dataset


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load_saved_split(path: str, split: str):
    """`split` of a `save_to_disk` folder (a `DatasetDict`'s split; a `Dataset` whatever `split`), reading only it.

    `datasets.load_from_disk` fails with an IndexError on a saved dataset of 0 rows (it has no data file), and on
    a `DatasetDict` holding one: check the split's `state.json` first and say what is wrong.

    Raises:
        ValueError: an unknown split (listing the known ones) or an empty one.
    """
    import datasets

    name = path
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dict_file):
        with open(dict_file) as handle:
            splits = json.load(handle).get("splits", [])
        if split not in splits:
            raise ValueError(f"Split {split!r} not in {path}; its splits are {sorted(splits)}.")
        path = os.path.join(path, split)
    state_file = os.path.join(path, "state.json")
    if os.path.isfile(state_file):
        with open(state_file) as handle:
            if not json.load(handle).get("_data_files"):
                raise ValueError(f"The {split!r} split of {name} is empty: there is nothing to train on.")
    return datasets.load_from_disk(path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_column(dataset, name: str | None, fallbacks: Sequence[str], what: str) -> str:
    """The column to read: `name` if given (it must exist), else the first of `fallbacks` present.

    Raises:
        ValueError: listing the dataset's columns when the column is missing.
    """
    columns = list(dataset.column_names or dataset.features or [])
    if name is not None:
        if name not in columns:
            raise ValueError(f"The dataset has no {what} column {name!r}; its columns are {columns}.")
        return name
    for candidate in fallbacks:
        if candidate in columns:
            return candidate
    raise ValueError(f"Found no {what} column among {columns}: name it with `--{what}_column_name`.")


def without_image_decoding(dataset, image_column: str):
    """The dataset with its image column left as bytes/paths, so workers decode and can skip bad files."""
    from datasets import Image as ImageFeature

    features = dataset.features
    if features is not None and isinstance(features.get(image_column), ImageFeature):
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Decoding and cropping (CPU workers)


class BadImageError(ValueError):
    """An image that cannot be decoded or has no usable pixels."""


def decode_image(value, max_pixels: int | None = 178_956_970) -> Image.Image:
    """Any image value of a dataset row (PIL image, `{"bytes", "path"}`, a path, an array) as an RGB PIL image,
    turned upright when its EXIF orientation says so (as a browser shows a phone photo).

    Raises:
        BadImageError: unreadable, truncated, empty or larger than `max_pixels` (a decompression bomb).
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.fromarray(np.asarray(value))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise BadImageError(f"image of {image.width}x{image.height} pixels is over the limit of {max_pixels}")
        image.load()
        if image.width < 1 or image.height < 1:
            raise BadImageError("empty image")
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except BadImageError:
        raise
    except Exception as error:  # PIL raises many types for broken files
        raise BadImageError(f"{type(error).__name__}: {error}") from error


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def crop_views(image: Image.Image, sample_seed: int, views: Sequence[ViewRecipe]) -> list[torch.Tensor]:
    """Random-resized-crop one image for every view on the CPU (bilinear, antialiased), uint8 (3, s_v, s_v) each.

    The box of view v comes from `view_generator(sample_seed, v)`, the stream the device would use.
    """
    crops = []
    for v, recipe in enumerate(views):
        top, left, h, w = sample_crop_box(image.height, image.width, recipe.crop_scale, recipe.crop_ratio, view_generator(sample_seed, v))
        crop = image.resize((recipe.crop_size, recipe.crop_size), Image.BILINEAR, box=(left, top, left + w, top + h))
        crops.append(pil_to_uint8(crop))
    return crops


@dataclass
class SampleRef:
    """What a sampler hands to a dataset: the epoch and the dataset index (together they seed the sample)."""

    epoch: int
    index: int


class ViewsDataset(torch.utils.data.Dataset):
    """Map-style wrapper: `SampleRef` → decoded views of one row, or a marker for a bad image."""

    def __init__(self, dataset, image_column: str, views: Sequence[ViewRecipe], seed: int, crop_on_device: bool):
        self.dataset = without_image_decoding(dataset, image_column)
        self.image_column = image_column
        self.views = list(views)
        self.seed = seed
        self.crop_on_device = crop_on_device

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, ref: SampleRef) -> dict:
        return load_sample(self.dataset[ref.index][self.image_column], ref, self.seed, self.views, self.crop_on_device)


def load_sample(value, ref: SampleRef, seed: int, views: Sequence[ViewRecipe], crop_on_device: bool) -> dict:
    """Decode one image and crop it on the CPU unless the device crops. Bad images give `{"bad": reason}`."""
    sample_seed = int(make_sample_seeds(seed, ref.epoch, [ref.index])[0])
    try:
        image = decode_image(value)
    except BadImageError as error:
        return {"bad": str(error), "index": ref.index}
    sample = {"seed": sample_seed, "index": ref.index}
    if crop_on_device:
        sample["image"] = pil_to_uint8(image)
    else:
        sample["views"] = crop_views(image, sample_seed, views)
    return sample


def collate_views(samples: list[dict]) -> dict:
    """Stack a batch: `images` uint8 (B, 3, H, W) when all share one size (the device crops), else `views`, a
    list of V uint8 (B, 3, s_v, s_v); plus `sample_seeds` (B,), `indices` (B,) and `num_bad` (skipped images).

    Unreadable images are logged, counted in `num_bad` and their slots refilled with repeats of the batch's readable
    ones, so a batch keeps its size: split batch norm needs a batch divisible by its groups, and processes gather
    keys of equal batch sizes. A batch with no readable image has `views` None.
    """
    good = [s for s in samples if "bad" not in s]
    num_bad = len(samples) - len(good)
    for sample in samples:
        if "bad" in sample:
            logger.warning("Skipping unreadable image at index %d: %s", sample["index"], sample["bad"])
    if good and num_bad:
        good += [good[i % len(good)] for i in range(num_bad)]
    batch = {
        "sample_seeds": torch.tensor([s["seed"] for s in good], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "num_bad": num_bad,
        "num_seen": len(samples),
    }
    if not good:
        batch["views"] = None
    elif "image" in good[0] and len({tuple(s["image"].shape) for s in good}) == 1:
        batch["images"] = torch.stack([s["image"] for s in good])
    elif "image" in good[0]:
        raise ValueError("Images of different sizes cannot be cropped on the device: crop on the CPU workers instead.")
    else:
        batch["views"] = [torch.stack([s["views"][v] for s in good]) for v in range(len(good[0]["views"]))]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of one epoch: a seeded permutation cut into global batches (drop last), each
    process taking a contiguous slice of every global batch, from batch `start_batch` on (for exact resume), at most
    `max_batches` per epoch.

    Yields lists of `SampleRef` of length `batch_size`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        max_batches: int | None = None,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.max_batches = max_batches
        if self.num_batches < 1:
            raise ValueError(
                f"{num_samples} samples make no global batch of {batch_size} x {num_processes} processes: lower "
                "`--per_device_train_batch_size` or use more data."
            )

    @property
    def num_batches(self) -> int:
        full = self.num_samples // (self.batch_size * self.num_processes)
        return full if self.max_batches is None else min(full, self.max_batches)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[list[SampleRef]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        global_batch = self.batch_size * self.num_processes
        for b in range(self.start_batch, self.num_batches):
            start = b * global_batch + self.process_index * self.batch_size
            yield [SampleRef(self.epoch, i) for i in order[start : start + self.batch_size]]


def content_index(value) -> int:
    """A stable 63-bit id of an image value (its bytes, path or pixels), used to seed stream samples."""
    import hashlib

    if isinstance(value, dict):
        payload = value.get("bytes") or str(value.get("path")).encode()
    elif isinstance(value, (bytes, bytearray)):
        payload = bytes(value)
    elif isinstance(value, Image.Image):
        payload = value.tobytes()
    elif isinstance(value, (str, os.PathLike)):
        payload = str(value).encode()
    else:
        payload = np.ascontiguousarray(value).tobytes()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


class StreamViews(torch.utils.data.IterableDataset):
    """A stream (already split across processes) as samples; `skip` rows already consumed this epoch are skipped.

    A stream sample is seeded by its content (not its position, which depends on how the stream is sharded across
    processes), so its augmentations are the same on any number of processes, and a resume that skips the rows
    already consumed continues exactly, as long as the stream yields the same rows in the same order for an epoch.
    """

    def __init__(self, stream, image_column: str, views: Sequence[ViewRecipe], seed: int, epoch: int, skip: int, crop_on_device: bool):
        self.stream = without_image_decoding(stream, image_column)
        self.image_column = image_column
        self.views = list(views)
        self.seed = seed
        self.epoch = epoch
        self.skip = skip
        self.crop_on_device = crop_on_device

    def __iter__(self):
        stream = self.stream
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(self.epoch)
        if self.skip:
            stream = stream.skip(self.skip)
        for row in stream:
            value = row[self.image_column]
            yield load_sample(value, SampleRef(self.epoch, content_index(value)), self.seed, self.views, self.crop_on_device)


__all__ = [
    "BadImageError",
    "EpochBatchSampler",
    "FASHION_MNIST_LABELS",
    "SampleRef",
    "StreamViews",
    "ViewsDataset",
    "collate_views",
    "content_index",
    "crop_views",
    "decode_image",
    "load_fashion_mnist",
    "load_image_dataset",
    "read_idx",
    "resolve_column",
]
