"""Image processor for SCE encoders, on transformers' PIL backend (no torchvision).

It reproduces the authors' evaluation transform (SCE_SPEC §6): resize the shorter side with bilinear
interpolation, centre-crop, scale to [0, 1] and normalise. Grayscale, palette and RGBA images become RGB.

This file travels with exported checkpoints as remote code: it imports only transformers.
"""

from __future__ import annotations

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2023, 0.1994, 0.2010]
FASHION_MNIST_MEAN = [0.2860, 0.2860, 0.2860]
FASHION_MNIST_STD = [0.3530, 0.3530, 0.3530]

# name -> (shorter side after resize, crop size, mean, std)
_PRESETS = {
    "imagenet": (256, 224, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)),
    "cifar10": (32, 32, CIFAR10_MEAN, CIFAR10_STD),
    "fashion-mnist": (28, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}
PROCESSOR_PRESETS = tuple(_PRESETS)


class SCEImageProcessor(PilBackend):
    r"""
    Prepares images for an SCE encoder: RGB conversion, bilinear resize of the shorter side to
    `size["shortest_edge"]`, centre crop to `crop_size`, rescale by 1/255, normalise with `image_mean`/`image_std`.

    The defaults are the ImageNet evaluation transform (256 → 224, ImageNet statistics); see
    [`SCEImageProcessor.from_preset`] for CIFAR-10 and Fashion-MNIST.

    Example:

    ```python
    >>> from PIL import Image
    >>> from sce_hf import SCEImageProcessor
    >>> processor = SCEImageProcessor.from_preset("fashion-mnist")
    >>> processor(Image.new("L", (28, 28)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 28, 28])
    ```
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    size = {"shortest_edge": 256}
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SCEImageProcessor":
        """The processor of a data preset: `"imagenet"` (256 → 224), `"cifar10"` (32) or `"fashion-mnist"` (28)."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown processor preset {name!r}; choose one of {PROCESSOR_PRESETS}.")
        shortest_edge, crop, mean, std = _PRESETS[name]
        values = dict(
            size={"shortest_edge": shortest_edge},
            crop_size={"height": crop, "width": crop},
            image_mean=mean,
            image_std=std,
        )
        values.update(kwargs)
        return cls(**values)


__all__ = ["SCEImageProcessor"]
