"""The R3D video trunks (SCE_SPEC §2.1), video SCEModel / SCEForPreTraining, both loading routes, the video processor."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from sce_hf import SCEConfig, SCEForImageClassification, SCEForPreTraining, SCEImageProcessor, SCEModel
from sce_hf.modeling_resnet3d import R3DConfig, R3DModel, to_conv3d_layout
from sce_hf.modeling_sce import build_trunk
from sce_hf.pretraining import build_predictor, build_projector
from sce_hf.video import SCEVideoProcessor
from tests.tiny import run_without_sce_hf

TINY_R3D = dict(model_type="r3d", hidden_sizes=[8, 12, 16, 20], embedding_size=6, depths=[1, 2, 1, 1])
TINY_HEADS = dict(projector_hidden_size=24, projector_output_size=10, predictor_hidden_size=28, queue_size=36)


def tiny_video_config(**overrides) -> SCEConfig:
    return SCEConfig.from_preset("r3d18", **{"backbone_config": dict(TINY_R3D), **TINY_HEADS, **overrides})


def clips(batch=3, frames=2, size=20, seed=0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Architecture against SCE_SPEC §2.1


def _expected_r3d_parameters(depth: int) -> int:
    """Parameter count of R3D-18 / R3D-50 from the SCE_SPEC §2.1 description, computed independently of the model:
    convolutions without bias, BN (weight + bias) after every convolution, 1x1x1 shortcuts where the width or the
    stride changes."""
    def conv(c_in, c_out, kt, kh, kw):
        return c_in * c_out * kt * kh * kw

    def bn(c):
        return 2 * c

    total = conv(3, 64, 1, 7, 7) + bn(64)  # stem 1x7x7
    c_in = 64
    if depth == 18:
        for stage, (blocks, width, kt) in enumerate(zip([2, 2, 2, 2], [64, 128, 256, 512], [1, 1, 3, 3])):
            for block in range(blocks):
                source = c_in if block == 0 else width
                total += conv(source, width, kt, 3, 3) + bn(width) + conv(width, width, 1, 3, 3) + bn(width)
                if block == 0 and (source != width or stage > 0):
                    total += conv(source, width, 1, 1, 1) + bn(width)
            c_in = width
    else:
        for stage, (blocks, width, kt) in enumerate(zip([3, 4, 6, 3], [256, 512, 1024, 2048], [1, 1, 3, 3])):
            inner = width // 4
            for block in range(blocks):
                source = c_in if block == 0 else width
                total += conv(source, inner, kt, 1, 1) + bn(inner) + conv(inner, inner, 1, 3, 3) + bn(inner)
                total += conv(inner, width, 1, 1, 1) + bn(width)
                if block == 0:
                    total += conv(source, width, 1, 1, 1) + bn(width)
            c_in = width
    return total


def _trunk(preset: str) -> R3DModel:
    with torch.device("meta"):
        return build_trunk(SCEConfig.from_preset(preset))


def test_r3d18__kernels_strides_and_widths_per_stage():
    trunk = _trunk("r3d18")
    assert isinstance(trunk, R3DModel) and len(trunk.blocks) == 5
    stem = trunk.blocks[0]
    assert (stem.conv.kernel_size, stem.conv.stride, stem.conv.padding) == ((1, 7, 7), (1, 2, 2), (0, 3, 3))
    assert (stem.pool.kernel_size, stem.pool.stride) == ((1, 3, 3), (1, 2, 2))
    for stage, (kt, width, spatial) in enumerate(zip([1, 1, 3, 3], [64, 128, 256, 512], [1, 2, 2, 2]), start=1):
        blocks = trunk.blocks[stage].res_blocks
        assert len(blocks) == 2
        for index, block in enumerate(blocks):
            branch = block.branch2
            stride = (1, spatial, spatial) if index == 0 else (1, 1, 1)
            assert branch.conv_a.kernel_size == (kt, 3, 3) and branch.conv_a.stride == stride
            assert branch.conv_b.kernel_size == (1, 3, 3) and branch.conv_b.stride == (1, 1, 1)
            assert branch.conv_b.out_channels == width and not hasattr(branch, "conv_c")
            has_shortcut = index == 0 and stage > 1  # stage 1 keeps 64 channels and the resolution
            assert (block.branch1_conv is not None) == has_shortcut
            if has_shortcut:
                assert block.branch1_conv.kernel_size == (1, 1, 1) and block.branch1_conv.stride == stride
    assert all(m.stride[0] == 1 for m in trunk.modules() if isinstance(m, nn.Conv3d))  # no temporal striding
    assert sum(p.numel() for p in trunk.parameters()) == _expected_r3d_parameters(18)


def test_r3d50__kernels_strides_and_widths_per_stage():
    trunk = _trunk("r3d50")
    stem = trunk.blocks[0]
    assert (stem.conv.kernel_size, stem.conv.stride) == ((1, 7, 7), (1, 2, 2))  # overridden to 1x7x7
    for stage, (depth, kt, width, spatial) in enumerate(
        zip([3, 4, 6, 3], [1, 1, 3, 3], [256, 512, 1024, 2048], [1, 2, 2, 2]), start=1
    ):
        blocks = trunk.blocks[stage].res_blocks
        assert len(blocks) == depth
        for index, block in enumerate(blocks):
            branch = block.branch2
            spatial_stride = spatial if index == 0 else 1
            assert branch.conv_a.kernel_size == (kt, 1, 1) and branch.conv_a.stride == (1, 1, 1)
            assert branch.conv_b.kernel_size == (1, 3, 3) and branch.conv_b.stride == (1, spatial_stride, spatial_stride)
            assert branch.conv_c.kernel_size == (1, 1, 1) and branch.conv_c.out_channels == width
            assert branch.conv_a.out_channels == width // 4
            assert (block.branch1_conv is not None) == (index == 0)
    assert sum(p.numel() for p in trunk.parameters()) == _expected_r3d_parameters(50)


@pytest.mark.parametrize(
    "preset, feature_dim, projector_shapes, predictor_shapes",
    [
        ("r3d18", 512, [(1024, 512), (1024, 1024), (256, 1024)], [(1024, 256), (256, 1024)]),
        ("r3d50", 2048, [(4096, 2048), (4096, 4096), (256, 4096)], [(4096, 256), (256, 4096)]),
    ],
)
def test_video_presets__head_sizes_and_kinetics_settings(preset, feature_dim, projector_shapes, predictor_shapes):
    config = SCEConfig.from_preset(preset)
    assert config.is_video and config.feature_dim == feature_dim
    projector = build_projector(config)
    assert [tuple(m.weight.shape) for m in projector if isinstance(m, nn.Linear)] == projector_shapes
    assert not projector[-1].affine and all(m.bias is None for m in projector if isinstance(m, nn.Linear))
    assert [tuple(m.weight.shape) for m in build_predictor(config) if isinstance(m, nn.Linear)] == predictor_shapes
    assert (config.queue_size, config.teacher_temperature, config.momentum_schedule, config.symmetric) == (65536, 0.05, "cosine", True)


def test_r3d__full_size_forward_keeps_frames_and_strides_space_by_32():
    model = SCEModel(SCEConfig.from_preset("r3d18")).eval()
    with torch.no_grad():
        output = model(clips(batch=1, frames=2, size=64))
    assert output.last_hidden_state.shape == (1, 512, 2, 2, 2)
    assert output.pooler_output.shape == (1, 512)


def test_r3d_config__validation():
    with pytest.raises(ValueError, match="layer_type"):
        R3DConfig(layer_type="dense")
    with pytest.raises(ValueError, match="one positive integer per stage"):
        R3DConfig(depths=[1, 1], hidden_sizes=[4, 8, 16])
    with pytest.raises(ValueError, match="18 or 50"):
        R3DConfig.from_depth(34)


# ---------------------------------------------------------------------------------------------------------------
# The model boundary: (B, T, C, H, W)


def test_video_model__shapes_layout_and_gradients():
    model = SCEModel(tiny_video_config())
    x = clips()
    output = model(x, output_hidden_states=True)
    assert output.pooler_output.shape == (3, 20)
    assert output.last_hidden_state.shape == (3, 20, 2, 1, 1)
    assert len(output.hidden_states) == 5
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state.mean(dim=(2, 3, 4)))
    assert to_conv3d_layout(x).shape == (3, 3, 2, 20, 20)
    torch.testing.assert_close(to_conv3d_layout(x)[1, :, 0], x[1, 0])
    output.pooler_output.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # pytorchvideo's initialisation: the last BN of every residual branch starts at zero scale
    finals = [m for name, m in model.named_modules() if name.endswith("norm_b")]
    assert finals and all(torch.all(m.weight == 0) for m in finals)


def test_video_model__mean_pooling_and_tuple_output():
    model = SCEModel(tiny_video_config(pooling="mean")).eval()
    pooled, hidden = model(clips(), return_dict=False)[1], model(clips()).last_hidden_state
    torch.testing.assert_close(pooled, hidden.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("shape", [(3, 3, 20, 20), (3, 3, 2, 20, 20), (3, 2, 4, 20, 20)])
def test_video_model__wrong_layout_is_a_clear_error(shape):
    model = SCEModel(tiny_video_config())
    with pytest.raises(ValueError, match=r"num_frames, 3, height, width"):
        model(torch.zeros(shape))  # an image batch, the 3-D convolution layout (B, C, T, H, W), 4 channels


def test_video_pretraining__one_step_on_clips():
    torch.manual_seed(0)
    model = SCEForPreTraining(tiny_video_config())
    views = [clips(batch=4, seed=1), clips(batch=4, seed=2)]
    output = model(pixel_values=views)
    assert torch.isfinite(output.loss) and output.teacher_keys.shape == (8, 10) and output.num_pairs == 2
    output.loss.backward()
    assert all(p.grad is not None for p in model.sce.parameters())
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    model.update_teacher(0.99)
    model.enqueue(output.teacher_keys)
    assert model.num_enqueued.item() == 8


def test_video_classifier__logits():
    model = SCEForImageClassification(tiny_video_config(num_labels=4)).eval()
    output = model(clips(), labels=torch.tensor([0, 1, 3]))
    assert output.logits.shape == (3, 4) and torch.isfinite(output.loss)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_video_save_load__registered_route(tmp_path):
    model = SCEModel(tiny_video_config()).eval()
    model.save_pretrained(tmp_path)
    assert {"configuration_sce.py", "modeling_sce.py", "modeling_resnet3d.py"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "r3d" and saved["backbone_config"]["depths"] == [1, 2, 1, 1]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is SCEModel and loaded.config.is_video
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pooler_output, model(x).pooler_output, atol=1e-5, rtol=0)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    folder, inputs_path, outputs_path = sys.argv[1:4]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.is_video and type(config.backbone_config).__name__ == "R3DConfig", config.backbone_config
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model.trunk).__name__ == "R3DModel"
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "SCEVideoProcessor", type(processor)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    frames = np.load(inputs_path.replace(".pt", ".npy"))
    with torch.no_grad():
        pooled = model(torch.load(inputs_path)).pooler_output
    torch.save({"pooled": pooled, "pixel_values": processor(frames, return_tensors="pt")["pixel_values"]}, outputs_path)
    """
)


def test_video_save_load__remote_code_in_a_process_without_sce_hf(tmp_path):
    torch.manual_seed(0)
    model = SCEModel(tiny_video_config())
    for module in model.modules():  # non-trivial statistics and scales, so the comparison means something
        if isinstance(module, nn.BatchNorm3d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor = SCEVideoProcessor(num_frames=4, size={"shortest_edge": 22}, crop_size={"height": 20, "width": 20})
    processor.save_pretrained(folder)
    assert "video_processing_sce.py" in os.listdir(folder)
    x = clips()
    torch.save(x, tmp_path / "inputs.pt")
    frames = np.random.default_rng(0).integers(0, 255, (4, 30, 26, 3), dtype=np.uint8)
    np.save(tmp_path / "inputs.npy", frames)
    run_without_sce_hf(_REMOTE_SCRIPT, folder, tmp_path / "inputs.pt", tmp_path / "outputs.pt", cwd=tmp_path)
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(outputs["pooled"], model(x).pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["pixel_values"], processor(frames, return_tensors="pt")["pixel_values"])


def test_video_pretraining__save_and_resume_folder(tmp_path):
    model = SCEForPreTraining(tiny_video_config())
    model.save_pretrained(tmp_path)
    loaded = SCEForPreTraining.from_pretrained(tmp_path)
    assert loaded.config.is_video
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert type(AutoConfig.from_pretrained(tmp_path).backbone_config) is R3DConfig


# ---------------------------------------------------------------------------------------------------------------
# The video processor


def test_video_processor__frames_to_pixel_values():
    processor = SCEVideoProcessor(size={"shortest_edge": 22}, crop_size={"height": 20, "width": 20})
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (30, 26, 3), dtype=np.uint8) for _ in range(4)]
    one = processor(frames, return_tensors="pt")["pixel_values"]
    assert one.shape == (1, 4, 3, 20, 20)
    pil = processor([Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pil, one)
    batch = processor(np.stack([np.stack(frames), np.stack(frames[::-1])]), return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 4, 3, 20, 20)
    torch.testing.assert_close(batch[1], one[0].flip(0))
    # each frame equals the image processor's output with the same settings (Kinetics statistics)
    image = SCEImageProcessor(size={"shortest_edge": 22}, crop_size={"height": 20, "width": 20},
                              image_mean=[0.45] * 3, image_std=[0.225] * 3)
    torch.testing.assert_close(one[0, 2], image(frames[2], return_tensors="pt")["pixel_values"][0])
    with pytest.raises(ValueError, match="same, non-zero number of frames"):
        processor([frames, frames[:2]])


def test_video_processor__round_trip_and_model_input(tmp_path):
    processor = SCEVideoProcessor(num_frames=4, clip_duration=1.5, size={"shortest_edge": 22}, crop_size={"height": 20, "width": 20})
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "video_processing_sce.SCEVideoProcessor"}
    assert saved["num_frames"] == 4
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SCEVideoProcessor  # the package's route, no remote code
    loaded = SCEVideoProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.clip_duration, list(loaded.image_mean)) == (4, 1.5, [0.45] * 3)
    pixel_values = loaded(np.zeros((4, 24, 24, 3), dtype=np.uint8), return_tensors="pt")["pixel_values"]
    assert SCEModel(tiny_video_config())(pixel_values).pooler_output.shape == (1, 20)
