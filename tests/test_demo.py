"""The Gradio demo (`sce_hf.demo`, `demo/app.py`) in this process: launched on a free loopback port and called
through `gradio_client` like any user of the `/search` endpoint.

1. `/search` (image, k) returns k results best first; a gallery image comes back first with similarity ~1.
2. Bad uploads (a text file named .png, a truncated PNG, a PNG claiming too many pixels) give a clear message and
   the server keeps answering.
3. The saved index is reused on a second start and rebuilt for another model.
4. A gallery without the named column is a startup error listing the columns, before the model loads or a
   server starts.
5. The Space path: the app file reads the model and the gallery by Hub id from a hand-laid Hugging Face cache
   with `HF_HUB_OFFLINE=1`, the model through its remote code.
"""

from __future__ import annotations

import os
import re
import runpy
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.test_search import fashion_mnist_gallery, png_header, tiny_model, tiny_processor


ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_assets(root: Path) -> SimpleNamespace:
    """A tiny exported model, a 60-image Fashion-MNIST gallery saved with `save_to_disk`, and query images."""
    model_dir, gallery_dir = root / "model", root / "gallery"
    tiny_model().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    gallery = fashion_mnist_gallery(NUM_IMAGES)
    gallery.save_to_disk(str(gallery_dir))
    queries = {}
    for row in (7, 42):
        queries[row] = root / f"gallery-{row}.png"
        gallery[row]["image"].save(queries[row])
    return SimpleNamespace(root=root, model=str(model_dir), gallery=str(gallery_dir), dataset=gallery, queries=queries)


def launch(demo) -> str:
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`main()` sets torch's (process-wide) thread count for serving; other tests keep theirs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def server(assets):
    from gradio_client import Client

    from sce_hf.demo import build_demo

    demo = build_demo(assets.model, assets.gallery, index=str(assets.root / "index"), progress=False)
    url = launch(demo)
    try:
        yield SimpleNamespace(demo=demo, url=url, client=Client(url, verbose=False))
    finally:
        demo.close()


def scores_of(results) -> list[float]:
    return [float(item["caption"].split(" · ")[0]) for item in results]


# ---------------------------------------------------------------------------------------------------------------
# /search through gradio_client


def test_search_endpoint__k_results_best_first_and_the_image_itself_first(server, assets):
    from gradio_client import handle_file

    api = server.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(api) == ["/search"] and [p["parameter_name"] for p in api["/search"]["parameters"]] == ["image", "k"]

    for row, k in ((7, 5), (42, 12)):
        results = server.client.predict(handle_file(str(assets.queries[row])), k, api_name="/search")
        assert len(results) == k
        scores = scores_of(results)
        assert scores == sorted(scores, reverse=True)
        assert scores[0] >= 0.999
        label = assets.dataset.features["label"].int2str(assets.dataset[row]["label"])
        assert results[0]["caption"].endswith(f" · {label}")
        # the first result is the query's own gallery image, pixel for pixel
        np.testing.assert_array_equal(np.asarray(Image.open(results[0]["image"])), np.asarray(assets.dataset[row]["image"]))


def test_search_endpoint__k_is_validated(server, assets):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="k must be between 1 and"):
        server.client.predict(handle_file(str(assets.queries[7])), 0, api_name="/search")
    with pytest.raises(AppError, match="Upload, paste or capture an image first"):
        server.client.predict(None, 3, api_name="/search")


def bad_upload(kind: str, folder: Path) -> Path:
    if kind == "text renamed .png":
        path = folder / "notes.png"
        path.write_text("not an image, just text\n" * 10)
    elif kind == "truncated PNG":
        path = folder / "truncated.png"
        noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a few hundred bytes claiming 30000 x 30000 pixels
        path = folder / "bomb.png"
        path.write_bytes(png_header(30000, 30000))
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text renamed .png", "not an image"),
        ("truncated PNG", "truncated or corrupt"),
        ("huge-dimension PNG", "too large|too many pixels"),
    ],
)
def test_bad_upload__a_message_then_the_next_query_works(server, assets, tmp_path, kind, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message) as error:
        server.client.predict(handle_file(str(bad_upload(kind, tmp_path))), 5, api_name="/search")
    assert "Upload a PNG, JPEG or WebP image" in str(error.value)
    assert str(tmp_path) not in str(error.value) and "/gradio" not in str(error.value)  # no server paths
    results = server.client.predict(handle_file(str(assets.queries[7])), 4, api_name="/search")
    assert len(results) == 4 and scores_of(results)[0] >= 0.999


def test_ui__sources_examples_queue_and_info_panel(server, assets):
    import gradio as gr

    demo = server.demo
    blocks = list(demo.blocks.values())
    (query,) = [b for b in blocks if isinstance(b, gr.Image) and b.elem_id == "query"]
    assert query.sources == ["upload", "clipboard", "webcam"]
    assert any(isinstance(b, gr.Gallery) and b.elem_id == "results" for b in blocks)
    assert any(isinstance(b, gr.Slider) and b.elem_id == "k" for b in blocks)
    (examples,) = [b for b in blocks if isinstance(b, gr.Dataset)]  # the example queries: one per class
    assert len(examples.samples) == 6
    info = _info(demo)
    assert assets.model in info and assets.gallery in info and f"{NUM_IMAGES} images" in info
    assert demo._queue.default_concurrency_limit == 2 and demo._queue.max_size == 128


# ---------------------------------------------------------------------------------------------------------------
# Startup


def test_index__reused_on_a_second_start_and_rebuilt_for_another_model(server, assets, tmp_path):
    from sce_hf.demo import build_demo

    index = str(assets.root / "index")
    assert not server.demo.gallery.index.reused  # the fixture's start built it
    second = build_demo(assets.model, assets.gallery, index=index, progress=False)
    assert second.gallery.index.reused and "reused from" in _info(second)

    other = tmp_path / "other-model"
    tiny_model(seed=1).save_pretrained(other)
    tiny_processor().save_pretrained(other)
    third = build_demo(str(other), assets.gallery, index=index, progress=False)
    assert not third.gallery.index.reused and "built in" in _info(third)


def _info(demo) -> str:
    import gradio as gr

    return next(b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.elem_id == "info")


def test_gallery_files__cmyk_and_exif_rotated_gallery_images(tmp_path):
    """ImageNet holds CMYK JPEGs, which PNG cannot store; phone photos carry an EXIF rotation."""
    import io

    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    from sce_hf.demo import GalleryFiles
    from sce_hf.search import GalleryIndex

    rng = np.random.default_rng(0)
    encoded = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("CMYK").save(buffer, format="JPEG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    gallery = Dataset.from_dict({"image": encoded}, features=Features({"image": ImageFeature()}))
    assert gallery[0]["image"].mode == "CMYK"
    index = GalleryIndex.build(tiny_model(), tiny_processor(), gallery, index_dir=str(tmp_path / "index"), progress=False)
    files = GalleryFiles(index, folder=str(tmp_path / "files"))
    for row in range(4):
        with Image.open(files.path(row)) as thumbnail:
            assert thumbnail.mode == "RGB" and thumbnail.size == (30, 20)

    # A photo held sideways (EXIF orientation 6): searched upright, as the browser shows it.
    upright = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    upright.rotate(90, expand=True).save(buffer, format="JPEG", exif=exif)  # stored as the camera wrote it
    from sce_hf.data import decode_image

    assert decode_image(buffer.getvalue()).size == (30, 20)


def test_startup__a_missing_column_is_a_clear_error_before_anything_starts(assets, monkeypatch):
    import gradio as gr

    from sce_hf.demo import build_demo, main

    monkeypatch.setattr(gr.Blocks, "launch", lambda *a, **k: pytest.fail("the server started"))
    # the column is checked before the model loads: a missing model is not what is reported
    with pytest.raises(ValueError, match=re.escape("no image column 'photo'; its columns are ['image', 'label']")):
        build_demo("no/such-model", assets.gallery, image_column_name="photo")
    with pytest.raises(ValueError, match="no label column 'class'"):
        build_demo(assets.model, assets.gallery, label_column_name="class")
    with pytest.raises(SystemExit, match=r"error: .*no image column 'photo'"):
        main(["--model_name_or_path", assets.model, "--dataset_name", assets.gallery, "--image_column_name", "photo"])
    with pytest.raises(SystemExit, match=r"Cannot load the model 'outputs/no-such-model'"):
        main(["--model_name_or_path", "outputs/no-such-model", "--dataset_name", assets.gallery])


def test_parse_args__flags_and_environment_defaults(monkeypatch):
    from sce_hf.demo import parse_args

    for var in ("SCE_MODEL_ID", "SCE_DATASET", "SCE_SPLIT", "SCE_MAX_IMAGES", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args([])
    assert (args.model_name_or_path, args.dataset_name, args.split) == ("outputs/fashion-mnist-cpu", None, "test")
    assert (args.host, args.port, args.share, args.index, args.index_type) == ("127.0.0.1", 7860, False, None, "flat")
    monkeypatch.setenv("SCE_MODEL_ID", "org/encoder")
    monkeypatch.setenv("SCE_MAX_IMAGES", "500")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    args = parse_args(["--split", "train", "--index_type", "hnsw", "--index", "idx", "--port", "9000", "--share"])
    assert (args.model_name_or_path, args.max_images, args.host) == ("org/encoder", 500, "0.0.0.0")
    assert (args.split, args.index_type, args.index, args.port, args.share) == ("train", "hnsw", "idx", 9000, True)
    assert parse_args(["--model_name_or_path", "dir"]).model_name_or_path == "dir"  # a flag beats the variable
    with pytest.raises(SystemExit):
        parse_args(["--index_type", "lsh"])


def _lay_out_hub_repo(kind: str, repo_id: str, files_from: Path | None = None, parquet_of=None) -> Path:
    """`$HF_HUB_CACHE/{models|datasets}--ORG--NAME/refs/main` + `snapshots/<commit>/`, as a download leaves it."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if files_from is not None:
        for path in files_from.iterdir():
            (snapshot / path.name).write_bytes(path.read_bytes())
    if parquet_of is not None:
        (snapshot / "data").mkdir(exist_ok=True)
        parquet_of.to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    return snapshot


def test_space__app_reads_model_and_gallery_from_the_hub_offline(assets, monkeypatch, tmp_path):
    """demo/app.py as a Space runs it: ids in the Space's variables, files from a hand-laid cache, no network."""
    import gradio as gr
    from gradio_client import Client, handle_file

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model_snapshot = _lay_out_hub_repo("model", "sce-test/tiny-encoder", files_from=Path(assets.model))
    assert {"config.json", "model.safetensors", "modeling_sce.py", "preprocessor_config.json"} <= {
        p.name for p in model_snapshot.iterdir()
    }
    _lay_out_hub_repo("dataset", "sce-test/tiny-gallery", parquet_of=assets.dataset.select(range(40)))
    monkeypatch.setenv("SCE_MODEL_ID", "sce-test/tiny-encoder")
    monkeypatch.setenv("SCE_DATASET", "sce-test/tiny-gallery")
    monkeypatch.setenv("SCE_INDEX", str(tmp_path / "space-index"))
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(free_port()))

    launched = {}

    def fake_launch(self, **kwargs):  # the Space's launch, but returning: the test serves it itself
        launched.update(kwargs, demo=self)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    runpy.run_path(str(ROOT / "demo" / "app.py"), run_name="__main__")
    demo = launched["demo"]
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False
    assert demo.gallery.model_name == "sce-test/tiny-encoder" and len(demo.gallery.index) == 40
    assert type(demo.gallery.index.model).__name__ == "SCEModel"

    monkeypatch.undo()  # the real launch again
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        results = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(assets.queries[7])), 3, api_name="/search"
        )
    finally:
        demo.close()
    assert len(results) == 3 and scores_of(results)[0] >= 0.999


def test_import__no_module_of_sce_hf_imports_gradio_or_faiss_at_import_time():
    """gradio and faiss are the `demo` extra: `import sce_hf` (and `sce_hf.demo --help`) must work without them."""
    import ast

    optional = {"gradio", "gradio_client", "faiss", "playwright"}
    for path in sorted((ROOT / "sce_hf").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            )
            assert not {n.split(".")[0] for n in names} & optional, f"{path.name} imports {names} at module level"
