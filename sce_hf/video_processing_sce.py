"""Video processor for SCE video encoders: the image processor's evaluation transform applied to every frame of a clip.

This file travels with exported video checkpoints as remote code (`AutoImageProcessor.from_pretrained(...,
trust_remote_code=True)`): it imports only transformers, torch, numpy, PIL and `image_processing_sce.py`. Decoding
and clip sampling (PyAV) stay in the `sce_hf` package (`sce_hf.video`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_sce import SCEImageProcessor


KINETICS_MEAN = [0.45, 0.45, 0.45]  # SCE_SPEC §5.3
KINETICS_STD = [0.225, 0.225, 0.225]


def as_clips(videos) -> list[list]:
    """One clip or a batch of clips → a list of clips, each a list of frames."""
    if isinstance(videos, torch.Tensor):
        videos = videos.numpy()
    if isinstance(videos, np.ndarray):
        if videos.ndim == 4:
            return [list(videos)]
        if videos.ndim == 5:
            return [list(clip) for clip in videos]
        raise ValueError(f"Video arrays must be (T, H, W, C) or (B, T, H, W, C), got shape {videos.shape}.")
    if isinstance(videos, Image.Image):
        return [[videos]]
    if isinstance(videos, (list, tuple)) and videos:
        first = videos[0]
        if isinstance(first, (list, tuple)) or (isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 4):
            return [list(clip.numpy() if isinstance(clip, torch.Tensor) else clip) for clip in videos]
        return [list(videos)]
    raise ValueError(f"`videos` must be a clip (a list of frames, or a (T, H, W, C) array) or a list of clips, got {type(videos).__name__}.")


class SCEVideoProcessor(SCEImageProcessor):
    r"""
    Prepares clips for an SCE video encoder: every frame goes through the image pipeline of [`SCEImageProcessor`]
    (RGB, bilinear resize of the shorter side, centre crop, rescale, normalise) and the frames of a clip are stacked:
    `pixel_values` of shape `(batch, frames, 3, height, width)`. PIL/numpy only (transformers' video processors need
    torchvision). It does not decode or sample frames: give it the frames of a clip (`sce_hf.video.read_clip`); `num_frames`,
    `clip_duration`, `num_clips` and `num_crops` record the model's clip settings and test protocol.

    The defaults are the Kinetics evaluation of SCE_SPEC §5.3 (shorter side 256, centre 224, mean 0.45, std 0.225).

    Example:

    ```python
    >>> import numpy as np
    >>> processor = SCEVideoProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    >>> clip = np.zeros((4, 48, 64, 3), dtype=np.uint8)
    >>> processor(clip, return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 4, 3, 32, 32])
    ```
    """

    image_mean = KINETICS_MEAN
    image_std = KINETICS_STD

    def __init__(self, num_frames: int = 8, clip_duration: float = 2.56, num_clips: int = 10, num_crops: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.num_frames = num_frames
        self.clip_duration = clip_duration
        self.num_clips = num_clips
        self.num_crops = num_crops

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        clips = as_clips(videos)
        lengths = sorted({len(clip) for clip in clips})
        if len(lengths) != 1 or lengths[0] < 1:
            raise ValueError(f"Every clip of a batch must have the same, non-zero number of frames, got {lengths}.")
        frames = [frame.numpy() if isinstance(frame, torch.Tensor) else frame for clip in clips for frame in clip]
        pixel_values = np.asarray(super().__call__(frames, return_tensors="np", **kwargs)["pixel_values"])
        pixel_values = pixel_values.reshape(len(clips), lengths[0], *pixel_values.shape[1:])  # (B, T, C, H, W)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)


__all__ = ["SCEVideoProcessor", "as_clips"]
