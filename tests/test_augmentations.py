"""Tests for sce_hf.augmentations: recipes, crop boxes, per-sample seeding, clip sharing, op semantics."""

from __future__ import annotations

import dataclasses
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from sce_hf.augmentations import (
    RECIPE_NAMES,
    SCEAugmentation,
    ViewRecipe,
    draw_view_params,
    get_recipe,
    make_sample_seeds,
    mix_seed,
    resized_crop,
    sample_crop_box,
    view_generator,
)


# Every random op off, identity normalisation: tests switch on one op at a time.
PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0, mean=(0.0,), std=(1.0,))


def _images(batch: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=generator)


def _seeds(batch: int, epoch: int = 0) -> torch.Tensor:
    return make_sample_seeds(1234, epoch, torch.arange(batch))


# Small versions of every recipe: crop sizes and blur kernels shrunk where the real ones would be slow.
SMALL_RECIPES = {
    "imagenet": dict(crop_size=40, blur_kernel_size=5),
    "imagenet-multicrop": dict(blur_kernel_size=5),  # real crop sizes, to check them
    "cifar10": {},
    "fashion-mnist": {},
    "kinetics": dict(crop_size=40, blur_kernel_size=5),
}


# ------------------------------------------------------------------------------------------------- recipes
def test_recipe_names__all_buildable():
    assert set(RECIPE_NAMES) == set(SMALL_RECIPES)
    for name in RECIPE_NAMES:
        views = get_recipe(name)
        assert len(views) >= 2 and all(isinstance(v, ViewRecipe) for v in views)


def test_recipe__imagenet_facts():
    view0, view1 = get_recipe("imagenet")
    assert (view0.crop_size, view1.crop_size) == (224, 224)
    assert view0.blur_p == 1.0 and view0.solarize_p == 0.0
    assert view1.blur_p == 0.1 and view1.solarize_p == 0.2
    for view in (view0, view1):
        assert view.jitter == (0.4, 0.4, 0.2, 0.1) and view.jitter_p == 0.8 and view.grayscale_p == 0.2
        assert view.flip_p == 0.5 and view.blur_kernel_size == 23 and view.crop_scale == (0.2, 1.0)
        assert view.mean == (0.485, 0.456, 0.406) and view.std == (0.229, 0.224, 0.225)


def test_recipe__multicrop_sizes_and_scales():
    views = get_recipe("imagenet-multicrop")
    assert [v.crop_size for v in views] == [224, 224, 192, 160, 128, 96]
    assert views[:2] == get_recipe("imagenet")
    expected = [(0.172, 0.86), (0.143, 0.715), (0.114, 0.571), (0.086, 0.429)]
    assert [v.crop_scale for v in views[2:]] == expected
    for view, (low, high) in zip(views[2:], expected):  # (0.2, 1.0) * size / 224, rounded
        assert low == pytest.approx(0.2 * view.crop_size / 224, abs=1e-3)
        assert high == pytest.approx(view.crop_size / 224, abs=3e-3)
        assert (view.blur_p, view.solarize_p, view.jitter_p, view.grayscale_p) == (0.5, 0.2, 0.8, 0.2)


def test_recipe__cifar10_weak_teacher_strong_student():
    weak, strong = get_recipe("cifar10")
    assert weak.jitter_p == weak.grayscale_p == weak.blur_p == weak.solarize_p == 0.0
    assert weak.flip_p == 0.5 and weak.crop_size == 32 and weak.crop_scale == (0.2, 1.0)
    assert strong.jitter == (0.4, 0.4, 0.4, 0.1) and strong.jitter_p == 0.8
    assert (strong.grayscale_p, strong.blur_p, strong.solarize_p, strong.flip_p) == (0.2, 0.5, 0.0, 0.5)
    assert strong.blur_kernel_size == 3 and strong.mean == (0.4914, 0.4822, 0.4465)


def test_recipe__fashion_mnist():
    view0, view1 = get_recipe("fashion-mnist")
    assert view0.crop_size == 28 and view0.mean == (0.2860,) * 3 and view0.std == (0.3530,) * 3
    assert view0.jitter[2:] == (0.0, 0.0) and view0.grayscale_p == 0.0
    assert (view0.blur_p, view1.blur_p, view0.solarize_p, view1.solarize_p) == (0.5, 0.1, 0.0, 0.2)


def test_get_recipe__overrides_apply_to_every_view():
    views = get_recipe("fashion-mnist", crop_scale=[0.4, 1.0], crop_size=32)
    assert all(v.crop_size == 32 and v.crop_scale == (0.4, 1.0) for v in views)
    assert get_recipe("fashion-mnist")[0].crop_size == 28  # recipes are rebuilt, not mutated


def test_get_recipe__bad_name_and_field():
    with pytest.raises(ValueError, match="Unknown augmentation recipe.*imagenet-multicrop"):
        get_recipe("imagenet2")
    with pytest.raises(ValueError, match=r"Unknown ViewRecipe field.*crop_sise.*valid fields.*crop_size"):
        get_recipe("cifar10", crop_sise=30)
    with pytest.raises(ValueError, match="ViewRecipe.flip_p"):
        get_recipe("cifar10", flip_p=1.5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(crop_size=0), r"crop_size must be a positive integer, got 0"),
        (dict(crop_size=True), r"crop_size must be a positive integer"),
        (dict(blur_kernel_size=4), r"blur_kernel_size must be odd, got 4"),
        (dict(crop_size=8, blur_kernel_size=17), r"blur_kernel_size must be < 2 \* crop_size = 16.*got 17"),
        (dict(crop_scale=(0.5, 0.2)), r"crop_scale must be a pair.*got \(0.5, 0.2\)"),
        (dict(crop_scale=(0.0, 1.0)), r"crop_scale"),
        (dict(crop_scale=(0.2, 1.5)), r"crop_scale"),
        (dict(crop_ratio=(0.0, 1.0)), r"crop_ratio"),
        (dict(blur_sigma=(2.0, 0.1)), r"blur_sigma"),
        (dict(jitter=(0.4, 0.4, 0.2)), r"jitter must be 4 non-negative"),
        (dict(jitter=(0.4, 0.4, 0.2, 0.6)), r"hue <= 0.5"),
        (dict(jitter_p=-0.1), r"jitter_p must be a number in \[0, 1\], got -0.1"),
        (dict(solarize_threshold=2.0), r"solarize_threshold"),
        (dict(mean=(0.5, 0.5), std=(0.5, 0.5)), r"mean and ViewRecipe.std must both have 1 or 3 values"),
        (dict(mean=(0.5, 0.5, 0.5), std=(0.5,)), r"got 3 and 1"),
        (dict(std=(0.2, 0.0, 0.2)), r"std must be positive"),
        (dict(mean="abc"), r"mean must be a sequence of numbers"),
    ],
)
def test_view_recipe__validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ViewRecipe(32), **overrides)


# ----------------------------------------------------------------------------------------------- crop boxes
def test_sample_crop_box__inside_and_area_within_scale():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(480, 640), (640, 480), (500, 500)]:
        for _ in range(200):
            top, left, h, w = sample_crop_box(height, width, (0.2, 0.8), (3 / 4, 4 / 3), generator)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            # these images admit every target box, so the first attempt succeeds (rounding aside)
            assert 0.2 - 0.01 <= h * w / (height * width) <= 0.8 + 0.01
            assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_sample_crop_box__fallback_clamps_ratio_to_centre_crop():
    generator = torch.Generator().manual_seed(0)
    # a 100 x 10 strip cannot hold a near-square box of >= 90% of its area: all 10 attempts fail
    assert sample_crop_box(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (43, 0, 13, 10)
    assert sample_crop_box(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 43, 10, 13)
    assert sample_crop_box(10, 12, (1.0, 1.0), (2.0, 2.0), generator) == (2, 0, 6, 12)
    assert sample_crop_box(10, 12, (1.0, 1.0), (0.5, 0.6), generator) == (0, 3, 10, 6)
    assert sample_crop_box(10, 10, (1.0, 1.0), (1.0, 1.0), generator) == (0, 0, 10, 10)  # an attempt succeeds


def test_sample_crop_box__fixed_consumption_and_bad_args():
    generator = torch.Generator().manual_seed(3)
    sample_crop_box(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator)  # fallback path
    after_fallback = torch.rand(3, generator=generator)
    generator.manual_seed(3)
    sample_crop_box(500, 500, (0.2, 1.0), (3 / 4, 4 / 3), generator)  # first attempt succeeds
    assert torch.equal(torch.rand(3, generator=generator), after_fallback)
    with pytest.raises(ValueError, match="`scale` must be"):
        sample_crop_box(10, 10, (0.5, 0.1), (1.0, 1.0), generator)
    with pytest.raises(ValueError, match="`ratio` must be"):
        sample_crop_box(10, 10, (0.1, 0.5), (-1.0, 1.0), generator)
    with pytest.raises(ValueError, match="`height` and `width` must be positive"):
        sample_crop_box(0, 10, (0.1, 0.5), (1.0, 1.0), generator)


def test_draw_view_params__boxes_match_cpu_worker_boxes():
    recipe = ViewRecipe(24)
    seeds = _seeds(5).tolist()
    params = draw_view_params(seeds, 1, recipe, 60, 50)
    for seed, box in zip(seeds, params.boxes.tolist()):
        worker_box = sample_crop_box(60, 50, recipe.crop_scale, recipe.crop_ratio, view_generator(seed, 1))
        assert tuple(box) == worker_box
    # the colour draws do not depend on whether the device crops
    no_crop = draw_view_params(seeds, 1, recipe, 60, 50, crop=False)
    assert no_crop.boxes is None and torch.equal(no_crop.factors, params.factors)


def test_resized_crop__pixel_convention():
    images = torch.rand(2, 3, 20, 24)
    # the full box at the same size is the identity
    full = torch.tensor([[0, 0, 20, 24], [0, 0, 20, 24]])
    square = images[..., :20]
    assert torch.allclose(resized_crop(square, torch.tensor([[0, 0, 20, 20]] * 2), 20), square, atol=1e-5)
    assert resized_crop(images, full, 16).shape == (2, 3, 16, 16)
    # a 2x downscale of an interior box equals F.interpolate on the cropped region
    boxes = torch.tensor([[2, 4, 16, 16], [0, 8, 16, 16]])
    out = resized_crop(images, boxes, 8)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        expected = F.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------- seeding
def test_make_sample_seeds__deterministic_and_distinct():
    seeds = make_sample_seeds(7, 2, torch.arange(100))
    assert seeds.dtype == torch.int64 and seeds.shape == (100,) and bool((seeds >= 0).all())
    assert torch.equal(seeds, make_sample_seeds(7, 2, list(range(100))))
    assert len(set(seeds.tolist())) == 100
    assert not set(seeds.tolist()) & set(make_sample_seeds(7, 3, torch.arange(100)).tolist())
    assert not set(seeds.tolist()) & set(make_sample_seeds(8, 2, torch.arange(100)).tolist())
    assert 0 <= mix_seed(-5, 2**70) < 2**63 and mix_seed(1, 2) != mix_seed(2, 1)


# ---------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("name", sorted(SMALL_RECIPES))
def test_forward__shapes_dtypes_finite(name):
    augment = SCEAugmentation(get_recipe(name, **SMALL_RECIPES[name]))
    outputs = augment(_images(2, 64), _seeds(2))
    assert len(outputs) == len(augment.views)
    for out, view in zip(outputs, augment.views):
        assert out.shape == (2, 3, view.crop_size, view.crop_size) and out.dtype == torch.float32
        assert bool(out.isfinite().all())


@pytest.mark.parametrize("name", sorted(SMALL_RECIPES))
def test_forward__batch_split_gives_same_views(name):
    augment = SCEAugmentation(get_recipe(name, crop_size=24, blur_kernel_size=5))  # small: 6 views x 12 images
    images, seeds = _images(6, 48), _seeds(6)
    whole = augment(images, seeds)
    first, second = augment(images[:3], seeds[:3]), augment(images[3:], seeds[3:])
    for view, out in enumerate(whole):
        # exact up to float rounding: kernels may vectorise differently for other subset sizes
        assert torch.allclose(out, torch.cat([first[view], second[view]]), rtol=0, atol=1e-5)


def test_forward__reproducible_and_seed_dependent():
    augment = SCEAugmentation(get_recipe("cifar10"))
    images = _images(4)
    out_a, out_b = augment(images, _seeds(4)), augment(images, _seeds(4))
    out_c = augment(images, _seeds(4, epoch=1))
    for view in range(2):
        assert torch.equal(out_a[view], out_b[view])
        for i in range(4):  # every sample changes, not just the batch as a whole
            assert not torch.allclose(out_a[view][i], out_c[view][i])
    assert not torch.allclose(out_a[0], out_a[1])  # views are drawn independently


def test_forward__video_clip_shares_one_draw():
    augment = SCEAugmentation(get_recipe("kinetics", **SMALL_RECIPES["kinetics"]))
    frames = _images(3, 48)
    clips = frames.unsqueeze(1).expand(-1, 4, -1, -1, -1).contiguous()  # (3, 4, 3, 48, 48), static clips
    seeds = torch.tensor([5, 6, 7])
    outputs = augment(clips, seeds)
    for out in outputs:
        assert out.shape == (3, 4, 3, 40, 40)
        assert torch.equal(out, out[:, :1].expand_as(out))  # identical across the frames of a clip
    # a static clip is augmented like the image, and clips with other seeds differ
    images_out = augment(frames, seeds)
    assert all(torch.allclose(o[:, 0], i, atol=1e-6) for o, i in zip(outputs, images_out))
    same_image = frames[:1].unsqueeze(1).expand(2, 4, -1, -1, -1).contiguous()
    out = augment(same_image, torch.tensor([1, 2]))[1]
    assert not torch.allclose(out[0], out[1])


def test_forward__precropped_list_and_crop_false_match_device_crop():
    # scale (1, 1) and ratio (1, 1) make the device crop the identity, so the three input modes must agree
    augment = SCEAugmentation(get_recipe("cifar10", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))
    images, seeds = _images(4), _seeds(4)
    device_crop = augment(images, seeds)
    no_crop = augment(images, seeds, crop=False)
    precropped = augment([images, images.clone()], seeds)
    for view in range(2):
        assert torch.allclose(device_crop[view], no_crop[view], atol=1e-5)
        assert torch.equal(no_crop[view], precropped[view])


def test_forward__grayscale_input_is_replicated():
    augment = SCEAugmentation(get_recipe("fashion-mnist"))
    gray, seeds = _images(3, 28, channels=1), _seeds(3)
    for a, b in zip(augment(gray, seeds), augment(gray.expand(-1, 3, -1, -1), seeds)):
        assert torch.allclose(a, b, atol=1e-6)


def test_forward__flip_p_one_is_the_flip_of_p_zero():
    images, seeds = _images(4), _seeds(4)
    plain = SCEAugmentation([ViewRecipe(24, **PLAIN)])(images, seeds)[0]
    flipped = SCEAugmentation([ViewRecipe(24, **{**PLAIN, "flip_p": 1.0})])(images, seeds)[0]
    assert torch.equal(flipped, plain.flip(-1))
    assert 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0


def test_forward__solarize_and_grayscale():
    images, seeds = _images(4), _seeds(4)
    plain = SCEAugmentation([ViewRecipe(24, **PLAIN)])(images, seeds)[0]
    solarized = SCEAugmentation([ViewRecipe(24, **{**PLAIN, "solarize_p": 1.0})])(images, seeds)[0]
    assert not torch.allclose(plain, solarized)
    assert torch.allclose(solarized, torch.where(plain >= 0.5, 1 - plain, plain))
    gray = SCEAugmentation([ViewRecipe(24, **{**PLAIN, "grayscale_p": 1.0})])(images, seeds)[0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert not torch.equal(plain[:, 0], plain[:, 1])


def test_forward__probabilities_roughly_respected():
    probabilities = dict(flip_p=0.5, grayscale_p=0.2, blur_p=0.1, jitter_p=0.8)
    recipe = ViewRecipe(8, **{**PLAIN, **probabilities, "blur_kernel_size": 3})
    params = draw_view_params(_seeds(2000).tolist(), 0, recipe, 8, 8)
    assert abs(params.flip.float().mean().item() - 0.5) < 0.05
    assert abs(params.grayscale.float().mean().item() - 0.2) < 0.04
    assert abs(params.blur.float().mean().item() - 0.1) < 0.03
    assert abs(params.jitter.float().mean().item() - 0.8) < 0.04
    low, high = params.factors.min(0).values, params.factors.max(0).values
    assert bool((low >= torch.tensor([0.6, 0.6, 0.8, -0.1])).all())
    assert bool((high <= torch.tensor([1.4, 1.4, 1.2, 0.1])).all())
    assert sorted(params.order[0].tolist()) == [0, 1, 2, 3]
    assert len({tuple(o) for o in params.order.tolist()}) == 24  # every order of the 4 ops occurs


def _reference_view(image: torch.Tensor, params, i: int, recipe: ViewRecipe) -> torch.Tensor:
    """One sample, one op at a time, written independently of the batched implementation."""
    x = image.float().unsqueeze(0) / 255  # (1, 3, H, W)
    if params.jitter[i]:
        b, c, s, h = params.factors[i].tolist()
        for op in params.order[i].tolist():
            gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            if op == 0:
                x = (x * b).clamp(0, 1)
            elif op == 1:
                x = (c * x + (1 - c) * gray.mean()).clamp(0, 1)
            elif op == 2:
                x = (s * x + (1 - s) * gray).clamp(0, 1)
            else:
                x = kornia.enhance.adjust_hue(x, h * 2 * math.pi)
    if params.grayscale[i]:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).repeat(1, 3, 1, 1)
    if params.blur[i]:
        sigma = float(params.sigma[i])
        k = recipe.blur_kernel_size
        x = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")
    if params.solarize[i]:
        x = torch.where(x >= recipe.solarize_threshold, 1 - x, x)
    if params.flip[i]:
        x = x.flip(-1)
    mean, std = torch.tensor(recipe.mean).view(1, -1, 1, 1), torch.tensor(recipe.std).view(1, -1, 1, 1)
    return ((x - mean) / std)[0]


def test_forward__matches_per_sample_reference():
    # all ops on with middling probabilities, so that every op, subset and jitter order is exercised
    recipe = ViewRecipe(
        16, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.9, grayscale_p=0.3, blur_p=0.5, blur_kernel_size=5,
        solarize_p=0.5, flip_p=0.5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
    )  # fmt: skip
    images, seeds = _images(24, 16), _seeds(24)
    out = SCEAugmentation([recipe])(images, seeds, crop=False)[0]
    params = draw_view_params(seeds.tolist(), 0, recipe, 16, 16, crop=False)
    assert 0 < int(params.jitter.sum()) < 24 and 0 < int(params.blur.sum()) < 24
    for i in range(24):
        assert torch.allclose(out[i], _reference_view(images[i], params, i, recipe), atol=1e-4), f"sample {i}"


def test_forward__autocast_is_disabled():
    augment = SCEAugmentation(get_recipe("cifar10"))
    images, seeds = _images(3), _seeds(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = augment(images, seeds)
    for a, b in zip(outputs, augment(images, seeds)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize(
    "images, seeds, match",
    [
        (_images(2).float(), torch.arange(2), r"`images` must be uint8 \(0-255\), got torch.float32"),
        (_images(2)[0], torch.arange(2), r"`images` must be \(B, C, H, W\) images or .* got shape \(3, 32, 32\)"),
        (_images(2, channels=4), torch.arange(2), r"`images` must have 1 or 3 channels, got 4"),
        ([_images(2)], torch.arange(2), r"one tensor per view \(2\), got 1"),
        ([_images(2), _images(2, 24)], torch.arange(2), r"`images\[1\]` is not cropped here.*32 x 32.*got 24 x 24"),
        ([_images(2), _images(3)], torch.arange(2), r"share one batch size, got \[2, 3\]"),
        ("not a tensor", torch.arange(2), r"`images` must be a uint8 tensor or a list"),
        (_images(2), torch.arange(3), r"`sample_seeds` must be an int64 tensor of shape \(B,\) = \(2,\), got \(3,\)"),
        (_images(2), torch.zeros(2), r"`sample_seeds`.*got \(2,\) \(dtype torch.float32\)"),
        ([_images(2), _images(2).unsqueeze(1)], torch.arange(2), r"all images or all clips, got ranks \[4, 5\]"),
        (_images(2), [1, 2], r"`sample_seeds`.*got <class .list.>"),
    ],
)
def test_forward__bad_input(images, seeds, match):
    augment = SCEAugmentation(get_recipe("cifar10"))
    with pytest.raises(ValueError, match=match):
        augment(images, seeds)


def test_forward__crop_false_needs_view_size_and_views_must_be_recipes():
    augment = SCEAugmentation(get_recipe("cifar10"))
    with pytest.raises(ValueError, match=r"`images` is not cropped here, so it must be 32 x 32.*got 48 x 48"):
        augment(_images(2, 48), torch.arange(2), crop=False)
    with pytest.raises(ValueError, match="`views` must be a non-empty list of ViewRecipe"):
        SCEAugmentation([])
    with pytest.raises(ValueError, match="`views` must be a non-empty list of ViewRecipe"):
        SCEAugmentation([dict(crop_size=32)])


def test_hue_shift_is_in_turns():
    from sce_hf.augmentations import _hue

    primaries = torch.eye(3).view(3, 3, 1, 1).expand(-1, -1, 2, 2)  # red, green, blue images
    shifted = _hue(primaries, torch.full((3,), 1 / 3))  # a third of a turn: red -> green -> blue -> red
    assert torch.allclose(shifted, primaries.roll(-1, dims=0), atol=1e-5)


def test_forward__device_matches_cpu():
    # On a CUDA machine this checks the device path (parameters drawn on the CPU, ops on the GPU); else the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    augment = SCEAugmentation(get_recipe("imagenet-multicrop", crop_size=40, blur_kernel_size=5))
    images, seeds = _images(5, 64), _seeds(5)
    on_device = augment(images.to(device), seeds)
    for a, b in zip(on_device, augment(images, seeds)):
        assert a.device.type == device and torch.allclose(a.cpu(), b, atol=1e-4)


def test_forward__empty_batch_and_aliasing_warning(caplog):
    augment = SCEAugmentation(get_recipe("cifar10"))
    outputs = augment(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    assert [tuple(o.shape) for o in outputs] == [(0, 3, 32, 32)] * 2
    with caplog.at_level("WARNING", logger="sce_hf.augmentations"):
        augment(_images(2, 100), _seeds(2))
        augment(_images(2, 100), _seeds(2))
    assert sum("without antialiasing" in r.getMessage() for r in caplog.records) == 1  # warned once
