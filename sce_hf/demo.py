"""Gradio image-similarity search: drop in an image, see the most similar images of a gallery.

    python demo/app.py --model_name_or_path outputs/fashion-mnist-cpu                # Fashion-MNIST test split
    python demo/app.py --model_name_or_path ORG/NAME --dataset_name ORG/GALLERY --split train --max_images 20000
    sce-demo --model_name_or_path DIR --train_dir my_photos/ --index outputs/my-photos-index --index_type hnsw

The gallery is embedded once and its index saved (`sce_hf.search.GalleryIndex`); a later start with the same
model and gallery reuses it. The search is the named endpoint `/search` (image, k) → gallery, so it can be
called from Python:

    from gradio_client import Client, handle_file
    results = Client("http://127.0.0.1:7860/").predict(handle_file("shoe.png"), 8, api_name="/search")

Deployed as a Hugging Face Space (`demo/` holds its app file, README and requirements), the defaults come from
the Space's variables: `SCE_MODEL_ID`, `SCE_DATASET`, `SCE_DATASET_CONFIG`, `SCE_SPLIT`, `SCE_MAX_IMAGES`,
`SCE_IMAGE_COLUMN`, `SCE_LABEL_COLUMN`, `SCE_INDEX`, `SCE_INDEX_TYPE` (flags override them).

gradio and faiss are the `demo` extra: this module imports them when a demo is built, so `--help` is fast and
`import sce_hf` never needs them.
"""

from __future__ import annotations

import argparse
import base64
import logging
import math
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cli import add_data_args
from .data import IMAGE_COLUMN_FALLBACKS, BadImageError, decode_image, load_image_dataset, resolve_column
from .search import DEFAULT_MAX_IMAGE_PIXELS, INDEX_TYPES, LABEL_COLUMN_FALLBACKS, GalleryIndex, SearchHit


if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "outputs/fashion-mnist-cpu"
DEFAULT_DATASET = "fashion_mnist"
PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")  # the image modes PIL writes as PNG
# flag -> the environment variable that sets its default (a Space's variables)
ENV_DEFAULTS = {
    "model_name_or_path": "SCE_MODEL_ID",
    "model_revision": "SCE_MODEL_REVISION",
    "dataset_name": "SCE_DATASET",
    "dataset_config_name": "SCE_DATASET_CONFIG",
    "split": "SCE_SPLIT",
    "max_images": "SCE_MAX_IMAGES",
    "image_column_name": "SCE_IMAGE_COLUMN",
    "label_column_name": "SCE_LABEL_COLUMN",
    "index": "SCE_INDEX",
    "index_type": "SCE_INDEX_TYPE",
    "host": "GRADIO_SERVER_NAME",
    "port": "GRADIO_SERVER_PORT",
}


@dataclass
class Gallery:
    """What a demo searches: the index and the names the info panel shows."""

    index: GalleryIndex
    model_name: str
    dataset_name: str
    split: str | None


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_gallery_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "test",
    cache_dir: str | None = None,
):
    """One split of the gallery (`sce_hf.data.load_image_dataset`; Fashion-MNIST when no source is named).

    Offline (`HF_HUB_OFFLINE=1`), `datasets` cannot open a Hub dataset from the Hugging Face cache alone; a
    snapshot of the dataset repository in the cache (`$HF_HOME/hub/datasets--ORG--NAME`) is then read as a
    local folder.
    """
    if dataset_name is None and train_dir is None:
        dataset_name = DEFAULT_DATASET
    try:
        return load_image_dataset(dataset_name, dataset_config_name, train_dir, split, False, cache_dir)
    except ConnectionError as error:  # datasets' offline / unreachable Hub error
        snapshot = _cached_dataset_snapshot(dataset_name, cache_dir) if dataset_name else None
        if snapshot is None:
            raise
        logger.info("The Hub is unreachable (%s); reading %s from the cached snapshot %s", error, dataset_name, snapshot)
        return load_image_dataset(snapshot, dataset_config_name, None, split, False, cache_dir)


def _cached_dataset_snapshot(repo_id: str, cache_dir: str | None) -> str | None:
    if os.path.exists(repo_id) or repo_id.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def resolve_gallery_columns(dataset, image_column_name: str | None, label_column_name: str | None) -> tuple[str, str | None]:
    """The image column and the label column (None when the gallery has none and none was named).

    Raises:
        ValueError: a named column is missing, or no image column is found; the message lists the columns.
    """
    image_column = resolve_column(dataset, image_column_name, IMAGE_COLUMN_FALLBACKS, "image")
    if label_column_name is not None:
        return image_column, resolve_column(dataset, label_column_name, (), "label")
    label_column = next((c for c in LABEL_COLUMN_FALLBACKS if c in dataset.column_names), None)
    return image_column, label_column


def load_encoder(model_name_or_path: str, revision: str | None = None):
    """The encoder (`AutoModel`, remote code trusted: SCE checkpoints carry their code) in eval mode and its
    image processor, on the GPU when there is one.

    Raises:
        OSError: the model or its processor cannot be loaded; the message names the folder or Hub id.
    """
    import torch
    from transformers import AutoImageProcessor, AutoModel

    import sce_hf  # noqa: F401  (registers the SCE classes with the Auto classes)

    try:
        model = AutoModel.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=True)
    except (OSError, ValueError) as error:
        hint = (
            " Train it first with `make quickstart`, or pass --model_name_or_path DIR_OR_HUB_ID."
            if model_name_or_path == DEFAULT_MODEL else ""
        )
        raise OSError(f"Cannot load the model {model_name_or_path!r}: {str(error).splitlines()[0]}{hint}") from error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def load_gallery(
    model_name_or_path: str = DEFAULT_MODEL,
    dataset_name: str | None = None,
    *,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "test",
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    max_images: int | None = None,
    cache_dir: str | None = None,
    model_revision: str | None = None,
    index: str | None = None,
    index_type: str = "flat",
    batch_size: int = 256,
    num_workers: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> Gallery:
    """Load the gallery, check its columns, load the model, then build or reuse the index.

    The columns are checked before the model is loaded and anything is embedded, so a wrong column name fails
    in a second.

    Raises:
        ValueError: a missing column (listing the dataset's columns), an empty gallery, an unknown index type.
        OSError: the model cannot be loaded.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index type {index_type!r}; choose one of {INDEX_TYPES}.")
    if max_images is not None and max_images < 1:
        raise ValueError(f"`max_images` must be at least 1, got {max_images}.")
    dataset = load_gallery_dataset(dataset_name, dataset_config_name, train_dir, split, cache_dir)
    image_column, label_column = resolve_gallery_columns(dataset, image_column_name, label_column_name)
    if max_images is not None and max_images < len(dataset):
        dataset = dataset.select(range(max_images))
    model, processor = load_encoder(model_name_or_path, model_revision)
    gallery_index = GalleryIndex.build(
        model, processor, dataset, image_column=image_column, label_column=label_column, index_type=index_type,
        index_dir=index, split=split, max_images=max_images, batch_size=batch_size, num_workers=num_workers,
        progress=progress, max_image_pixels=max_image_pixels,
    )
    name = dataset_name or train_dir or DEFAULT_DATASET
    return Gallery(gallery_index, model_name_or_path, name, None if train_dir else split)


# ---------------------------------------------------------------------------------------------------------------
# The UI


def _payload_image(payload: Any, max_pixels: int | None):
    """Decode the Image component's raw value (a FileData dict: an uploaded file's path, or a data URL).

    Raises:
        BadImageError: not an image, truncated, or over the pixel limit.
    """
    if isinstance(payload, dict):
        if payload.get("path"):
            return decode_image(payload["path"], max_pixels=max_pixels)
        url = payload.get("url") or ""
        if url.startswith("data:"):
            return decode_image(base64.b64decode(url.split(",", 1)[-1]), max_pixels=max_pixels)
    if isinstance(payload, (str, os.PathLike)):
        return decode_image(payload, max_pixels=max_pixels)
    raise BadImageError(f"unexpected image value of type {type(payload).__name__}")


def _bad_image_message(error: BadImageError, max_pixels: int | None) -> str:
    """What the user sees for an unusable upload: the reason in plain words (no server paths) and the fix."""
    text = str(error)
    limit = f" of at most {max_pixels:,} pixels" if max_pixels else ""
    if "over the limit" in text or "DecompressionBomb" in text:
        size = text.split(" pixels")[0].replace("image of ", "") if text.startswith("image of ") else "too many pixels"
        reason = f"the image is too large ({size} pixels)" if size != "too many pixels" else "the image has too many pixels"
    elif "cannot identify image file" in text:
        reason = "the file is not an image (or not a format Pillow reads)"
    elif "truncated" in text.lower() or "broken" in text.lower() or "EOF" in text:
        reason = "the image file is truncated or corrupt"
    else:
        reason = f"it could not be decoded ({text.split(':')[0]})"
    return f"This upload cannot be used as a query: {reason}. Upload a PNG, JPEG or WebP image{limit}."


def _caption(hit: SearchHit) -> str:
    return f"{hit.score:.3f} · {hit.label}" if hit.label is not None else f"{hit.score:.3f}"


def _info_markdown(gallery: Gallery) -> str:
    index = gallery.index
    split = f" (split `{gallery.split}`)" if gallery.split else ""
    kind = {"flat": "exact (Flat, inner product)", "ivf": "approximate (IVF)", "hnsw": "approximate (HNSW)"}[index.index_type]
    origin = (
        f"reused from `{index.index_dir}`" if index.reused
        else f"built in {index.build_seconds:.1f} s" + (f", saved to `{index.index_dir}`" if index.index_dir else "")
    )
    return (
        f"**Model** `{gallery.model_name}` · {index.feature_dim}-d embeddings  \n"
        f"**Gallery** `{gallery.dataset_name}`{split} · **{len(index):,} images**  \n"
        f"**Index** {kind} over cosine similarity; {origin}"
    )


# Small images (Fashion-MNIST's 28 px) fill the query box and the thumbnails, with crisp pixels.
_CSS = (
    "#query img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; } "
    "#results img { image-rendering: pixelated; }"
)


class GalleryFiles:
    """Gallery images as PNG files that the app hands to gradio, each written once, atomically.

    gradio saves a returned PIL image to its cache in place (truncate, then write), so two concurrent requests
    returning the same image race and one client can download a half-written file; a file path is copied into
    the cache under a temporary name and renamed. Results are shown downscaled to at most `max_side` pixels;
    a result used as the query is the full image.
    """

    def __init__(self, index: GalleryIndex, folder: str | None = None, max_side: int = 512):
        import gradio.utils

        if folder is None:
            upload_root = gradio.utils.get_upload_folder()  # gradio serves files from here
            os.makedirs(upload_root, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="sce-demo-gallery-", dir=upload_root)
        os.makedirs(folder, exist_ok=True)
        self.index = index
        self.folder = folder
        self.max_side = max_side

    def path(self, row: int, full: bool = False) -> str:
        """The PNG of gallery row `row` (downscaled unless `full`), written on first use."""
        path = os.path.join(self.folder, f"{'full' if full else 'thumb'}-{int(row)}.png")
        if not os.path.exists(path):
            image = self.index.image(row)
            if image.mode not in PNG_MODES:  # e.g. CMYK JPEGs (ImageNet has some): PNG cannot store them
                image = image.convert("RGB")
            if not full and max(image.size) > self.max_side:
                image = image.copy()
                image.thumbnail((self.max_side, self.max_side))
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        return path


def _example_rows(gallery_index: GalleryIndex, num_examples: int) -> list[int]:
    """Up to `num_examples` gallery rows, one per label where there are labels."""
    rows, seen = [], set()
    for row in range(min(len(gallery_index), 50 * num_examples)):
        if len(rows) >= num_examples:
            break
        label = gallery_index.label(row)
        if label is None or label not in seen:
            seen.add(label)
            rows.append(row)
    return rows


def build_blocks(
    gallery: Gallery,
    *,
    default_k: int = 8,
    max_k: int = 48,
    num_examples: int = 6,
    concurrency_limit: int = 2,
    max_queue_size: int | None = 128,
) -> "gr.Blocks":
    """The Gradio app over a loaded gallery: query image, examples, k slider, results gallery, info panel.

    Endpoints: `/search` (image, k) → gallery of (image, "similarity · label") pairs, best first. Selecting a
    result makes it the query and searches again. Requests wait in a queue that runs `concurrency_limit` searches
    at a time and holds at most `max_queue_size` (None: unbounded).
    """
    import gradio as gr

    index = gallery.index
    files = GalleryFiles(index)
    max_k = max(1, min(max_k, len(index)))
    default_k = max(1, min(default_k, max_k))

    def search(image: dict | None, k: float) -> tuple[list[tuple[Any, str]], list[int]]:
        if image is None:
            raise gr.Error("Upload, paste or capture an image first.", title="No query image")
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise gr.Error(f"k must be a whole number, got {k!r}.", title="Bad k") from None
        if not 1 <= k <= max_k:
            raise gr.Error(f"k must be between 1 and {max_k}, got {k}.", title="Bad k")
        try:
            query = _payload_image(image, index.max_image_pixels)
        except BadImageError as error:
            logger.warning("Rejected a query image: %s", error)
            raise gr.Error(_bad_image_message(error, index.max_image_pixels), title="Unreadable image") from None
        hits = index.search(index.embed_images([query])[0], k)
        return [(files.path(h.index), _caption(h)) for h in hits], [h.index for h in hits]

    def use_as_query(rows: list[int], event: gr.SelectData):
        if not rows or not isinstance(event.index, int) or not 0 <= event.index < len(rows):
            raise gr.Error("Select one of the results to use it as the query.")
        return files.path(rows[event.index], full=True)

    use_as_query.__annotations__["event"] = gr.SelectData  # gradio finds event data by the (evaluated) type hint

    with gr.Blocks(title="SCE image similarity search") as demo:
        gr.Markdown(
            "# SCE image similarity search\n"
            "Drop in an image (upload, paste or webcam) and find the most similar gallery images by the cosine "
            "similarity of their [SCE](https://arxiv.org/abs/2111.14585) embeddings. Click a result to search "
            "with it."
        )
        gr.Markdown(_info_markdown(gallery), elem_id="info")
        rows = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(
                    label="Query image", sources=["upload", "clipboard", "webcam"], type="filepath", format="png",
                    elem_id="query", height=280,
                )
                k = gr.Slider(1, max_k, value=default_k, step=1, label="Number of results (k)", elem_id="k")
                button = gr.Button("Search", variant="primary", elem_id="search")
                examples = [files.path(row, full=True) for row in _example_rows(index, num_examples)]
                if examples:
                    gr.Examples(examples=examples, inputs=[query], label="Example queries (gallery images)")
            with gr.Column(scale=2):
                results = gr.Gallery(
                    label="Most similar (cosine similarity · label)", columns=4, object_fit="contain",
                    format="png", elem_id="results", height="auto", interactive=False, allow_preview=False,
                )
        gr.HTML(f"<style>{_CSS}</style>", container=False, padding=False)
        button.click(search, [query, k], [results, rows], api_name="search", preprocess=False)
        results.select(use_as_query, [rows], [query], api_visibility="private").success(
            search, [query, k], [results, rows], preprocess=False, api_visibility="private"
        )
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue_size)
    return demo


def build_demo(
    model_name_or_path: str = DEFAULT_MODEL,
    dataset_name: str | None = None,
    *,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "test",
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    max_images: int | None = None,
    cache_dir: str | None = None,
    model_revision: str | None = None,
    index: str | None = None,
    index_type: str = "flat",
    batch_size: int = 256,
    num_workers: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    default_k: int = 8,
    max_k: int = 48,
    num_examples: int = 6,
    concurrency_limit: int = 2,
    max_queue_size: int | None = 128,
    progress: bool = True,
) -> "gr.Blocks":
    """Load a model and a gallery (:func:`load_gallery`) and return the search app, not started.

    Start it with `demo.launch(server_name="127.0.0.1", server_port=7860)`; `demo.gallery` is the loaded
    :class:`Gallery`.

    Raises:
        ValueError: a missing column (listing the dataset's columns), an empty gallery, a bad setting.
        OSError: the model cannot be loaded.
    """
    gallery = load_gallery(
        model_name_or_path, dataset_name, dataset_config_name=dataset_config_name, train_dir=train_dir, split=split,
        image_column_name=image_column_name, label_column_name=label_column_name, max_images=max_images,
        cache_dir=cache_dir, model_revision=model_revision, index=index, index_type=index_type,
        batch_size=batch_size, num_workers=num_workers, max_image_pixels=max_image_pixels, progress=progress,
    )
    demo = build_blocks(gallery, default_k=default_k, max_k=max_k, num_examples=num_examples,
                        concurrency_limit=concurrency_limit, max_queue_size=max_queue_size)
    demo.gallery = gallery
    return demo


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's flags; their defaults come from the environment variables of `ENV_DEFAULTS` when set."""
    parser = argparse.ArgumentParser(
        description="Image-similarity search over a gallery with an SCE encoder (a Gradio app). The gallery "
        "defaults to the Fashion-MNIST test split (--dataset_name fashion_mnist --split test).",
        epilog="Defaults can be set with environment variables (a Space's variables): "
        + ", ".join(f"{v} (--{k})" for k, v in ENV_DEFAULTS.items()) + ".",
    )
    parser.add_argument("--model_name_or_path", type=str, default=DEFAULT_MODEL,
                        help=f"An exported model folder or a Hub id (default: {DEFAULT_MODEL}, what `make quickstart` trains).")
    parser.add_argument("--model_revision", type=str, default=None, help="The Hub revision (branch, tag or commit) of the model.")
    add_data_args(parser, gallery=True)
    index = parser.add_argument_group("index")
    index.add_argument("--index", type=str, default=None,
                       help="Folder of the saved gallery index, reused when the model and gallery are unchanged "
                       "(default: $HF_HOME/sce_hf/indexes/<fingerprint>).")
    index.add_argument("--index_type", choices=INDEX_TYPES, default="flat",
                       help="flat: exact search (default); ivf or hnsw: approximate, for large galleries.")
    index.add_argument("--per_device_eval_batch_size", type=int, default=256, help="Batch size of the embedding pass.")
    index.add_argument("--dataloader_num_workers", type=int, default=0, help="Decoding workers of the embedding pass.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    server.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    server.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    server.add_argument("--concurrency_limit", type=int, default=2, help="Searches run at the same time; others queue.")
    server.add_argument("--torch_threads", type=int, default=None,
                        help="torch threads per search (default: CPUs // --concurrency_limit, at least 1).")
    server.add_argument("--max_queue_size", type=int, default=128, help="Requests the queue holds before refusing more.")
    server.add_argument("--max_file_size", type=str, default="25mb", help="Largest upload accepted (e.g. 25mb).")
    server.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="Query images with more pixels are refused (decompression bombs).")
    server.add_argument("--max_k", type=int, default=48, help="Largest number of results a query may ask for.")
    env = {dest: os.environ[var] for dest, var in ENV_DEFAULTS.items() if os.environ.get(var)}
    parser.set_defaults(**env)  # argparse converts string defaults with each flag's type
    args = parser.parse_args(argv)
    if args.concurrency_limit < 1:
        parser.error(f"--concurrency_limit must be at least 1, got {args.concurrency_limit}.")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max_images must be at least 1, got {args.max_images}.")
    if args.dataset_name is not None and args.train_dir is not None:
        parser.error("Give one gallery: --dataset_name NAME_OR_PATH or --train_dir FOLDER, not both.")
    return args


def build_demo_from_args(args: argparse.Namespace) -> "gr.Blocks":
    """`build_demo` with the values of parsed flags."""
    return build_demo(
        args.model_name_or_path, args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir, split=args.split, image_column_name=args.image_column_name,
        label_column_name=args.label_column_name, max_images=args.max_images, cache_dir=args.cache_dir,
        model_revision=args.model_revision, index=args.index, index_type=args.index_type,
        batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
        max_image_pixels=args.max_image_pixels, max_k=args.max_k, concurrency_limit=args.concurrency_limit,
        max_queue_size=args.max_queue_size,
    )


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (containers and Spaces report the
    host's CPUs in `os.cpu_count()`)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_torch_threads(concurrency_limit: int) -> int:
    """torch threads per search so that `concurrency_limit` searches at once fill the CPUs without
    oversubscribing them: on a loaded 2-core machine, two threads per single-image forward made p95 latency
    150x worse than one (benchmarks/RESULTS.md)."""
    return max(1, available_cpus() // max(1, concurrency_limit))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, build the demo and serve it until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import torch

    torch.set_num_threads(available_cpus())  # the embedding pass of the gallery uses every CPU
    try:
        demo = build_demo_from_args(args)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    torch.set_num_threads(args.torch_threads or default_torch_threads(args.concurrency_limit))
    logger.info("torch uses %d thread(s) per search, %d search(es) at a time", torch.get_num_threads(), args.concurrency_limit)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size)


__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_MODEL",
    "Gallery",
    "GalleryFiles",
    "build_blocks",
    "build_demo",
    "build_demo_from_args",
    "available_cpus",
    "default_torch_threads",
    "load_encoder",
    "load_gallery",
    "load_gallery_dataset",
    "main",
    "parse_args",
    "resolve_gallery_columns",
]
