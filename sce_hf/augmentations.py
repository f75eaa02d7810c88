"""Batched SCE view augmentations that run on the training device (SCE_SPEC §3).

The CPU data-loader only crops (variable-size images) and hands over uint8 tensors. Everything else (colour
jitter, grayscale, Gaussian blur, solarize, horizontal flip, normalisation) runs here, batched, on whichever
device the images live on. Cropping can run here too when all images share one size (Fashion-MNIST, CIFAR).

Randomness is per sample, not per batch: the parameters of sample i in view v come from a CPU `torch.Generator`
seeded with `mix_seed(sample_seeds[i], v)`. A sample's views therefore do not depend on which other samples share
its batch, nor on how a global batch is split across processes. `make_sample_seeds` derives those seeds from
(run seed, epoch or step, dataset index); `view_generator` + `sample_crop_box` let CPU workers draw exactly the box
the device would have drawn, and the colour parameters come after the crop draws in the same stream.

Semantics follow torchvision's `RandomResizedCrop`, `ColorJitter`, `RandomGrayscale`, `GaussianBlur`,
`RandomSolarize` and `RandomHorizontalFlip`, built on kornia's functional ops. Known differences:
- the resized crop is bilinear without antialiasing (fine for the small up/down-scaling factors of SCE recipes,
  aliased for large downscaling; crop large images on the CPU);
- for clips, contrast uses the per-frame mean grey level (as torchvision does for a (T, C, H, W) tensor).

Example:
    >>> views = get_recipe("fashion-mnist")
    >>> augment = SCEAugmentation(views)
    >>> images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    >>> seeds = make_sample_seeds(0, epoch=0, indices=torch.arange(4))
    >>> [tuple(v.shape) for v in augment(images, seeds)]
    [(4, 3, 28, 28), (4, 3, 28, 28)]
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "RECIPE_NAMES",
    "SCEAugmentation",
    "ViewParams",
    "ViewRecipe",
    "draw_view_params",
    "get_recipe",
    "make_sample_seeds",
    "mix_seed",
    "resized_crop",
    "sample_crop_box",
    "view_generator",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3
KINETICS_MEAN = (0.45,) * 3
KINETICS_STD = (0.225,) * 3

_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback
_CROP_DRAWS = 4 * _CROP_ATTEMPTS  # per attempt: area fraction, log aspect ratio, top, left
# Columns of the per-sample uniform draws that follow the crop draws (see `draw_view_params`).
_U_JITTER, _U_FACTORS, _U_ORDER, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE, _U_FLIP = 0, 1, 5, 9, 10, 11, 12, 13
_PARAM_DRAWS = 14
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------- recipes
def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"ViewRecipe.{name} must be a number in [0, 1], got {value!r}.")


def _check_pair(name: str, value: tuple[float, float], low: float, high: float, low_open: bool = True) -> None:
    """Check `low (<) value[0] <= value[1] <= high`."""
    ok = len(value) == 2 and (value[0] > low if low_open else value[0] >= low) and value[0] <= value[1] <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"ViewRecipe.{name} must be a pair (min, max) with min <= max inside {bracket}{low}, {high}], "
            f"got {value!r}."
        )


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation settings of one view (torchvision semantics).

    Args:
        crop_size (`int`): side of the square output view, in pixels.
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.2, 1.0)`): range of the crop area as a
            fraction of the image area (RandomResizedCrop `scale`).
        crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`): range of the crop aspect ratio w/h.
        jitter (`tuple[float, float, float, float]`, *optional*, defaults to `(0.4, 0.4, 0.2, 0.1)`): ColorJitter
            brightness, contrast, saturation and hue strengths; factors are drawn from [max(0, 1-x), 1+x] and the
            hue shift from [-x, x] (in turns, x <= 0.5).
        jitter_p (`float`, *optional*, defaults to 0.8): probability of applying the colour jitter.
        grayscale_p (`float`, *optional*, defaults to 0.2): probability of converting to grey (kept 3 channels).
        blur_p (`float`, *optional*, defaults to 0.5): probability of a Gaussian blur.
        blur_sigma (`tuple[float, float]`, *optional*, defaults to `(0.1, 2.0)`): range of the blur sigma, pixels.
        blur_kernel_size (`int`, *optional*, defaults to 23): odd kernel side, < 2 * crop_size when blur_p > 0.
        solarize_p (`float`, *optional*, defaults to 0.0): probability of solarizing.
        solarize_threshold (`float`, *optional*, defaults to 0.5): pixels >= threshold (on [0, 1]) are inverted.
        flip_p (`float`, *optional*, defaults to 0.5): probability of a horizontal flip.
        mean (`tuple[float, ...]`, *optional*, defaults to the ImageNet mean): per-channel mean (1 or 3 values).
        std (`tuple[float, ...]`, *optional*, defaults to the ImageNet std): per-channel std, same length as `mean`.

    Raises:
        ValueError: when a field is out of range; the message names the field, the expectation and the value.
    """

    crop_size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 23
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    flip_p: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "jitter", "blur_sigma", "mean", "std"):
            value = getattr(self, name)
            try:
                if isinstance(value, str):
                    raise TypeError
                object.__setattr__(self, name, tuple(float(v) for v in value))  # lists from YAML/JSON -> tuples
            except (TypeError, ValueError):
                raise ValueError(f"ViewRecipe.{name} must be a sequence of numbers, got {value!r}.") from None
        for name in ("crop_size", "blur_kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViewRecipe.{name} must be a positive integer, got {value!r}.")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"ViewRecipe.blur_kernel_size must be odd, got {self.blur_kernel_size}.")
        if self.blur_p > 0 and self.blur_kernel_size // 2 >= self.crop_size:
            raise ValueError(
                f"ViewRecipe.blur_kernel_size must be < 2 * crop_size = {2 * self.crop_size} (reflect padding), "
                f"got {self.blur_kernel_size}."
            )
        _check_pair("crop_scale", self.crop_scale, 0.0, 1.0)
        _check_pair("crop_ratio", self.crop_ratio, 0.0, math.inf)
        _check_pair("blur_sigma", self.blur_sigma, 0.0, math.inf)
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(
                "ViewRecipe.jitter must be 4 non-negative strengths (brightness, contrast, saturation, hue) with "
                f"hue <= 0.5, got {self.jitter!r}."
            )
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p", "solarize_threshold"):
            _check_unit(name, getattr(self, name))
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(
                f"ViewRecipe.mean and ViewRecipe.std must both have 1 or 3 values, got {len(self.mean)} and "
                f"{len(self.std)}: mean={self.mean!r}, std={self.std!r}."
            )
        if min(self.std) <= 0:
            raise ValueError(f"ViewRecipe.std must be positive, got {self.std!r}.")


def _imagenet_views(size: int = 224) -> list[ViewRecipe]:
    # SCE_SPEC §3.2: both views strong; blur p 1.0 / 0.1, solarize only on view 1, both flipped (eztorch).
    view0 = ViewRecipe(size, blur_p=1.0, solarize_p=0.0)
    return [view0, dataclasses.replace(view0, blur_p=0.1, solarize_p=0.2)]


def _imagenet_multicrop_views() -> list[ViewRecipe]:
    # SCE_SPEC §2.6 scales (the authors' literals, (0.2, 1.0) * size / 224 rounded) and §3.3 colours.
    local_scales = {192: (0.172, 0.86), 160: (0.143, 0.715), 128: (0.114, 0.571), 96: (0.086, 0.429)}
    local = [ViewRecipe(s, crop_scale=sc, blur_p=0.5, solarize_p=0.2) for s, sc in local_scales.items()]
    return _imagenet_views() + local


def _cifar10_views() -> list[ViewRecipe]:
    # SCE_SPEC §3.4 (weak teacher view 0, strong student view 1). Blur kernel 3 (~10% of 32 px, odd) replaces
    # the authors' untruncated PIL blur, so sigmas above ~1 act like a 3x3 box blur.
    common = dict(crop_size=32, blur_kernel_size=3, mean=CIFAR10_MEAN, std=CIFAR10_STD, flip_p=0.5)
    weak = ViewRecipe(**common, jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    strong = ViewRecipe(**common, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    return [weak, strong]


def _fashion_mnist_views() -> list[ViewRecipe]:
    # [R] our recipe, not the authors': 28 px grey images stored as 3 equal channels, so saturation, hue and
    # grayscale are no-ops and are switched off; crops keep >= 30% of the small centred objects.
    view0 = ViewRecipe(
        28, crop_scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.8, grayscale_p=0.0, blur_p=0.5,
        blur_kernel_size=3, solarize_p=0.0, flip_p=0.5, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
    )  # fmt: skip
    return [view0, dataclasses.replace(view0, blur_p=0.1, solarize_p=0.2)]


def _kinetics_views() -> list[ViewRecipe]:
    # SCE_SPEC §3.5 device side, one draw per clip. crop_scale records the CPU crop (0.2, 0.766) for the workers.
    clip0 = ViewRecipe(
        224, crop_scale=(0.2, 0.766), jitter=(0.8, 0.8, 0.4, 0.2), blur_p=1.0, solarize_p=0.0,
        mean=KINETICS_MEAN, std=KINETICS_STD,
    )  # fmt: skip
    return [clip0, dataclasses.replace(clip0, blur_p=0.1, solarize_p=0.2)]


_RECIPES: dict[str, Callable[[], list[ViewRecipe]]] = {
    "imagenet": _imagenet_views,
    "imagenet-multicrop": _imagenet_multicrop_views,
    "cifar10": _cifar10_views,
    "fashion-mnist": _fashion_mnist_views,
    "kinetics": _kinetics_views,
}
RECIPE_NAMES: tuple[str, ...] = tuple(_RECIPES)


def get_recipe(name: str, **overrides) -> list[ViewRecipe]:
    """Return the views of a named recipe, with `overrides` applied to every view.

    Recipes: "imagenet" (SCE_SPEC §3.2, 2 x 224), "imagenet-multicrop" (§2.6/§3.3, 2 x 224 + 192/160/128/96),
    "cifar10" (§3.4, weak teacher view 0 and strong student view 1), "fashion-mnist" ([R] ours, 2 x 28) and
    "kinetics" (§3.5 device side, 2 clips at 224). View position matters (SCE_SPEC §8.13).

    Args:
        name (`str`): one of `RECIPE_NAMES`.
        **overrides: `ViewRecipe` fields set on every view, e.g. `crop_size=32, crop_scale=(0.4, 1.0)`.

    Returns:
        `list[ViewRecipe]`: one recipe per view, view 0 first.

    Raises:
        ValueError: for an unknown recipe name, an unknown field, or an override value out of range.
    """
    if name not in _RECIPES:
        raise ValueError(f"Unknown augmentation recipe `name`={name!r}; expected one of {list(RECIPE_NAMES)}.")
    fields = [f.name for f in dataclasses.fields(ViewRecipe)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"Unknown ViewRecipe field(s) {unknown} in overrides; valid fields are {fields}.")
    return [dataclasses.replace(view, **overrides) for view in _RECIPES[name]()]


# ---------------------------------------------------------------------------------------------------- seeding
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers (any sign, any size) into one seed in [0, 2**63) (splitmix64 chain; order matters)."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    return state >> 1


def make_sample_seeds(base_seed: int, epoch: int, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Per-sample augmentation seeds from the run seed, the epoch (or step) and each sample's dataset index.

    Using the dataset index (not the position in the batch) makes a sample's views independent of batch
    composition and of the number of processes. Pass the epoch for "each sample once per epoch" sampling; pass
    the global step instead when an index can occur twice in one epoch.

    Args:
        base_seed (`int`): the run seed.
        epoch (`int`): epoch (or global step).
        indices (`torch.Tensor` of shape `(batch_size,)` or a sequence of ints): dataset indices.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, int64 on CPU, values in [0, 2**63).
    """
    flat = indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return torch.tensor([mix_seed(base_seed, epoch, index) for index in flat], dtype=torch.int64)


def view_generator(sample_seed: int, view: int) -> torch.Generator:
    """The CPU generator that draws the parameters of one sample in one view (crop first, then the rest)."""
    generator = torch.Generator()
    generator.manual_seed(mix_seed(sample_seed, view))
    return generator


# ------------------------------------------------------------------------------------------------- crop boxes
def _box_from_uniforms(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], u: list[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box from `4 * _CROP_ATTEMPTS` uniforms in [0, 1)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_CROP_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = u[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u_ratio * (log_hi - log_lo))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback: the largest centred box whose aspect ratio is clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, min(height, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        h, w = height, min(width, int(round(height * ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box (torchvision's algorithm): 10 tries, then a ratio-clamped centre crop.

    Always consumes exactly 40 uniforms of `generator`, so draws that follow are the same whether or not an
    attempt succeeded. `view_generator(seed, v)` gives the generator the device would use for that sample.

    Args:
        height (`int`), width (`int`): image size in pixels.
        scale (`tuple[float, float]`): area fraction range, 0 < min <= max <= 1.
        ratio (`tuple[float, float]`): aspect ratio (w/h) range, 0 < min <= max.
        generator (`torch.Generator`): a CPU generator.

    Returns:
        `(top, left, h, w)` with `0 <= top`, `top + h <= height`, `0 <= left`, `left + w <= width`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"`height` and `width` must be positive, got {height} x {width}.")
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"`scale` must be (min, max) with 0 < min <= max <= 1, got {scale!r}.")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"`ratio` must be (min, max) with 0 < min <= max, got {ratio!r}.")
    u = torch.rand(_CROP_DRAWS, generator=generator).tolist()
    return _box_from_uniforms(height, width, scale, ratio, u)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop one box per image and resize it to `size` x `size` (bilinear, no antialiasing), in one batched op.

    Pixel centres follow `F.interpolate(crop, size, mode="bilinear", align_corners=False)`; beyond the box edge
    it reads the neighbouring image pixels (clamped at the image border) instead of repeating the box edge.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): floating point images.
        boxes (`torch.Tensor` of shape `(N, 4)`): `(top, left, h, w)` per image, in pixels.
        size (`int`): output side.

    Returns:
        `torch.Tensor` of shape `(N, C, size, size)`, the dtype of `images`.
    """
    n, c, height, width = images.shape
    top, left, h, w = boxes.to("cpu", torch.float64).unbind(1)  # theta is built on the CPU, in float64
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------------ random parameters
@dataclass
class ViewParams:
    """The random draws of one view for a batch; CPU tensors, one row per sample (or per clip).

    Attributes:
        boxes: `(B, 4)` int64 `(top, left, h, w)`, or None when the view is not cropped on the device.
        jitter: `(B,)` bool, apply the colour jitter.
        factors: `(B, 4)` float32 brightness, contrast, saturation factors and hue shift (turns).
        order: `(B, 4)` int64; `order[i, r]` is the jitter op (0..3 as in `factors`) sample i applies in round r.
        grayscale, blur, solarize, flip: `(B,)` bool.
        sigma: `(B,)` float32 blur sigma.
    """

    boxes: torch.Tensor | None
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    flip: torch.Tensor

    def repeat_interleave(self, repeats: int) -> ViewParams:
        """Repeat every row `repeats` times: one clip's draw shared by its frames."""
        return ViewParams(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).repeat_interleave(repeats, 0)
                for f in dataclasses.fields(self)
            }
        )


def draw_view_params(
    sample_seeds: Sequence[int], view: int, recipe: ViewRecipe, height: int, width: int, crop: bool = True
) -> ViewParams:
    """Draw one view's parameters for each sample from `view_generator(seed, view)`.

    Per sample the stream holds 40 crop uniforms (consumed even when `crop` is False) and then 14 uniforms for
    jitter (apply, 4 factors, 4 order keys), grayscale, blur (apply, sigma), solarize and flip.

    Args:
        sample_seeds (sequence of `int`, length B): per-sample seeds.
        view (`int`): view index.
        recipe (`ViewRecipe`): the view's settings.
        height (`int`), width (`int`): size of the images to crop.
        crop (`bool`, *optional*, defaults to True): fill `boxes`.

    Returns:
        `ViewParams` with B rows.
    """
    generator = torch.Generator()
    boxes, rows = [], []
    for seed in sample_seeds:
        generator.manual_seed(mix_seed(seed, view))
        u = torch.rand(_CROP_DRAWS + _PARAM_DRAWS, generator=generator)
        if crop:
            crop_u = u[:_CROP_DRAWS].tolist()
            boxes.append(_box_from_uniforms(height, width, recipe.crop_scale, recipe.crop_ratio, crop_u))
        rows.append(u[_CROP_DRAWS:])
    u = torch.stack(rows) if rows else torch.empty(0, _PARAM_DRAWS)  # (B, 14)
    b, c, s, h = recipe.jitter
    low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = torch.tensor([1 + b, 1 + c, 1 + s, h])
    sigma_lo, sigma_hi = recipe.blur_sigma
    return ViewParams(
        boxes=torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4) if crop else None,
        jitter=u[:, _U_JITTER] < recipe.jitter_p,
        factors=low + u[:, _U_FACTORS : _U_FACTORS + 4] * (high - low),
        order=u[:, _U_ORDER : _U_ORDER + 4].argsort(dim=1),  # a uniform random permutation per sample
        grayscale=u[:, _U_GRAY] < recipe.grayscale_p,
        blur=u[:, _U_BLUR] < recipe.blur_p,
        sigma=sigma_lo + u[:, _U_SIGMA] * (sigma_hi - sigma_lo),
        solarize=u[:, _U_SOLARIZE] < recipe.solarize_p,
        flip=u[:, _U_FLIP] < recipe.flip_p,
    )


# ------------------------------------------------------------------------------------------------- image ops
# All ops take x (N, 3, H, W) float in [0, 1] on the device, and per-sample CPU parameters of length N.
def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision brightness scales the pixels (kornia's adjust_brightness adds an offset instead).
    return (x * factor.to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor.to(x.device, x.dtype))


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor.to(x.device, x.dtype))


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.adjust_hue(x, (shift * (2 * math.pi)).to(x.device, x.dtype))  # turns -> radians


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return kornia.color.rgb_to_grayscale(x).repeat(1, 3, 1, 1)  # a copy: later ops write in place


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # sigma (N,) stays on the CPU: kornia checks sigma > 0 on its host copy, so the device is not synchronised.
    sigma = sigma.unsqueeze(1).expand(-1, 2).contiguous()  # (N, 2): same sigma along y and x
    return kornia.filters.gaussian_blur2d(x, (kernel_size, kernel_size), sigma, border_type="reflect")


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def _apply_where(x: torch.Tensor, mask: torch.Tensor, op: Callable, *args: torch.Tensor, **kwargs) -> torch.Tensor:
    """`x[mask] = op(x[mask], *(a[mask] for a in args), **kwargs)`, batched, without reading the device."""
    index = mask.nonzero().squeeze(1)  # mask is on the CPU
    if index.numel() == 0:
        return x
    if index.numel() == mask.numel():
        return op(x, *args, **kwargs)
    device_index = index.to(x.device)
    subset = op(x.index_select(0, device_index), *(a[index] for a in args), **kwargs)
    return x.index_copy_(0, device_index, subset.to(x.dtype))


def _color_jitter(x: torch.Tensor, params: ViewParams, strengths: tuple[float, ...]) -> torch.Tensor:
    """ColorJitter with a random op order per sample: in round r each jittered sample applies op `order[:, r]`.

    Every sample applies each op once, so the cost is one pass of each op over the jittered samples plus a
    gather and a scatter per (round, op); on the CPU (256 x 3 x 64 x 64) it measured no slower than a fixed order.
    """
    for step in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            if strengths[op_index] == 0:  # factor range is the identity: torchvision skips the op too
                continue
            mask = params.jitter & (params.order[:, step] == op_index)
            x = _apply_where(x, mask, op, params.factors[:, op_index])
    return x


def _augment_frames(x: torch.Tensor, params: ViewParams, recipe: ViewRecipe) -> torch.Tensor:
    """One view for N images or frames.

    Args:
        x (`torch.Tensor` of shape `(N, C, H, W)`): uint8, C in {1, 3}.
        params (`ViewParams`): N rows (frames of a clip share one draw).
        recipe (`ViewRecipe`): the view's settings.

    Returns:
        `torch.Tensor` of shape `(N, 3, s, s)`, float32, normalised.
    """
    if x.shape[0] == 0:
        return torch.zeros(0, 3, recipe.crop_size, recipe.crop_size, device=x.device)
    x = x.float().div_(255.0)
    if params.boxes is not None:
        x = resized_crop(x, params.boxes, recipe.crop_size)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = _color_jitter(x, params, recipe.jitter)
    x = _apply_where(x, params.grayscale, _grayscale)
    x = _apply_where(x, params.blur, _blur, params.sigma, kernel_size=recipe.blur_kernel_size)
    x = _apply_where(x, params.solarize, _solarize, threshold=recipe.solarize_threshold)
    x = _apply_where(x, params.flip, torch.flip, dims=(-1,))
    mean = torch.tensor(recipe.mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    std = torch.tensor(recipe.std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------------ module
def _check_images(images: torch.Tensor, name: str, recipe: ViewRecipe, crop: bool) -> torch.Tensor:
    """Validate one view's uint8 input; return it as clips `(B, T, C, H, W)` (T = 1 for images)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"`{name}` must be uint8 (0-255), got {images.dtype}.")
    if images.ndim not in (4, 5):
        raise ValueError(
            f"`{name}` must be (B, C, H, W) images or (B, T, C, H, W) clips, got shape {tuple(images.shape)}."
        )
    clips = images if images.ndim == 5 else images.unsqueeze(1)
    if clips.shape[2] not in (1, 3):
        raise ValueError(f"`{name}` must have 1 or 3 channels, got {clips.shape[2]} (shape {tuple(images.shape)}).")
    size = recipe.crop_size
    if not crop and tuple(clips.shape[-2:]) != (size, size):
        raise ValueError(
            f"`{name}` is not cropped here, so it must be {size} x {size} (the view's crop_size), "
            f"got {clips.shape[-2]} x {clips.shape[-1]}."
        )
    return clips


def _check_seeds(sample_seeds: torch.Tensor, batch: int) -> None:
    is_tensor = isinstance(sample_seeds, torch.Tensor)
    if not is_tensor or sample_seeds.dtype not in (torch.int64, torch.int32) or tuple(sample_seeds.shape) != (batch,):
        received = f"{tuple(sample_seeds.shape)} (dtype {sample_seeds.dtype})" if is_tensor else type(sample_seeds)
        raise ValueError(f"`sample_seeds` must be an int64 tensor of shape (B,) = ({batch},), got {received}.")


class SCEAugmentation(torch.nn.Module):
    """Multi-view SCE augmentations, batched on the images' device, seeded per sample (or per clip).

    Args:
        views (`list[ViewRecipe]`): one recipe per view, e.g. `get_recipe("imagenet")`.

    Example:
        >>> augment = SCEAugmentation(get_recipe("cifar10"))
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> teacher_view, student_view = augment(images, make_sample_seeds(0, 0, torch.arange(8)))
        >>> tuple(student_view.shape)
        (8, 3, 32, 32)
    """

    def __init__(self, views: Sequence[ViewRecipe]) -> None:
        super().__init__()
        views = list(views)
        if not views or not all(isinstance(v, ViewRecipe) for v in views):
            raise ValueError(f"`views` must be a non-empty list of ViewRecipe, got {views!r}.")
        self.views = views
        self._warned_aliasing = False

    def extra_repr(self) -> str:
        return f"num_views={len(self.views)}, crop_sizes={[v.crop_size for v in self.views]}"

    def _inputs(self, images, sample_seeds: torch.Tensor, crop: bool) -> list[tuple[torch.Tensor, bool]]:
        """Validate; return `(clips (B, T, C, H, W) uint8, crop on the device)` per view."""
        n = len(self.views)
        if isinstance(images, torch.Tensor):
            named = [(images, "images", crop)] * n
        elif isinstance(images, Sequence) and all(isinstance(t, torch.Tensor) for t in images):
            if len(images) != n:
                raise ValueError(f"`images` must hold one tensor per view ({n}), got {len(images)}.")
            if len({t.ndim for t in images}) != 1:
                raise ValueError(f"`images` must be all images or all clips, got ranks {[t.ndim for t in images]}.")
            named = [(t, f"images[{v}]", False) for v, t in enumerate(images)]
        else:
            raise ValueError(f"`images` must be a uint8 tensor or a list of them, got {type(images).__name__}.")
        inputs = [(_check_images(t, name, r, c), c) for (t, name, c), r in zip(named, self.views)]
        batches = [clips.shape[0] for clips, _ in inputs]
        if len(set(batches)) != 1:
            raise ValueError(f"All `images` tensors must share one batch size, got {batches}.")
        _check_seeds(sample_seeds, batches[0])
        return inputs

    def _warn_if_aliasing(self, clips: torch.Tensor, recipe: ViewRecipe) -> None:
        factor = max(clips.shape[-2:]) / recipe.crop_size
        if factor > 2 and not self._warned_aliasing:
            self._warned_aliasing = True
            logger.warning(
                "Cropping %s images to %d px on the device downsamples up to %.1fx without antialiasing; crop "
                "large images in the data-loader workers instead (sample_crop_box + view_generator).",
                tuple(clips.shape[-2:]), recipe.crop_size, factor,
            )  # fmt: skip

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], sample_seeds: torch.Tensor, *, crop: bool = True
    ) -> list[torch.Tensor]:
        """Augment every view.

        Args:
            images: uint8, one of
                - `(B, C, H, W)` images (C = 1 is replicated to 3), shared by all views;
                - `(B, T, C, H, W)` clips: one draw per clip, shared by its T frames;
                - a list of V such tensors, view v already cropped to `s_v` x `s_v` by the CPU workers (the
                  crop is skipped; `crop` is ignored).
            sample_seeds (`torch.Tensor` of shape `(B,)`, int64): one seed per sample or clip (`make_sample_seeds`).
            crop (`bool`, *optional*, defaults to True): random-resized-crop a single `images` tensor here; with
                False it must already be `crop_size` x `crop_size` for every view.

        Returns:
            `list[torch.Tensor]`: V float32 tensors `(B, 3, s_v, s_v)`, or `(B, T, 3, s_v, s_v)` for clips.

        Raises:
            ValueError: for a non-uint8 input, a wrong rank, channel count, size or number of views, or seeds
                that are not an integer tensor of shape `(B,)`.
        """
        inputs = self._inputs(images, sample_seeds, crop)
        is_video = (images if isinstance(images, torch.Tensor) else images[0]).ndim == 5
        seeds = sample_seeds.tolist()
        outputs = []
        for view, ((clips, do_crop), recipe) in enumerate(zip(inputs, self.views)):
            b, t, c, h, w = clips.shape
            if do_crop:
                self._warn_if_aliasing(clips, recipe)
            params = draw_view_params(seeds, view, recipe, h, w, crop=do_crop)
            if t > 1:
                params = params.repeat_interleave(t)
            with torch.no_grad(), torch.autocast(device_type=clips.device.type, enabled=False):
                out = _augment_frames(clips.reshape(b * t, c, h, w), params, recipe)
            outputs.append(out.reshape(b, t, *out.shape[1:]) if is_video else out)
        return outputs
