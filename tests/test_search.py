"""`sce_hf.search.GalleryIndex`: embedding, exact and approximate search, the saved index and its fingerprints.

A tiny random encoder on 60 Fashion-MNIST test images: the numbers are meaningless, the plumbing is what is
tested (a gallery image finds itself first with similarity 1, scores come best first, the saved index is reused
when nothing changed and rebuilt when the model or the gallery did).
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

from sce_hf import SCEImageProcessor, SCEModel
from sce_hf.data import BadImageError
from sce_hf.search import (
    EMBEDDINGS_FILE,
    META_FILE,
    GalleryIndex,
    dataset_fingerprint,
    faiss_factory_string,
    model_fingerprint,
)
from tests.tiny import tiny_config


FASHION_MNIST_FILE = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def tiny_processor() -> SCEImageProcessor:
    return SCEImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16})


def tiny_model(seed: int = 0) -> SCEModel:
    torch.manual_seed(seed)
    return SCEModel(tiny_config()).eval()


def fashion_mnist_gallery(num_images: int = 60):
    if not os.path.exists(FASHION_MNIST_FILE):
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (make test does it)")
    from sce_hf.data import load_fashion_mnist

    return load_fashion_mnist("test").select(range(num_images))


@pytest.fixture(scope="module")
def gallery():
    return fashion_mnist_gallery()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels (a decompression bomb's header) with one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------------------
# Search


def test_query__a_gallery_image_finds_itself_first(model, gallery, tmp_path):
    index = GalleryIndex.build(model, tiny_processor(), gallery, label_column="label", index_dir=str(tmp_path), progress=False)
    assert len(index) == 60 and index.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    for row in (0, 7, 59):
        hits = index.query(gallery[row]["image"], k=5)
        assert len(hits) == 5
        assert hits[0].index == row and hits[0].score > 0.999
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert hits[0].label == gallery.features["label"].int2str(gallery[row]["label"])
    assert len(index.query(gallery[0]["image"], k=500)) == 60  # k is capped at the gallery size


def test_query__accepts_paths_bytes_and_any_image_mode(model, gallery, tmp_path):
    index = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=str(tmp_path), progress=False)
    image = gallery[3]["image"]
    path = tmp_path / "q.png"
    image.save(path)
    by_path = index.query(str(path), k=3)
    assert [h.index for h in by_path] == [h.index for h in index.query(path.read_bytes(), k=3)]
    assert by_path[0].index == 3
    assert index.query(image.convert("RGBA"), k=1)[0].index == 3
    assert index.label(0) is None  # no label column was given


def test_query__bad_images_raise_bad_image_error(model, gallery, tmp_path):
    index = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=str(tmp_path), progress=False)
    buffer = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer)
    bad = {
        "text": b"this is not an image",
        "truncated": buffer.read_bytes()[: buffer.stat().st_size // 2],
        "over the pixel limit": png_header(8000, 8000),  # 64 MP > the 50 MP default
        "decompression bomb": png_header(30000, 30000),  # 900 MP: Pillow's own bomb check
    }
    for name, payload in bad.items():
        with pytest.raises(BadImageError):
            index.query(payload, k=3)
    assert index.query(buffer.read_bytes(), k=3)  # still answers


# ---------------------------------------------------------------------------------------------------------------
# The saved index


def test_cache__reused_when_unchanged_rebuilt_when_the_model_or_gallery_changes(model, gallery, tmp_path, monkeypatch):
    import sce_hf.search

    calls = []
    original = sce_hf.search.extract_features
    monkeypatch.setattr(sce_hf.search, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    folder = str(tmp_path / "index")
    build = lambda m, g, **kw: GalleryIndex.build(m, tiny_processor(), g, index_dir=folder, progress=False, **kw)  # noqa: E731

    first = build(model, gallery)
    assert not first.reused and len(calls) == 1
    mtime = os.path.getmtime(os.path.join(folder, EMBEDDINGS_FILE))

    second = build(model, gallery)
    assert second.reused and len(calls) == 1  # no re-embedding
    assert os.path.getmtime(os.path.join(folder, EMBEDDINGS_FILE)) == mtime
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert second.query(gallery[5]["image"], k=1)[0].index == 5

    changed = tiny_model(seed=1)  # other weights, same architecture
    third = build(changed, gallery)
    assert not third.reused and len(calls) == 2
    with open(os.path.join(folder, META_FILE)) as handle:
        assert json.load(handle)["model_fingerprint"] == model_fingerprint(changed, tiny_processor())

    fourth = build(changed, gallery.select(range(50)), max_images=50)  # another gallery
    assert not fourth.reused and len(calls) == 3 and len(fourth) == 50

    assert build(changed, gallery.select(range(50)), max_images=50).reused and len(calls) == 3


def test_cache__another_index_type_reuses_the_embeddings(model, gallery, tmp_path, monkeypatch):
    import sce_hf.search

    folder = str(tmp_path)
    GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False)
    monkeypatch.setattr(sce_hf.search, "extract_features", lambda *a, **k: pytest.fail("re-embedded the gallery"))
    hnsw = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, index_type="hnsw", progress=False)
    assert hnsw.reused and os.path.exists(os.path.join(folder, "faiss-hnsw.index"))
    assert type(hnsw.faiss_index).__name__ == "IndexHNSWFlat"
    again = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, index_type="hnsw", progress=False)
    assert again.query(gallery[9]["image"], k=1)[0].index == 9


def test_cache__an_interrupted_save_is_rebuilt(model, gallery, tmp_path):
    folder = str(tmp_path)
    GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False)
    os.remove(os.path.join(folder, META_FILE))  # what a save killed before its last step leaves
    assert not GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False).reused
    with open(os.path.join(folder, META_FILE), "w") as handle:
        handle.write("{not json")
    assert not GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False).reused


def test_cache__a_damaged_faiss_file_is_rebuilt_from_the_saved_embeddings(model, gallery, tmp_path, monkeypatch, caplog):
    import sce_hf.search

    folder = str(tmp_path)
    GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False)
    with open(os.path.join(folder, "faiss-flat.index"), "wb") as handle:
        handle.write(b"not a faiss index")
    monkeypatch.setattr(sce_hf.search, "extract_features", lambda *a, **k: pytest.fail("re-embedded the gallery"))
    with caplog.at_level("WARNING"):
        index = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False)
    assert "rebuilding the flat index" in caplog.text
    assert index.reused and index.query(gallery[4]["image"], k=1)[0].index == 4
    assert GalleryIndex.build(model, tiny_processor(), gallery, index_dir=folder, progress=False).reused  # saved again


def test_cache__a_save_that_fails_keeps_the_built_index(model, gallery, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the index folder should go")
    with caplog.at_level("WARNING"):
        index = GalleryIndex.build(model, tiny_processor(), gallery, index_dir=str(blocker / "index"), progress=False)
    assert "Could not save the gallery index" in caplog.text and index.index_dir is None
    assert index.query(gallery[2]["image"], k=1)[0].index == 2


def test_cache__default_folder_is_keyed_by_model_and_gallery(model, gallery, monkeypatch, tmp_path):
    monkeypatch.setenv("SCE_HF_CACHE", str(tmp_path))
    a = GalleryIndex.build(model, tiny_processor(), gallery, progress=False)
    b = GalleryIndex.build(tiny_model(seed=2), tiny_processor(), gallery, progress=False)
    assert a.index_dir.startswith(str(tmp_path)) and a.index_dir != b.index_dir
    assert GalleryIndex.build(model, tiny_processor(), gallery, progress=False).reused


def test_fingerprints__follow_weights_and_settings_not_the_load_path(model, gallery, tmp_path):
    model.save_pretrained(tmp_path / "a")
    reloaded = SCEModel.from_pretrained(tmp_path / "a").eval()
    assert model_fingerprint(reloaded, tiny_processor()) == model_fingerprint(model, tiny_processor())
    other_processor = SCEImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    assert model_fingerprint(model, other_processor) != model_fingerprint(model, tiny_processor())
    with torch.no_grad():
        next(reloaded.parameters()).add_(1e-3)
    assert model_fingerprint(reloaded) != model_fingerprint(model)

    base = dataset_fingerprint(gallery, split="test", image_column="image")
    assert base == dataset_fingerprint(fashion_mnist_gallery(), split="test", image_column="image")
    assert base != dataset_fingerprint(gallery, split="train", image_column="image")
    assert base != dataset_fingerprint(gallery.select(range(59)), split="test", image_column="image")


def test_build__missing_column_and_unknown_index_type(model, gallery):
    with pytest.raises(ValueError, match=r"no column 'photo'.*\['image', 'label'\]"):
        GalleryIndex.build(model, tiny_processor(), gallery, image_column="photo", save=False)
    with pytest.raises(ValueError, match="choose one of"):
        GalleryIndex.build(model, tiny_processor(), gallery, index_type="lsh", save=False)


# ---------------------------------------------------------------------------------------------------------------
# Approximate indexes


def test_factory_strings():
    assert faiss_factory_string("flat", 10_000) is None
    assert faiss_factory_string("ivf", 10_000) == "IVF256,Flat"  # min(4·√N, N/39)
    assert faiss_factory_string("ivf", 70_000) == "IVF1058,Flat"
    assert faiss_factory_string("ivf", 20) == "IVF1,Flat"
    assert faiss_factory_string("hnsw", 10) == "HNSW32"


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_recall_at_10__approximate_against_exact(index_type):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    vectors = (centers[rng.integers(0, 20, 3000)] + 0.5 * rng.normal(size=(3000, 32))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dataset = Dataset.from_dict({"image": list(range(3000))})
    index = GalleryIndex(dataset, vectors, model=None, processor=None, image_column="image", index_type=index_type)
    recall = index.recall_at_k(k=10, num_queries=300)
    if index_type == "flat":
        assert recall == 1.0
    else:
        assert 0.8 < recall <= 1.0, recall
    hits = index.search(vectors[17], k=10)
    assert hits[0].index == 17 and hits[0].score == pytest.approx(1.0, abs=1e-5)
