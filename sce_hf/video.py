"""Video input for SCE: clip sampling, random temporal difference, video datasets, the video processor, and
clip-level feature extraction with the authors' test protocol (SCE_SPEC §3.5, §5). Decoding (`open_video`: files,
bytes, frame folders, frames in memory) is in `sce_hf.video_decoding`.

Clips (SCE_SPEC §5.1): a clip covers `clip_duration` seconds from a start drawn uniformly in
[0, max(duration − clip_duration, 0)]; its `num_frames` frames are taken uniformly over the frames decoded in that
window (`clip_frame_indices`, pytorchvideo's UniformTemporalSubsample). A video **shorter than a clip** gives a clip
that starts at 0 and covers the whole video, its frames spread uniformly over the frames there are (repeated when
there are fewer than `num_frames`). A video with fewer than `min_frames` decodable frames in the window, or none at
all, is a `BadVideoError`: training skips and counts it, as unreadable images are.

Randomness comes from the per-sample seed of `sce_hf.augmentations.make_sample_seeds`: clip v's start and its temporal
difference draw come from `clip_generator(seed, v)`, its crop box from `view_generator(seed, v)` (the stream the
device augmentation continues), so a sample's clips do not depend on the batch, the worker or the process count.

Layout: frames are decoded channel-last `(T, H, W, 3)` uint8; what the data pipeline hands over is `(T, 3, s, s)`
uint8 per clip, and the model takes `pixel_values` `(B, T, 3, s, s)` (SCEVideoProcessor, or the batched device
augmentations, which draw one set of random parameters per clip, shared by its frames).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .augmentations import KINETICS_MEAN, KINETICS_STD, ViewRecipe, make_sample_seeds, mix_seed, sample_crop_box, view_generator
from .data import SampleRef
from .evaluation import pooled_features
from .video_decoding import DEFAULT_FRAME_RATE, BadVideoError, natural_sort_key, open_video, write_video, yuv420p_to_rgb
from .video_processing_sce import SCEVideoProcessor

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")
VIDEO_COLUMN_FALLBACKS = ("video", "videos", "clip", "path", "file")
_CLIP_STREAM = 0x5CE_C11  # separates the clip-start / temporal-difference draws from the crop and colour ones


# ---------------------------------------------------------------------------------------------------------------
# Clips


def sample_clip_starts(duration: float, clip_duration: float, num_clips: int, generator: torch.Generator) -> list[float]:
    """Independent clip starts, each uniform in [0, max(duration − clip_duration, 0)] (SCE_SPEC §5.1)."""
    max_start = max(duration - clip_duration, 0.0)
    return [float(u) * max_start for u in torch.rand(num_clips, generator=generator, dtype=torch.float64)]


def evenly_spaced_clip_starts(duration: float, clip_duration: float, num_clips: int) -> list[float]:
    """The test protocol's clip starts: `num_clips` evenly spaced from 0 to max(duration − clip_duration, 0);
    one clip is centred."""
    max_start = max(duration - clip_duration, 0.0)
    if num_clips == 1:
        return [max_start / 2]
    return [max_start * i / (num_clips - 1) for i in range(num_clips)]


def clip_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly over `num_available` frames: `linspace(0, n − 1, num_frames)` truncated
    (pytorchvideo's UniformTemporalSubsample). With fewer frames than asked, frames repeat."""
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame and one index, got {num_available} frames for {num_frames} indices.")
    positions = torch.linspace(0, num_available - 1, num_frames, dtype=torch.float64)
    return positions.clamp(0, num_available - 1).long().tolist()


def _grayscale(frame: np.ndarray) -> np.ndarray:
    # torchvision's rgb_to_grayscale on uint8 (ITU-R 601-2 weights, truncated back to uint8), as the authors apply it.
    gray = 0.2989 * frame[..., 0] + 0.587 * frame[..., 1] + 0.114 * frame[..., 2]
    return np.floor(gray).clip(0, 255)


def temporal_difference(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The authors' temporal difference (SCE_SPEC §3.5): grayscale, signed difference of each frame with the next,
    mapped to [0, 255] as round((d + 255) / 2); the last frame repeats the last difference; one frame gives 127.5
    rounded (mid-grey). Returns `(T, H, W, 3)` uint8."""
    gray = np.stack([_grayscale(f) for f in frames]).astype(np.float32)  # (T, H, W)
    out = np.zeros_like(gray) if len(frames) == 1 else np.empty_like(gray)
    if len(frames) > 1:
        out[:-1] = gray[:-1] - gray[1:]
        out[-1] = out[-2]
    out = np.round((out + 255.0) / 2.0).clip(0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def read_clip(
    video, start: float, clip_duration: float, num_frames: int, temporal_diff: bool = False, min_frames: int = 1
) -> np.ndarray:
    """The `num_frames` frames of the clip [start, start + clip_duration) of an opened video, `(T, H, W, 3)` uint8.

    With `temporal_diff`, frame i becomes the temporal difference of raw frames i and i + 1 of the window (before
    subsampling, as the authors' PyAV pipeline computes it), the last one repeating the last difference.

    Raises:
        BadVideoError: fewer than `min_frames` frames in the window (a video too short).
    """
    window = video.window(start, start + clip_duration)
    if len(window) < max(1, min_frames):
        raise BadVideoError(
            f"{len(window)} frame(s) in the clip [{start:.3g}, {start + clip_duration:.3g}) s of a video of "
            f"{video.duration:.3g} s; at least {max(1, min_frames)} needed"
        )
    indices = clip_frame_indices(len(window), num_frames)
    if not temporal_diff:
        return np.stack([window[i] for i in indices])
    if len(window) == 1:
        return temporal_difference([window[0]])[[0] * num_frames]
    pairs = [(i, i + 1) if i + 1 < len(window) else (i - 1, i) for i in indices]
    return np.stack([temporal_difference([window[a], window[b]])[0] for a, b in pairs])


def clip_generator(sample_seed: int, clip: int) -> torch.Generator:
    """The CPU generator of clip `clip`'s start and temporal-difference draw (not the crop/colour stream)."""
    return torch.Generator().manual_seed(mix_seed(sample_seed, clip, _CLIP_STREAM))


# ---------------------------------------------------------------------------------------------------------------
# Spatial transforms of clips (CPU, PIL bilinear with antialiasing)


def _to_tensor(frames: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


def resized_crop_clip(frames: np.ndarray, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop the same box `(top, left, h, w)` from every frame and resize it to `size` x `size`: uint8 (T, 3, s, s)."""
    top, left, h, w = box
    return _to_tensor([
        np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
        for f in frames
    ])


def short_side_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize every frame so its shorter side is `size` (the longer one floor-scaled, as pytorchvideo)."""
    height, width = frames.shape[1:3]
    if (min(height, width)) == size:
        return frames
    if width < height:
        new_w, new_h = size, int(math.floor(height / width * size))
    else:
        new_w, new_h = int(math.floor(width / height * size)), size
    return np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BILINEAR)) for f in frames])


def uniform_crop(frames: np.ndarray, size: int, spatial_index: int) -> np.ndarray:
    """pytorchvideo's uniform crop: a `size` square at the start (0), centre (1) or end (2) of the longer side."""
    height, width = frames.shape[1:3]
    top, left = int(math.ceil((height - size) / 2)), int(math.ceil((width - size) / 2))
    if height > width:
        top = {0: 0, 1: top, 2: height - size}[spatial_index]
    else:
        left = {0: 0, 1: left, 2: width - size}[spatial_index]
    return frames[:, top : top + size, left : left + size]


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def load_video_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
):
    """One split of a video dataset, as a `datasets.Dataset` whose video column holds undecoded values.

    Args:
        dataset_name: anything `sce_hf.data.load_image_dataset` reads (a Hub id, a `save_to_disk` folder, data files)
            with a `datasets.Video` column (cast to `Video(decode=False)`: PyAV decodes) or a column of paths/bytes.
        train_dir: a folder `ROOT/[SPLIT/]CLASS/VIDEO`, each VIDEO a video file or a folder of frames; `ROOT/SPLIT`
            is used when it exists, else `ROOT` itself for the split "train". Gives the columns `video` (paths)
            and `label` (a `ClassLabel` of the class folders).

    Raises:
        ValueError: no source or two, a missing split folder, or no video found.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    if (dataset_name is None) == (train_dir is None):
        raise ValueError("Give exactly one data source: `--dataset_name NAME_OR_PATH` or `--train_dir FOLDER`.")
    if dataset_name is not None:
        from .data import load_image_dataset

        dataset = load_image_dataset(dataset_name, dataset_config_name, None, split, False, cache_dir)
        return without_video_decoding(dataset)
    if not os.path.isdir(train_dir):
        raise ValueError(f"`--train_dir` {train_dir!r} is not a folder.")
    root = os.path.join(train_dir, split)
    if not os.path.isdir(root):
        if split != "train":
            raise ValueError(f"No folder for the split {split!r} in {train_dir} (expected {root}/CLASS/VIDEO).")
        root = train_dir
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        for entry in sorted(os.listdir(class_dir), key=natural_sort_key):
            path = os.path.join(class_dir, entry)
            if entry.lower().endswith(VIDEO_EXTENSIONS) or os.path.isdir(path):
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(
            f"No video in {root}: expected CLASS/VIDEO entries, each a video file ({', '.join(VIDEO_EXTENSIONS)}) or a "
            "folder of frames."
        )
    features = Features({"video": Value("string"), "label": ClassLabel(names=classes)})
    return Dataset.from_dict({"video": paths, "label": labels}, features=features)


def without_video_decoding(dataset, column: str | None = None):
    """The dataset with its `datasets.Video` columns left as `{"bytes", "path"}`, so PyAV decodes in the workers."""
    from datasets import Video

    features = dataset.features or {}
    for name, feature in features.items():
        if isinstance(feature, Video) and (column is None or name == column) and feature.decode:
            dataset = dataset.cast_column(name, Video(decode=False))
    return dataset


def load_clip_sample(
    value,
    ref: SampleRef,
    seed: int,
    views: Sequence[ViewRecipe],
    num_frames: int,
    clip_duration: float,
    temporal_difference_p: float = 0.0,
    frame_rate: float = DEFAULT_FRAME_RATE,
    min_frames: int = 1,
    short_side_range: tuple[int, int] | None = None,
) -> dict:
    """Decode one video into one cropped clip per view; `{"bad": reason}` for an unreadable or too short video.

    Clip v: start from `clip_generator(seed, v)` (then the temporal-difference draw, probability
    `temporal_difference_p`), frames `(T, 3, s_v, s_v)` uint8 cropped with one box for all frames: a
    RandomResizedCrop box of the view's recipe from `view_generator(seed, v)` (pretraining, SCE_SPEC §3.5), or with
    `short_side_range` a random short-side scale in that range and a random `s_v` square (linear evaluation and
    fine-tuning, SCE_SPEC §5.3).
    """
    sample_seed = int(make_sample_seeds(seed, ref.epoch, [ref.index])[0])
    try:
        video = open_video(value, frame_rate)
        try:
            clips = []
            for v, recipe in enumerate(views):
                generator = clip_generator(sample_seed, v)
                (start,) = sample_clip_starts(video.duration, clip_duration, 1, generator)
                diff = bool(torch.rand(1, generator=generator).item() < temporal_difference_p)
                frames = read_clip(video, start, clip_duration, num_frames, diff, min_frames)
                crop_stream = view_generator(sample_seed, v)
                if short_side_range is None:
                    box = sample_crop_box(frames.shape[1], frames.shape[2], recipe.crop_scale, recipe.crop_ratio, crop_stream)
                    clips.append(resized_crop_clip(frames, box, recipe.crop_size))
                else:
                    short = int(torch.randint(short_side_range[0], short_side_range[1] + 1, (1,), generator=crop_stream))
                    frames = short_side_resize(frames, max(short, recipe.crop_size))
                    top = int(torch.randint(0, frames.shape[1] - recipe.crop_size + 1, (1,), generator=crop_stream))
                    left = int(torch.randint(0, frames.shape[2] - recipe.crop_size + 1, (1,), generator=crop_stream))
                    clips.append(_to_tensor(frames[:, top : top + recipe.crop_size, left : left + recipe.crop_size]))
        finally:
            video.close()
    except BadVideoError as error:
        return {"bad": str(error), "index": ref.index}
    return {"seed": sample_seed, "index": ref.index, "views": clips}


def sequential_batches(num_samples: int, batch_size: int, epoch: int = 0) -> list[list[SampleRef]]:
    """Every sample once, in order, in batches of at most `batch_size` (a `batch_sampler` for feature extraction)."""
    return [[SampleRef(epoch, i) for i in range(s, min(s + batch_size, num_samples))] for s in range(0, num_samples, batch_size)]


def clip_loader(dataset, video_column: str, recipe: ViewRecipe, batch_sampler, *, num_frames: int, clip_duration: float,
                short_side_range: tuple[int, int], seed: int, frame_rate: float = DEFAULT_FRAME_RATE,
                num_workers: int = 0, generator: torch.Generator | None = None):
    """Random training clips for linear evaluation and fine-tuning (SCE_SPEC §5.3): per video one random clip,
    a random short-side scale in `short_side_range`, a random `recipe.crop_size` square; batches as
    `sce_hf.data.collate_views` makes them (`views`: a list of one `(B, T, 3, s, s)` uint8 tensor, `indices`,
    `sample_seeds`, `num_bad`), to finish with `SCEAugmentation([recipe])` on the device (flip, colour)."""
    from .data import collate_views

    clips = ClipViewsDataset(dataset, video_column, [recipe], seed, num_frames, clip_duration, 0.0, frame_rate,
                             short_side_range=short_side_range)
    return torch.utils.data.DataLoader(clips, batch_sampler=batch_sampler, collate_fn=collate_views,
                                       num_workers=num_workers, generator=generator)


class ClipViewsDataset(torch.utils.data.Dataset):
    """Map-style: `SampleRef` → one cropped uint8 clip `(T, 3, s, s)` per view of one video (`load_clip_sample`),
    or a bad-video marker; batches with `sce_hf.data.collate_views` into a list of V `(B, T, 3, s, s)` tensors."""

    def __init__(self, dataset, video_column: str, views: Sequence[ViewRecipe], seed: int, num_frames: int,
                 clip_duration: float, temporal_difference_p: float = 0.0, frame_rate: float = DEFAULT_FRAME_RATE,
                 min_frames: int = 1, short_side_range: tuple[int, int] | None = None):
        self.dataset = without_video_decoding(dataset, video_column)
        self.video_column = video_column
        self.kwargs = dict(views=list(views), num_frames=num_frames, clip_duration=clip_duration,
                           temporal_difference_p=temporal_difference_p, frame_rate=frame_rate, min_frames=min_frames,
                           short_side_range=short_side_range)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, ref: SampleRef) -> dict:
        return load_clip_sample(self.dataset[ref.index][self.video_column], ref, self.seed, **self.kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The test protocol: clips x crops per video, features averaged (SCE_SPEC §5.3)


def evaluation_views(
    value,
    num_frames: int,
    clip_duration: float,
    num_clips: int = 10,
    num_crops: int = 3,
    short_side: int = 256,
    crop_size: int | None = None,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    frame_rate: float = DEFAULT_FRAME_RATE,
) -> torch.Tensor:
    """The `num_clips x num_crops` test views of one video, clip-major, as float32 `(V, T, 3, s, s)`.

    Clips are evenly spaced (`evenly_spaced_clip_starts`); each is resized to `short_side` on its shorter side and
    cut into `num_crops` squares of `crop_size` (default: `short_side`, the authors' three 256 x 256 crops) at the
    start, centre and end of the longer side (one crop: the centre); then scaled to [0, 1] and normalised.
    """
    if num_crops not in (1, 3):
        raise ValueError(f"`num_crops` must be 1 (centre) or 3 (start, centre, end), got {num_crops}.")
    crop_size = crop_size or short_side
    video = open_video(value, frame_rate)
    try:
        views = []
        for start in evenly_spaced_clip_starts(video.duration, clip_duration, num_clips):
            frames = short_side_resize(read_clip(video, start, clip_duration, num_frames), short_side)
            for index in ([1] if num_crops == 1 else [0, 1, 2]):
                views.append(_to_tensor(uniform_crop(frames, crop_size, index)))
    finally:
        video.close()
    x = torch.stack(views).float().div_(255.0)  # (V, T, 3, s, s)
    return (x - torch.tensor(mean).view(1, 1, -1, 1, 1)) / torch.tensor(std).view(1, 1, -1, 1, 1)


class _TestViews(torch.utils.data.Dataset):
    def __init__(self, dataset, video_column: str, kwargs: dict):
        self.dataset, self.video_column, self.kwargs = without_video_decoding(dataset, video_column), video_column, kwargs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return evaluation_views(self.dataset[index][self.video_column], **self.kwargs)
        except BadVideoError as error:
            raise BadVideoError(f"video {index} of the evaluation set: {error}") from error


@torch.no_grad()
def extract_clip_features(
    model: torch.nn.Module,
    dataset,
    video_column: str = "video",
    num_frames: int = 8,
    clip_duration: float = 2.56,
    num_clips: int = 10,
    num_crops: int = 3,
    short_side: int = 256,
    crop_size: int | None = None,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    frame_rate: float = DEFAULT_FRAME_RATE,
    batch_size: int = 32,
    num_workers: int = 0,
    average: bool = True,
    progress: bool = True,
    description: str = "clip features",
) -> torch.Tensor:
    """`pooler_output` of a video encoder on the `num_clips x num_crops` test views of every video (`evaluation_views`).

    Returns:
        float32 on CPU: `(N, feature_dim)`, the mean over each video's views (`average=True`, the retrieval
        protocol), or `(N, V, feature_dim)` per view (for averaging predictions instead).

    Raises:
        BadVideoError: a video of the set cannot be read (evaluation sets must be complete).
    """
    kwargs = dict(num_frames=num_frames, clip_duration=clip_duration, num_clips=num_clips, num_crops=num_crops,
                  short_side=short_side, crop_size=crop_size, mean=mean, std=std, frame_rate=frame_rate)
    loader = torch.utils.data.DataLoader(_TestViews(dataset, video_column, kwargs), batch_size=None, num_workers=num_workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_video: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            views = torch.cat(pending)
            sizes = [p.shape[0] for p in pending]
            pending.clear()
            pooled = pooled_features(model(pixel_values=views.to(device)), model).cpu()
            per_video.extend(pooled.split(sizes))

    try:
        for views in tqdm(loader, desc=description, disable=not progress, leave=False):
            pending.append(views)
            if sum(p.shape[0] for p in pending) >= batch_size:
                flush()
        flush()
    finally:
        model.train(was_training)
    features = torch.stack(per_video)  # (N, V, d)
    return features.mean(dim=1) if average else features


__all__ = [
    "BadVideoError",
    "ClipViewsDataset",
    "DEFAULT_FRAME_RATE",
    "SCEVideoProcessor",
    "VIDEO_COLUMN_FALLBACKS",
    "clip_frame_indices",
    "clip_generator",
    "clip_loader",
    "evenly_spaced_clip_starts",
    "extract_clip_features",
    "load_clip_sample",
    "load_video_dataset",
    "open_video",
    "read_clip",
    "resized_crop_clip",
    "sample_clip_starts",
    "sequential_batches",
    "short_side_resize",
    "temporal_difference",
    "evaluation_views",
    "uniform_crop",
    "without_video_decoding",
    "write_video",
    "yuv420p_to_rgb",
]
