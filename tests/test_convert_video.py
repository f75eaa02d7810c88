"""Conversion of the authors' R3D checkpoints (pytorchvideo names under `trunk.model.`, SCE_SPEC §9), checked against
a reference forward written here, independently of the converter and of our model, in the authors' key naming."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from sce_hf import SCEConfig, SCEModel
from sce_hf.conversion import CheckpointError
from sce_hf.conversion_video import convert_official_video_checkpoint, infer_r3d_architecture, is_video_checkpoint
from tests.tiny import load_script


# ---------------------------------------------------------------------------------------------------------------
# The authors' side, written from pytorchvideo's layout (SCE_SPEC §2.1 and §9)


def authors_trunk(layer_type, depths, widths, stem=6, temporal=(1, 1, 3, 3), seed=0, shapes_only=False):
    """A pytorchvideo ResNet3D state dict (no prefix): stem `blocks.0.{conv,norm}`, stages `blocks.S.res_blocks.I`
    with `branch2.{conv,norm}_{a,b[,c]}` and `branch1_{conv,norm}` where the width or the stride changes."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def tensor(*shape, scale=1.0, low=None):
        if shapes_only:
            return torch.empty(shape, device="meta")
        if low is not None:
            return torch.empty(shape).uniform_(low, low + 1.0, generator=generator)
        return torch.randn(shape, generator=generator) * scale

    def conv(name, c_out, c_in, kt, kh, kw):
        state[f"{name}.weight"] = tensor(c_out, c_in, kt, kh, kw, scale=(2.0 / (c_in * kt * kh * kw)) ** 0.5)

    def norm(name, c):
        state[f"{name}.weight"] = tensor(c, low=0.5)
        state[f"{name}.bias"] = tensor(c, scale=0.1)
        state[f"{name}.running_mean"] = tensor(c, scale=0.1)
        state[f"{name}.running_var"] = tensor(c, low=0.5)
        state[f"{name}.num_batches_tracked"] = torch.tensor(1000) if not shapes_only else torch.empty((), device="meta", dtype=torch.long)

    conv("blocks.0.conv", stem, 3, 1, 7, 7)
    norm("blocks.0.norm", stem)
    c_in = stem
    for s, (depth, width, kt) in enumerate(zip(depths, widths, temporal), start=1):
        for i in range(depth):
            p = f"blocks.{s}.res_blocks.{i}"
            source = c_in if i == 0 else width
            stride = 2 if (i == 0 and s > 1) else 1
            if layer_type == "basic":
                conv(f"{p}.branch2.conv_a", width, source, kt, 3, 3)
                norm(f"{p}.branch2.norm_a", width)
                conv(f"{p}.branch2.conv_b", width, width, 1, 3, 3)
                norm(f"{p}.branch2.norm_b", width)
            else:
                inner = width // 4
                conv(f"{p}.branch2.conv_a", inner, source, kt, 1, 1)
                norm(f"{p}.branch2.norm_a", inner)
                conv(f"{p}.branch2.conv_b", inner, inner, 1, 3, 3)
                norm(f"{p}.branch2.norm_b", inner)
                conv(f"{p}.branch2.conv_c", width, inner, 1, 1, 1)
                norm(f"{p}.branch2.norm_c", width)
            if i == 0 and (source != width or stride != 1):
                conv(f"{p}.branch1_conv", width, source, 1, 1, 1)
                norm(f"{p}.branch1_norm", width)
        c_in = width
    return state


def reference_forward(state, clips, layer_type):
    """Pooled features of a pytorchvideo slow-only ResNet3D in eval mode; `clips` (B, C, T, H, W)."""

    def conv(h, name, spatial=1):
        weight = state[f"{name}.weight"]
        return F.conv3d(h, weight, stride=(1, spatial, spatial), padding=tuple(k // 2 for k in weight.shape[2:]))

    def norm(h, name):
        return F.batch_norm(h, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    h = F.relu(norm(conv(clips, "blocks.0.conv", 2), "blocks.0.norm"))
    h = F.max_pool3d(h, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    s = 1
    while f"blocks.{s}.res_blocks.0.branch2.conv_a.weight" in state:
        i = 0
        while f"blocks.{s}.res_blocks.{i}.branch2.conv_a.weight" in state:
            p = f"blocks.{s}.res_blocks.{i}"
            spatial = 2 if (i == 0 and s > 1) else 1
            if layer_type == "basic":  # the stride is in conv_a
                y = F.relu(norm(conv(h, f"{p}.branch2.conv_a", spatial), f"{p}.branch2.norm_a"))
                y = norm(conv(y, f"{p}.branch2.conv_b"), f"{p}.branch2.norm_b")
            else:  # the stride is in conv_b
                y = F.relu(norm(conv(h, f"{p}.branch2.conv_a"), f"{p}.branch2.norm_a"))
                y = F.relu(norm(conv(y, f"{p}.branch2.conv_b", spatial), f"{p}.branch2.norm_b"))
                y = norm(conv(y, f"{p}.branch2.conv_c"), f"{p}.branch2.norm_c")
            shortcut = norm(conv(h, f"{p}.branch1_conv", spatial), f"{p}.branch1_norm") if f"{p}.branch1_conv.weight" in state else h
            h = F.relu(shortcut + y)
            i += 1
        s += 1
    return h.mean(dim=(2, 3, 4))


def _head(sizes, last_batchnorm, seed):
    """An MLP head as the authors' Sequential: Linear (no bias) / BatchNorm1d / ReLU, numbered by position."""
    generator = torch.Generator().manual_seed(seed)
    state, index = {}, 0
    for i, (c_in, c_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        state[f"{index}.weight"] = torch.randn(c_out, c_in, generator=generator) * 0.1
        index += 1
        last = i == len(sizes) - 2
        if not last or last_batchnorm:
            if not last:
                state[f"{index}.weight"] = torch.rand(c_out, generator=generator) + 0.5
                state[f"{index}.bias"] = torch.randn(c_out, generator=generator) * 0.1
            state[f"{index}.running_mean"] = torch.randn(c_out, generator=generator) * 0.1
            state[f"{index}.running_var"] = torch.rand(c_out, generator=generator) + 0.5
            state[f"{index}.num_batches_tracked"] = torch.tensor(10)
            index += 1 if last else 2  # BatchNorm1d, then ReLU (no state)
    return state


SPECS = {
    "basic": dict(layer_type="basic", depths=[2, 1, 1, 1], widths=[6, 10, 12, 20]),
    "bottleneck": dict(layer_type="bottleneck", depths=[1, 2, 1, 1], widths=[8, 12, 16, 20]),
}


def _lightning_file(tmp_path, kind):
    spec = SPECS[kind]
    trunk = authors_trunk(spec["layer_type"], spec["depths"], spec["widths"], seed=1)
    teacher = authors_trunk(spec["layer_type"], spec["depths"], spec["widths"], seed=2)
    state = {f"trunk.model.{k}": v for k, v in trunk.items()}
    state.update({f"projector.{k}": v for k, v in _head([20, 24, 24, 10], True, 3).items()})
    state.update({f"predictor.{k}": v for k, v in _head([10, 28, 10], False, 4).items()})
    state.update({f"momentum_trunk.model.{k}": v for k, v in teacher.items()})
    state.update({f"momentum_projector.{k}": v for k, v in _head([20, 24, 24, 10], True, 5).items()})
    state["queue"] = F.normalize(torch.randn(10, 36), dim=0)
    state["queue_ptr"] = torch.tensor([12])
    path = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": state, "epoch": 199, "global_step": 1234}, path)
    return path, trunk, teacher, state


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_convert__lightning_checkpoint_matches_the_reference_forward(tmp_path, kind):
    path, trunk, teacher, state = _lightning_file(tmp_path, kind)
    result = convert_official_video_checkpoint(str(path), include_pretraining=True)
    config = result.model.config
    assert config.is_video and result.preset == ("r3d18" if kind == "basic" else "r3d50")
    assert list(config.backbone_config.depths) == SPECS[kind]["depths"]
    assert list(config.backbone_config.hidden_sizes) == SPECS[kind]["widths"]
    assert (config.projector_hidden_size, config.projector_output_size, config.predictor_hidden_size, config.queue_size) == (24, 10, 28, 36)
    clips = torch.randn(2, 4, 3, 36, 36, generator=torch.Generator().manual_seed(9))  # (B, T, C, H, W)
    with torch.no_grad():
        ours = result.model(clips).pooler_output
        reference = reference_forward(trunk, clips.permute(0, 2, 1, 3, 4), kind)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        pretraining = result.pretraining.eval()
        teacher_reference = reference_forward(teacher, clips.permute(0, 2, 1, 3, 4), kind)
        torch.testing.assert_close(pretraining.teacher_encoder(clips).pooler_output, teacher_reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(pretraining.queue, state["queue"].t())  # (d, K) -> one key per row
    assert pretraining.queue_ptr.item() == 12
    torch.testing.assert_close(pretraining.projector[0].weight, state["projector.0.weight"])
    torch.testing.assert_close(pretraining.predictor[3].weight, state["predictor.3.weight"])
    assert not any(p.requires_grad for p in pretraining.teacher_encoder.parameters())
    assert result.info["source_format"] == "lightning" and len(result.info["source_sha256"]) == 64


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_convert__trunk_only_file(tmp_path, prefix):
    trunk = authors_trunk("basic", [1, 1, 1, 1], [6, 8, 12, 14], seed=3)
    torch.save({f"{prefix}{k}": v for k, v in trunk.items()}, tmp_path / "trunk.pth")
    assert is_video_checkpoint(torch.load(tmp_path / "trunk.pth"))
    result = convert_official_video_checkpoint(str(tmp_path / "trunk.pth"))
    clips = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(result.model(clips).pooler_output,
                                   reference_forward(trunk, clips.permute(0, 2, 1, 3, 4), "basic"), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="no heads"):
        convert_official_video_checkpoint(str(tmp_path / "trunk.pth"), include_pretraining=True)


@pytest.mark.parametrize("preset, layer_type, depths, widths", [
    ("r3d18", "basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    ("r3d50", "bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
])
def test_convert__full_size_names_and_shapes_are_the_authors(preset, layer_type, depths, widths):
    authors = authors_trunk(layer_type, depths, widths, stem=64, shapes_only=True)
    with torch.device("meta"):
        ours = SCEModel(SCEConfig.from_preset(preset)).state_dict()
    ours = {k[len("trunk."):]: tuple(v.shape) for k, v in ours.items()}
    assert ours == {k: tuple(v.shape) for k, v in authors.items()}
    architecture = infer_r3d_architecture({f"model.{k}": v for k, v in authors.items()})
    assert architecture["preset"] == preset and architecture["conv_a_temporal_kernel_sizes"] == [1, 1, 3, 3]
    assert architecture["stem_kernel_size"] == [1, 7, 7]


def test_convert__unknown_and_missing_keys_are_listed(tmp_path):
    trunk = authors_trunk("basic", [1, 1, 1, 1], [6, 8, 12, 14])
    extra = {**{f"model.{k}": v for k, v in trunk.items()}, "model.blocks.5.proj.weight": torch.zeros(3, 14)}
    with pytest.raises(CheckpointError, match=r"unknown key\(s\): \['model.blocks.5.proj.weight'\]"):
        convert_official_video_checkpoint(extra)
    missing = {f"model.{k}": v for k, v in trunk.items() if k != "blocks.2.res_blocks.0.branch2.norm_a.bias"}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): \['trunk.blocks.2.res_blocks.0.branch2.norm_a.bias'\]"):
        convert_official_video_checkpoint(missing)
    with pytest.raises(CheckpointError, match="not a pytorchvideo ResNet3D"):
        convert_official_video_checkpoint({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    assert not is_video_checkpoint({"conv1.weight": torch.zeros(64, 3, 7, 7)})


def test_convert__wrong_preset_and_a_damaged_queue_are_clear_errors(tmp_path):
    path, _, _, state = _lightning_file(tmp_path, "basic")
    with pytest.raises(CheckpointError, match=r"holds an R3D18 trunk \(basic blocks\), not r3d50: pass --preset r3d18"):
        convert_official_video_checkpoint(str(path), preset="r3d50")
    for name, queue, pointer in (("width", torch.randn(7, 36), 0), ("pointer", torch.randn(10, 36), 36)):
        damaged = {**state, "queue": queue, "queue_ptr": torch.tensor([pointer])}
        with pytest.raises(CheckpointError, match=r"the queue has shape .* expected \(10, K\)"):
            convert_official_video_checkpoint({"state_dict": damaged}, include_pretraining=True)


def test_convert__cli_writes_a_loadable_export(tmp_path):
    path, trunk, _, _ = _lightning_file(tmp_path, "basic")
    output = tmp_path / "export"
    convert = load_script("training/convert_official_checkpoint.py").main
    assert convert(["--checkpoint", str(path), "--output", str(output), "--include_pretraining",
                    "--pretraining_dataset", "kinetics200"]) == 0
    assert {"config.json", "model.safetensors", "modeling_resnet3d.py", "preprocessor_config.json", "conversion.json"} <= set(os.listdir(output))
    record = json.loads((output / "conversion.json").read_text())
    assert record["preset"] == "r3d18" and record["pretraining_dataset"] == "kinetics200"
    model = AutoModel.from_pretrained(output).eval()
    clips = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clips).pooler_output,
                                   reference_forward(trunk, clips.permute(0, 2, 1, 3, 4), "basic"), atol=1e-5, rtol=0)
    assert os.path.isfile(output / "pretraining" / "model.safetensors")
