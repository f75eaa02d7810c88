"""Conversion of the SCE authors' checkpoints (SCE_SPEC §9), checked against a reference that shares none of the
converter's code: a ResNet written here in torchvision's module and key naming (without torchvision), saved in
both of the authors' formats, must give the same pooled features as the converted `SCEModel`."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers import AutoModel

from sce_hf import SCEForPreTraining, SCEModel
from sce_hf.conversion import CheckpointError, UnsafeCheckpointError, convert_official_checkpoint

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# The reference: torchvision's ResNet layout and names, written out here (torchvision is not a dependency)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride in the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchvisionStyleResNet(nn.Module):
    """torchvision's `ResNet` with `fc = Identity` (the authors' trunk); `small_input`: their CIFAR stem."""

    def __init__(self, block, layers: list[int], small_input: bool = False):
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def mlp_head(dims: list[int], last_bias: bool, last_norm: bool) -> nn.Module:
    """The authors' MLPHead layout: `layers` = Linear (no bias before a BN), BatchNorm1d, ReLU, ..., last Linear
    (+ BatchNorm1d without affine parameters)."""

    class MLPHead(nn.Module):
        def __init__(self):
            super().__init__()
            layers: list[nn.Module] = []
            for i in range(len(dims) - 1):
                last = i == len(dims) - 2
                norm = not last or last_norm
                layers.append(nn.Linear(dims[i], dims[i + 1], bias=(last and last_bias) and not norm))
                if norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1], affine=not last))
                if not last:
                    layers.append(nn.ReLU(inplace=True))
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers(x)

    return MLPHead()


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics, so eval mode is a non-trivial function of every tensor."""
    generator = torch.Generator().manual_seed(seed)
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            fan_in = child.weight[0].numel()
            child.weight.copy_(torch.randn(child.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            if child.bias is not None:
                child.bias.copy_(torch.randn(child.bias.shape, generator=generator) * 0.1)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            if child.affine:
                child.weight.copy_(torch.rand(child.weight.shape, generator=generator) * 0.5 + 0.5)
                child.bias.copy_(torch.randn(child.bias.shape, generator=generator) * 0.1)
            child.running_mean.copy_(torch.randn(child.running_mean.shape, generator=generator) * 0.1)
            child.running_var.copy_(torch.rand(child.running_var.shape, generator=generator) * 0.5 + 0.75)
            child.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=generator)))
    return module.eval()


class FakeDictConfig:
    """Stands for the OmegaConf objects in the authors' `hyper_parameters`: a class `weights_only` refuses."""

    def __init__(self, values: dict):
        self.values = values


def resnet50(seed: int) -> TorchvisionStyleResNet:
    with torch.device("meta"):  # `randomize` sets every tensor: skip torch's own initialisation
        model = TorchvisionStyleResNet(Bottleneck, [3, 4, 6, 3])
    return randomize(model.to_empty(device="cpu"), seed)


def resnet18_small(seed: int) -> TorchvisionStyleResNet:
    with torch.device("meta"):
        model = TorchvisionStyleResNet(BasicBlock, [2, 2, 2, 2], small_input=True)
    return randomize(model.to_empty(device="cpu"), seed)


def lightning_checkpoint(trunk, projector, predictor, momentum_trunk, momentum_projector, queue, pointer: int, unsafe: bool) -> dict:
    """A checkpoint as their LightningModule writes it: top-level buffers first, then the children in order."""
    state = OrderedDict(queue=queue, queue_ptr=torch.tensor([pointer]))
    for prefix, module in (("trunk", trunk), ("projector", projector), ("predictor", predictor),
                           ("momentum_trunk", momentum_trunk), ("momentum_projector", momentum_projector)):
        if module is not None:
            state.update((f"{prefix}.{k}", v.clone()) for k, v in module.state_dict().items())
    checkpoint = {"epoch": 99, "global_step": 12345, "pytorch-lightning_version": "1.9.5", "state_dict": state,
                  "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.3}]}], "lr_schedulers": []}
    if unsafe:
        checkpoint["hyper_parameters"] = {"trunk": FakeDictConfig({"_target_": "eztorch.models.trunks.create_resnet"})}
    return checkpoint


def features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(x)
    return out.pooler_output if hasattr(out, "pooler_output") else out


# ---------------------------------------------------------------------------------------------------------------
# ResNet-50, the released ImageNet trunks


@pytest.fixture(scope="module")
def rn50():
    return resnet50(seed=0)


@pytest.fixture(scope="module")
def rn50_input():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("under_state_dict", [False, True])
def test_resnet50_trunk_only__same_features(rn50, rn50_input, under_state_dict, tmp_path):
    path = tmp_path / "sce_rn50.pth"
    state = rn50.state_dict()
    assert "fc.weight" not in state and "conv1.weight" in state and "layer4.0.downsample.1.running_var" in state
    torch.save({"state_dict": state} if under_state_dict else state, path)
    result = convert_official_checkpoint(str(path))
    assert result.preset == "resnet50" and result.processor_preset == "imagenet" and result.pretraining is None
    assert result.info["source_format"] == "trunk-only" and result.info["under_state_dict_key"] is under_state_dict
    reference = features(rn50, rn50_input)
    assert reference.shape == (2, 2048) and reference.std() > 0.05
    torch.testing.assert_close(features(result.model, rn50_input), reference, atol=1e-5, rtol=0)


def test_resnet50_lightning__trunk_heads_teacher_queue(rn50, rn50_input, tmp_path, caplog):
    projector = randomize(mlp_head([2048, 24, 24, 10], last_bias=False, last_norm=True), 2)
    predictor = randomize(mlp_head([10, 28, 10], last_bias=False, last_norm=False), 3)
    momentum_trunk, momentum_projector = resnet50(seed=4), randomize(mlp_head([2048, 24, 24, 10], False, True), 5)
    queue = nn.functional.normalize(torch.randn(10, 36), dim=0)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(rn50, projector, predictor, momentum_trunk, momentum_projector, queue, 12, unsafe=True), path)

    with pytest.raises(UnsafeCheckpointError, match="FakeDictConfig.*--allow_unsafe_unpickling"):
        convert_official_checkpoint(str(path), include_pretraining=True)
    with caplog.at_level(logging.WARNING, logger="sce_hf.conversion"):
        result = convert_official_checkpoint(str(path), include_pretraining=True, allow_unsafe_unpickling=True)
    assert any("arbitrary code" in r.getMessage() and "--allow_unsafe_unpickling" in r.getMessage() for r in caplog.records)

    assert result.info["source_format"] == "lightning" and result.info["lightning_global_step"] == 12345
    torch.testing.assert_close(features(result.model, rn50_input), features(rn50, rn50_input), atol=1e-5, rtol=0)
    model = result.pretraining.eval()
    config = model.config
    assert (config.projector_hidden_size, config.projector_output_size, config.projector_num_layers) == (24, 10, 3)
    assert (config.predictor_hidden_size, config.predictor_num_layers, config.queue_size) == (28, 2, 36)
    torch.testing.assert_close(features(model.sce, rn50_input), features(rn50, rn50_input), atol=1e-5, rtol=0)
    torch.testing.assert_close(features(model.teacher_encoder, rn50_input), features(momentum_trunk, rn50_input), atol=1e-5, rtol=0)
    z = torch.randn(3, 2048)
    with torch.no_grad():
        torch.testing.assert_close(model.projector(z), projector(z), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.teacher_projector(z), momentum_projector(z), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.predictor(projector(z)), predictor(projector(z)), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.queue, queue.t())  # (d, K) columns -> (K, d) rows
    assert model.queue_ptr.item() == 12
    assert not any(p.requires_grad for p in model.teacher_encoder.parameters())


# ---------------------------------------------------------------------------------------------------------------
# ResNet-18 with the small-input stem (the authors' CIFAR-10 model), through the script


def _script():
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", REPO / "training" / "convert_official_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar_lightning(tmp_path_factory):
    """The authors' CIFAR-10 model: small-input ResNet-18, heads 512 -> 512 -> 128 (bias), no predictor."""
    trunk, momentum = resnet18_small(seed=10), resnet18_small(seed=11)
    projector = randomize(mlp_head([512, 512, 128], last_bias=True, last_norm=False), 12)
    momentum_projector = randomize(mlp_head([512, 512, 128], last_bias=True, last_norm=False), 13)
    queue = nn.functional.normalize(torch.randn(128, 4096), dim=0)
    path = tmp_path_factory.mktemp("cifar") / "epoch=199.ckpt"
    torch.save(lightning_checkpoint(trunk, projector, None, momentum, momentum_projector, queue, 256, unsafe=True), path)
    return dict(path=path, trunk=trunk, momentum=momentum, projector=projector, momentum_projector=momentum_projector, queue=queue)


def test_resnet18_small_lightning__script_writes_a_loadable_folder(cifar_lightning, tmp_path, capsys):
    script, out = _script(), tmp_path / "sce-cifar10"
    assert script.main(["--checkpoint", str(cifar_lightning["path"]), "--output", str(out), "--include_pretraining"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "--allow_unsafe_unpickling" in error and len(error.splitlines()) == 1

    argv = ["--checkpoint", str(cifar_lightning["path"]), "--output", str(out), "--include_pretraining",
            "--preset", "resnet18-small", "--allow_unsafe_unpickling"]
    assert script.main(argv) == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_sce.py", "conversion.json",
            "README.md", "pretraining"} <= files

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    encoder = AutoModel.from_pretrained(out).eval()
    assert type(encoder) is SCEModel and encoder.config.small_input_stem
    torch.testing.assert_close(features(encoder, x), features(cifar_lightning["trunk"], x), atol=1e-5, rtol=0)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["image_mean"][0] == pytest.approx(0.4914)

    model = SCEForPreTraining.from_pretrained(out / "pretraining").eval()
    assert model.config.predictor_num_layers == 0 and model.config.projector_last_bias and model.config.queue_size == 4096
    torch.testing.assert_close(features(model.teacher_encoder, x), features(cifar_lightning["momentum"], x), atol=1e-5, rtol=0)
    z = torch.randn(4, 512)
    with torch.no_grad():
        torch.testing.assert_close(model.projector(z), cifar_lightning["projector"](z), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.teacher_projector(z), cifar_lightning["momentum_projector"](z), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.queue, cifar_lightning["queue"].t())
    assert model.queue_ptr.item() == 256

    record = json.loads((out / "conversion.json").read_text())
    assert record["source_format"] == "lightning" and record["preset"] == "resnet18-small" and len(record["source_sha256"]) == 64
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.license_name == "cecill-2.1"
    assert card.data.datasets == ["uoft-cs/cifar10"] and "converted-checkpoint" in card.data.tags
    assert record["source_sha256"] in card.text and "No evaluation results yet" in card.text
    assert "torchvision ResNet" in card.text and "pytorchvideo" not in card.text


def test_resnet18_small_trunk_only(tmp_path):
    trunk = resnet18_small(seed=20)
    path = tmp_path / "rn18.pth"
    torch.save(trunk.state_dict(), path)
    result = convert_official_checkpoint(str(path))
    assert result.preset == "resnet18-small" and result.processor_preset == "cifar10"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(result.model, x), features(trunk, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Errors: every key accounted for


@pytest.fixture(scope="module")
def rn18_state():
    return resnet18_small(seed=30).state_dict()


def test_missing_keys_are_listed(rn18_state, tmp_path):
    state = OrderedDict((k, v) for k, v in rn18_state.items() if k not in ("layer3.1.conv2.weight", "layer2.0.downsample.1.bias"))
    torch.save(state, tmp_path / "f.pth")
    with pytest.raises(CheckpointError, match="2 missing key") as error:
        convert_official_checkpoint(str(tmp_path / "f.pth"))
    assert "layer3.1.conv2.weight" in str(error.value) and "layer2.0.downsample.1.bias" in str(error.value)
    assert "trunk.encoder.stages.2.layers.1.layer.1.convolution.weight" in str(error.value)


def test_unknown_keys_are_listed(rn18_state, tmp_path):
    state = OrderedDict(rn18_state)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    state["layer1.0.conv7.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(state, tmp_path / "f.pth")
    with pytest.raises(CheckpointError, match="3 unknown key") as error:
        convert_official_checkpoint(str(tmp_path / "f.pth"))
    for key in ("fc.weight", "fc.bias", "layer1.0.conv7.weight"):
        assert key in str(error.value)


def test_unknown_lightning_prefix_and_unmappable_head_are_listed(cifar_lightning, tmp_path):
    checkpoint = torch.load(cifar_lightning["path"], weights_only=False)
    state = checkpoint["state_dict"]
    state["online_classifier.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": state}, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="online_classifier.weight"):
        convert_official_checkpoint(str(tmp_path / "a.ckpt"))

    del state["online_classifier.weight"]
    state["momentum_projector.layers.0.weight"] = torch.zeros(256, 512)  # a teacher head of another width
    torch.save({"state_dict": state}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="momentum_projector.layers.0"):
        convert_official_checkpoint(str(tmp_path / "b.ckpt"), include_pretraining=True)


def test_preset_must_match_the_trunk_and_pretraining_needs_heads(rn18_state, tmp_path):
    torch.save(rn18_state, tmp_path / "f.pth")
    with pytest.raises(CheckpointError, match="--preset resnet18-small"):
        convert_official_checkpoint(str(tmp_path / "f.pth"), preset="resnet50")
    with pytest.raises(CheckpointError, match="without heads"):
        convert_official_checkpoint(str(tmp_path / "f.pth"), include_pretraining=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_official_checkpoint(str(tmp_path / "junk.pth"))


def test_script_hands_video_checkpoints_to_the_video_converter(tmp_path):
    """An R3D trunk (pytorchvideo keys, `model.blocks...`) goes to `sce_hf.conversion_video` and gets a video card."""
    from sce_hf import SCEConfig

    backbone = dict(model_type="r3d", layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[6, 8, 12, 14], embedding_size=6)
    source = randomize(SCEModel(SCEConfig.from_preset("r3d18", backbone_config=backbone)), 40)
    state = {f"model.{k[len('trunk.'):]}": v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "r3d18.pth")
    out = tmp_path / "video"
    assert _script().main(["--checkpoint", str(tmp_path / "r3d18.pth"), "--output", str(out), "--num_frames", "4"]) == 0
    record = json.loads((out / "conversion.json").read_text())
    assert record["preset"] == "r3d18" and record["source_file"] == "r3d18.pth" and len(record["source_sha256"]) == 64
    clips = torch.randn(1, 4, 3, 32, 32)
    torch.testing.assert_close(features(AutoModel.from_pretrained(out).eval(), clips), features(source, clips), atol=1e-5, rtol=0)
    card = ModelCard.load(out / "README.md")
    assert "video" in card.data.tags and card.data.pipeline_tag is None
    assert "an SCEVideoProcessor" in card.text and "AutoImageProcessor.from_pretrained" in card.text
    assert 'pipeline("image-feature-extraction"' not in card.text
    assert "pytorchvideo" in card.text and "torchvision" not in card.text and "ImageNet" not in card.text
