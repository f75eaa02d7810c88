#!/usr/bin/env python
"""How fast is the search demo? Query latency, index build throughput, approximate-index recall and 50
concurrent `gradio_client` queries, on Fashion-MNIST galleries.

    python benchmarks/demo_latency.py --model_name_or_path outputs/fashion-mnist-cpu
    python benchmarks/demo_latency.py --galleries test --num_queries 50 --concurrent 10   # a quick run

Prints JSON lines (also appended to `--output` when given):
- `build`: the gallery embedded through the model and its processor (decode, process, forward; batched, one
  process), images/s, and the time to add the vectors to the exact faiss index;
- `query_latency`: one query at a time, as `/search` runs it without the browser and the HTTP layer: decode a
  PNG, process, forward, L2-normalise, search the exact index for k; p50/p95/p99 in ms, and the search alone;
- `approximate`: an IVF and an HNSW index on the same embeddings: build time, recall@10 against exact search
  (1000 gallery queries, each leaving itself out), search latency;
- `client_sequential`: `demo/app.py` serves the 10k test gallery in its own process; 20 `/search` requests one
  after the other through `gradio_client`, with and without downloading the k result images: the cost of
  HTTP, queue and files around the few milliseconds of search;
- `concurrent`: the same server (queue, concurrency limit 2); `--concurrent` threads each send one `/search`
  through `gradio_client` at the same moment; all must be answered without error; latency of each request
  from submission to the answer, once with the k result images downloaded (what `gradio_client` does by
  default) and once without.

Galleries: `test` is the 10,000 Fashion-MNIST test images; `all` the 70,000 of train and test. Without a
trained model at `--model_name_or_path`, a randomly initialised encoder of the quickstart's architecture
(training/configs/fashion-mnist-cpu.yaml) stands in, and the output says so: the speed figures hold, the
similarities mean nothing, and the recall of approximate indexes on such near-collinear embeddings says
little about a trained model's.

`gradio_client` opens a new HTTP client (about 17 ms on these CPUs) for every file it downloads, so with
`download_results` the client's own cost dominates; without it the figure is the server's answer time.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sce_hf import SCEConfig, SCEImageProcessor, SCEModel  # noqa: E402
from sce_hf.data import load_fashion_mnist  # noqa: E402
from sce_hf.search import GalleryIndex  # noqa: E402


QUICKSTART_RECIPE = os.path.join(ROOT, "training", "configs", "fashion-mnist-cpu.yaml")


def emit(record: dict, output: str | None) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    if output:
        with open(output, "a") as handle:
            handle.write(line + "\n")
    return record


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)} | {
        "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2), "n": int(ms.size),
    }


def load_model(path: str):
    """The trained model, or a random one of the quickstart's architecture (and a note saying so)."""
    if os.path.isdir(path):
        from sce_hf.demo import load_encoder

        model, processor = load_encoder(path)
        return model, processor, None
    with open(QUICKSTART_RECIPE) as handle:
        recipe = yaml.safe_load(handle)
    preset_backbone = SCEConfig.from_preset(recipe["preset"]).backbone_config.to_dict()
    config = SCEConfig.from_preset(recipe["preset"], backbone_config={**preset_backbone, **recipe["backbone_config"]})
    torch.manual_seed(0)
    model = SCEModel(config).eval()
    processor = SCEImageProcessor.from_preset(recipe["processor_preset"])
    note = (
        f"no trained model at {path}: a randomly initialised SCEModel of the quickstart architecture "
        f"({recipe['preset']}, widths {recipe['backbone_config']['hidden_sizes']}, "
        f"{config.feature_dim}-d features, {sum(p.numel() for p in model.parameters()):,} parameters); "
        "speed figures hold, similarities are meaningless"
    )
    return model, processor, note


def gallery_dataset(name: str, max_images: int | None):
    from datasets import concatenate_datasets

    if name == "test":
        dataset = load_fashion_mnist("test")
    elif name == "all":
        dataset = concatenate_datasets([load_fashion_mnist("train"), load_fashion_mnist("test")])
    else:
        raise ValueError(f"Unknown gallery {name!r}: use test (10k) or all (70k).")
    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    return dataset


def png_queries(num: int, seed: int) -> list[bytes]:
    """PNG files of Fashion-MNIST train images (as users would upload them)."""
    train = load_fashion_mnist("train")
    rows = np.random.default_rng(seed).choice(len(train), size=num, replace=False)
    out = []
    for row in rows:
        buffer = io.BytesIO()
        train[int(row)]["image"].save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def query_latency(index: GalleryIndex, queries: list[bytes], k: int, warmup: int = 5) -> tuple[dict, dict]:
    for q in queries[:warmup]:
        index.query(q, k)
    total, search = [], []
    for q in queries:
        start = time.perf_counter()
        hits = index.query(q, k)
        total.append(time.perf_counter() - start)
        assert len(hits) == min(k, len(index))
    embeddings = index.embeddings[: len(queries)]
    for e in embeddings:
        start = time.perf_counter()
        index.search(e, k)
        search.append(time.perf_counter() - start)
    return percentiles(total), percentiles(search)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model_dir: str, index_dir: str, concurrency_limit: int, max_queue_size: int, log_path: str):
    """`demo/app.py` in its own process (as users run it) on the Fashion-MNIST test split; returns (process, url)."""
    import subprocess
    import urllib.request

    port = free_port()
    command = [
        sys.executable, os.path.join(ROOT, "demo", "app.py"), "--model_name_or_path", model_dir,
        "--dataset_name", "fashion_mnist", "--split", "test", "--index", index_dir, "--port", str(port),
        "--concurrency_limit", str(concurrency_limit), "--max_queue_size", str(max_queue_size),
    ]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            log.close()
            with open(log_path) as handle:
                tail = "".join(handle.readlines()[-20:])
            raise RuntimeError(f"demo/app.py exited with {process.returncode}; the end of its log:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("demo/app.py did not answer within 10 min")


def sequential_client_queries(url: str, queries: list[bytes], num: int, k: int, download: bool, folder: str) -> dict:
    """One `/search` at a time through `gradio_client`: the HTTP, queue and (de)serialisation cost of a request."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=download)
    times = []
    for i in range(num + 3):
        path = os.path.join(folder, f"s{i}.png")
        with open(path, "wb") as handle:
            handle.write(queries[i % len(queries)])
        start = time.perf_counter()
        client.predict(handle_file(path), k, api_name="/search")
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return {"download_results": download, **percentiles(times)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            names = {line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")}
        return ", ".join(sorted(names)) or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def concurrent_queries(url: str, queries: list[bytes], num: int, k: int, download: bool, folder: str) -> dict:
    """`num` threads send one /search each, released together; every request is timed from submission to the
    answer (and, with `download`, the k result images downloaded, as `gradio_client` does by default)."""
    from gradio_client import Client, handle_file

    paths = []
    for i in range(num):
        path = os.path.join(folder, f"q{i}.png")
        with open(path, "wb") as handle:
            handle.write(queries[i % len(queries)])
        paths.append(path)
    client = Client(url, verbose=False, max_workers=num + 8, download_files=download)
    client.predict(handle_file(paths[0]), k, api_name="/search")  # warm-up
    barrier = threading.Barrier(num)

    def one(path: str):
        barrier.wait()
        start = time.perf_counter()
        try:
            results = client.predict(handle_file(path), k, api_name="/search")
            return time.perf_counter() - start, None if len(results) == k else f"{len(results)} results"
        except Exception as error:  # counted, not raised: the benchmark reports errors
            return time.perf_counter() - start, f"{type(error).__name__}: {error}"

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=num) as pool:
        outcomes = list(pool.map(one, paths))
    wall = time.perf_counter() - start
    errors = [e for _, e in outcomes if e is not None]
    return {
        "requests": num, "answered": num - len(errors), "errors": len(errors), "error_samples": errors[:3],
        "download_results": download, "wall_s": round(wall, 2), "requests_per_s": round(num / wall, 1),
        **percentiles([t for t, _ in outcomes]),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="outputs/fashion-mnist-cpu")
    parser.add_argument("--galleries", default="test,all", help="Comma-separated: test (10k), all (70k).")
    parser.add_argument("--max_images", type=int, default=None, help="Cut each gallery (quick runs).")
    parser.add_argument("--num_queries", type=int, default=200, help="Sequential queries per gallery.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index_types", default="ivf,hnsw", help="Approximate indexes to measure ('' for none).")
    parser.add_argument("--recall_queries", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=50, help="Simultaneous /search requests (0: skip).")
    parser.add_argument("--concurrency_limit", type=int, default=2, help="The demo's queue concurrency limit.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=256)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="torch intra-op threads (default: what the demo uses, CPUs // concurrency limit).")
    parser.add_argument("--output", default=None, help="Also append the JSON lines to this file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from sce_hf.demo import default_torch_threads

    torch.set_num_threads(args.torch_threads or default_torch_threads(args.concurrency_limit))
    records = []
    model, processor, note = load_model(args.model_name_or_path)
    records.append(emit({
        "benchmark": "demo_latency", "date": time.strftime("%Y-%m-%d"), "machine": cpu_model(),
        "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": args.model_name_or_path, "model_note": note, "argv": sys.argv[1:] if argv is None else argv,
    }, args.output))
    queries = png_queries(max(args.num_queries, args.concurrent, 1), seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="sce-bench-")
    try:
        return _run(args, model, processor, note, queries, scratch.name, records)
    finally:
        scratch.cleanup()


def _run(args, model, processor, note, queries, scratch: str, records: list[dict]) -> list[dict]:
    index_root = os.path.join(scratch, "index")
    for name in [g for g in args.galleries.split(",") if g]:
        dataset = gallery_dataset(name, args.max_images)
        start = time.perf_counter()
        index = GalleryIndex.build(
            model, processor, dataset, image_column="image", label_column="label", index_type="flat",
            index_dir=os.path.join(index_root, name), batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers, progress=False, save=False,
        )
        total = time.perf_counter() - start
        records.append(emit({
            "gallery": name, "stage": "build", "num_images": len(index), "feature_dim": index.feature_dim,
            "embed_s": round(index.build_seconds, 2), "embed_images_per_s": round(len(index) / index.build_seconds, 1),
            "faiss_flat_add_s": round(total - index.build_seconds, 3), "batch_size": args.per_device_eval_batch_size,
            "num_workers": args.dataloader_num_workers,
        }, args.output))
        total_ms, search_ms = query_latency(index, queries[: args.num_queries], args.k)
        records.append(emit({
            "gallery": name, "stage": "query_latency", "index_type": "flat", "k": args.k, "num_images": len(index),
            "end_to_end": total_ms, "search_only": search_ms, "goal_p95_ms": 100,
            "meets_goal": total_ms["p95_ms"] < 100,
        }, args.output))
        for index_type in [t for t in args.index_types.split(",") if t]:
            start = time.perf_counter()
            approx = GalleryIndex(dataset, index.embeddings, model=model, processor=processor, image_column="image",
                                  label_column="label", index_type=index_type)
            build_s = time.perf_counter() - start
            recall = approx.recall_at_k(k=10, num_queries=args.recall_queries)
            approx_total, approx_search = query_latency(approx, queries[: args.num_queries], args.k)
            records.append(emit({
                "gallery": name, "stage": "approximate", "index_type": index_type, "num_images": len(index),
                "faiss": str(type(approx.faiss_index).__name__), "build_s": round(build_s, 2),
                "recall_at_10": round(recall, 4), "recall_queries": min(args.recall_queries, len(index)),
                "end_to_end": approx_total, "search_only": approx_search,
            }, args.output))
    if args.concurrent > 0:
        # The server runs as users run it, in its own process: a client and a server sharing one interpreter
        # (and its GIL) would measure each other.
        work = os.path.join(scratch, "app")
        os.makedirs(work)
        model_dir = args.model_name_or_path
        if note is not None:  # the random stand-in, saved so that demo/app.py can load it
            model_dir = os.path.join(work, "model")
            model.save_pretrained(model_dir)
            processor.save_pretrained(model_dir)
        log_path = os.path.join(work, "app.log")
        process, url = start_app(model_dir, os.path.join(work, "index"), args.concurrency_limit,
                                 max(128, 2 * args.concurrent), log_path)
        try:
            for download in (True, False):
                result = sequential_client_queries(url, queries, 20, args.k, download, work)
                records.append(emit({"gallery": "test", "stage": "client_sequential", "k": args.k, "num_images": 10_000,
                                     "server": "demo/app.py, own process", **result}, args.output))
            for download in (True, False):
                result = concurrent_queries(url, queries, args.concurrent, args.k, download, work)
                records.append(emit({"gallery": "test", "stage": "concurrent", "k": args.k, "num_images": 10_000,
                                     "server": "demo/app.py, own process", "concurrency_limit": args.concurrency_limit,
                                     **result}, args.output))
        finally:
            process.terminate()
            process.wait(timeout=30)
    return records


if __name__ == "__main__":
    main()
