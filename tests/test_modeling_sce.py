"""SCEConfig, SCEModel, SCEForImageClassification, SCEImageProcessor and both loading routes."""

import inspect
import json
import os
import re
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

from sce_hf import SCEConfig, SCEForImageClassification, SCEForPreTraining, SCEImageProcessor, SCEModel
from sce_hf.pretraining import build_predictor, build_projector
from tests.tiny import TINY_BACKBONES, run_without_sce_hf, tiny_config

BACKBONES = sorted(TINY_BACKBONES)


def tiny_processor() -> SCEImageProcessor:
    return SCEImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16})


def _save_model_and_processor(model, path) -> None:
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config__docstring_documents_every_argument():
    params = [p for p in inspect.signature(SCEConfig.__init__).parameters if p not in ("self", "kwargs")]
    doc = SCEConfig.__doc__
    missing = [p for p in params if not re.search(rf"^\s+{p} \(`", doc, flags=re.MULTILINE)]
    assert not missing, f"SCEConfig arguments missing from its docstring: {missing}"


def test_config__default_is_the_papers_resnet50():
    config = SCEConfig()
    assert config.backbone_config.model_type == "resnet"
    assert list(config.backbone_config.depths) == [3, 4, 6, 3]
    assert config.backbone_config.layer_type == "bottleneck"
    assert config.backbone_config.downsample_in_bottleneck is False  # torchvision's v1.5
    assert config.feature_dim == 2048
    assert (config.queue_size, config.student_temperature, config.teacher_temperature, config.coeff) == (65536, 0.1, 0.07, 0.5)


@pytest.mark.parametrize(
    "preset, feature_dim, projector_shapes, predictor_shapes",
    [
        ("resnet50", 2048, [(4096, 2048), (4096, 4096), (256, 4096)], [(4096, 256), (256, 4096)]),
        ("resnet18", 512, [(512, 512), (128, 512)], []),
        ("resnet18-small", 512, [(512, 512), (128, 512)], []),
    ],
)
def test_config__preset_head_sizes(preset, feature_dim, projector_shapes, predictor_shapes):
    config = SCEConfig.from_preset(preset)
    assert config.feature_dim == feature_dim
    projector = build_projector(config)
    linear_shapes = [tuple(m.weight.shape) for m in projector if isinstance(m, torch.nn.Linear)]
    assert linear_shapes == projector_shapes
    norms = [m for m in projector if isinstance(m, torch.nn.BatchNorm1d)]
    if preset == "resnet50":  # BN without affine parameters on the 256-d output (SCE_SPEC §2.1)
        assert not norms[-1].affine and norms[-1].num_features == 256
        assert all(m.bias is None for m in projector if isinstance(m, torch.nn.Linear))
    else:  # CIFAR heads: biased last layer, no BN after it
        assert isinstance(projector[-1], torch.nn.Linear) and projector[-1].bias is not None
    predictor = build_predictor(config)
    assert [tuple(m.weight.shape) for m in predictor.modules() if isinstance(m, torch.nn.Linear)] == predictor_shapes


def test_config__small_input_stem_replaces_the_resnet_stem():
    small = SCEModel(tiny_config(small_input_stem=True)).trunk.embedder
    assert small.embedder.convolution.kernel_size == (3, 3) and small.embedder.convolution.stride == (1, 1)
    assert isinstance(small.pooler, torch.nn.Identity)
    standard = SCEModel(tiny_config(small_input_stem=False)).trunk.embedder
    assert standard.embedder.convolution.kernel_size == (7, 7) and standard.embedder.convolution.stride == (2, 2)
    assert isinstance(standard.pooler, torch.nn.MaxPool2d)
    # 32 px in: the small stem keeps 32x32 before the stages, the standard one goes down to 8x8.
    assert small(torch.zeros(1, 3, 32, 32)).shape[-1] == 32
    assert standard(torch.zeros(1, 3, 32, 32)).shape[-1] == 8


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(coeff=1.5), "coeff"),
        (dict(coeff=-0.1), "coeff"),
        (dict(student_temperature=0.0), "student_temperature"),
        (dict(teacher_temperature=-1.0), "teacher_temperature"),
        (dict(pooling="max"), "pooling"),
        (dict(projector_num_layers=0), "projector_num_layers"),
        (dict(queue_size=-4), "queue_size"),
        (dict(queue_size=0), "queue_size"),
        (dict(momentum_schedule="linear"), "momentum_schedule"),
        (dict(initial_momentum=1.2), "initial_momentum"),
        (dict(split_batchnorm_groups=0), "split_batchnorm_groups"),
        (dict(backbone_config=dict(model_type="not-a-model")), "backbone_config"),
    ],
)
def test_config__invalid_settings_raise(overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny_config(**overrides)


def test_config__small_stem_needs_a_resnet():
    with pytest.raises(ValueError, match="small_input_stem.*ResNet.*convnext"):
        tiny_config("convnext", small_input_stem=True)


def test_config__round_trips_through_json(tmp_path):
    config = tiny_config("convnext", coeff=0.3)
    config.save_pretrained(tmp_path)
    loaded = SCEConfig.from_pretrained(tmp_path)
    assert loaded.coeff == 0.3 and loaded.backbone_config.model_type == "convnext"
    assert loaded.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("backbone", BACKBONES)
def test_sce_model__pooled_features_and_gradients(backbone):
    config = tiny_config(backbone)
    model = SCEModel(config)
    outputs = model(torch.randn(3, 3, 16, 16), output_hidden_states=True)
    assert outputs.pooler_output.shape == (3, config.feature_dim) == (3, 20)
    assert torch.isfinite(outputs.pooler_output).all()
    assert outputs.hidden_states is not None
    outputs.pooler_output.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretraining__one_step_on_any_backbone(backbone):
    model = SCEForPreTraining(tiny_config(backbone))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    before = [p.detach().clone() for p in model.sce.parameters()]
    output = model(pixel_values=views)
    output.loss.backward()
    optimizer.step()
    model.update_teacher(0.9)
    model.enqueue(output.teacher_keys)
    assert torch.isfinite(output.loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.sce.parameters()))
    assert int(model.queue_ptr) == 8


def test_sce_model__bad_pixel_values():
    model = SCEModel(tiny_config())
    with pytest.raises(ValueError, match=r"pixel_values.*3 channels.*got 1"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_values.*got a 3-D tensor"):
        model(torch.randn(3, 16, 16))


def test_classification__frozen_encoder_trains_only_the_head():
    config = tiny_config(freeze_encoder=True, num_labels=5)
    model = SCEForImageClassification(config).train()
    assert not model.sce.training and model.classifier.training
    # only the head is trainable: DDP (which expects a gradient for every trainable parameter) and optimizers see it
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    outputs = model(torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 4]))
    assert outputs.logits.shape == (4, 5)
    outputs.loss.backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.sce.parameters())


def test_classification__folder_loads_as_the_bare_encoder_without_unexpected_keys(tmp_path):
    classifier = SCEForImageClassification(tiny_config(num_labels=3)).eval()
    classifier.save_pretrained(tmp_path)
    encoder, info = SCEModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x).pooler_output, classifier.sce(x).pooler_output)


def test_classification__unfrozen_encoder_gets_gradients():
    model = SCEForImageClassification(tiny_config(num_labels=3))
    model(torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    assert all(p.grad is not None for p in model.sce.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading: the registered route (sce_hf imported) and remote code (a process without sce_hf)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load__registered_route(backbone, tmp_path):
    model = SCEModel(tiny_config(backbone)).eval()
    _save_model_and_processor(model, tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"configuration_sce.py", "modeling_sce.py", "image_processing_sce.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_sce.SCEModel"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_sce.SCEForImageClassification"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is SCEModel
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x).pooler_output, model(x).pooler_output, atol=1e-5, rtol=0)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SCEImageProcessor


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    folder, inputs_path, outputs_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "SCEImageProcessor", type(processor)
    with torch.no_grad():
        pooled = model(torch.load(inputs_path)).pooler_output
    extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True, pool=True)
    features = torch.as_tensor(extractor(Image.new("RGB", (20, 24), (120, 30, 200))))
    torch.save({"pooled": pooled, "pipeline_shape": tuple(features.shape)}, outputs_path)
    """
)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load__remote_code_in_a_process_without_sce_hf(backbone, tmp_path):
    model = SCEModel(tiny_config(backbone)).eval()
    folder = tmp_path / "model"
    _save_model_and_processor(model, folder)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "inputs.pt")
    run_without_sce_hf(_REMOTE_SCRIPT, folder, tmp_path / "inputs.pt", tmp_path / "outputs.pt", cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(outputs["pooled"], model(x).pooler_output, atol=1e-5, rtol=0)
    assert outputs["pipeline_shape"] == (1, model.config.feature_dim)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_pipeline__feature_extraction_on_any_image_mode(mode, tmp_path):
    _save_model_and_processor(SCEModel(tiny_config()), tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), pool=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (21, 17, 3), dtype=np.uint8)).convert(mode)
    features = torch.as_tensor(extractor(image))
    assert features.shape == (1, 20)


def test_pipeline__image_classification(tmp_path):
    config = tiny_config(num_labels=3, id2label={0: "shirt", 1: "shoe", 2: "bag"}, label2id={"shirt": 0, "shoe": 1, "bag": 2})
    _save_model_and_processor(SCEForImageClassification(config), tmp_path)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is SCEForImageClassification
    classifier = pipeline("image-classification", model=str(tmp_path))
    predictions = classifier(Image.new("RGB", (30, 20), (10, 200, 30)), top_k=3)
    assert sorted(p["label"] for p in predictions) == ["bag", "shirt", "shoe"]
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-5


def test_pipeline__encoder_folder_loads_into_a_classifier(tmp_path):
    encoder = SCEModel(tiny_config()).eval()
    encoder.save_pretrained(tmp_path)
    classifier = SCEForImageClassification.from_pretrained(tmp_path, num_labels=4).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(classifier.sce(x).pooler_output, encoder(x).pooler_output)


# ---------------------------------------------------------------------------------------------------------------
# Image processor


def _reference_eval_transform(image: Image.Image, shortest_edge: int, crop: int, mean, std) -> np.ndarray:
    """The evaluation transform of SCE_SPEC §6, written independently: RGB, bilinear resize of the shorter side,
    centre crop (torchvision's rounding), scale to [0, 1], normalise; (3, crop, crop)."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = shortest_edge, int(shortest_edge * height / width)
    else:
        new_width, new_height = int(shortest_edge * width / height), shortest_edge
    image = image.resize((new_width, new_height), Image.BILINEAR)
    top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
    array = np.asarray(image, dtype=np.float64)[top : top + crop, left : left + crop] / 255.0
    array = (array - np.asarray(mean)) / np.asarray(std)
    return array.transpose(2, 0, 1)


@pytest.mark.parametrize("preset", ["imagenet", "cifar10", "fashion-mnist"])
def test_processor__equals_the_evaluation_transform(preset):
    from skimage import data

    processor = SCEImageProcessor.from_preset(preset)
    image = Image.fromarray(data.astronaut()[40:340, 10:410])  # 300 x 400, not square
    ours = processor(image, return_tensors="np")["pixel_values"][0]
    reference = _reference_eval_transform(
        image, processor.size["shortest_edge"], processor.crop_size["height"], processor.image_mean, processor.image_std
    )
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_processor__grayscale_and_rgba_become_rgb():
    processor = SCEImageProcessor.from_preset("fashion-mnist")
    gray = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    out = processor([gray, gray.convert("RGBA")], return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, 28, 28)
    torch.testing.assert_close(out[0, 0], out[0, 1])
    torch.testing.assert_close(out[0], out[1])


def test_processor__presets_round_trip(tmp_path):
    processor = SCEImageProcessor.from_preset("cifar10")
    processor.save_pretrained(tmp_path)
    loaded = SCEImageProcessor.from_pretrained(tmp_path)
    assert loaded.crop_size == {"height": 32, "width": 32} and loaded.image_mean == processor.image_mean
    assert loaded.resample == 2  # PIL bilinear, as the authors' evaluation transform
    with pytest.raises(ValueError, match="Unknown processor preset"):
        SCEImageProcessor.from_preset("mnist")
