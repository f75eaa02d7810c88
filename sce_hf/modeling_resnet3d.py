"""The video trunks of SCE: slow-only 3-D ResNets (R3D-18 and R3D-50), as the authors build them with pytorchvideo.

SCE_SPEC §2.1: R3D-18 is eztorch's `create_resnet3d_basic` (depth 18) and R3D-50 is pytorchvideo's `create_resnet`
(depth 50) with the stem convolution set to 1x7x7. Both are "slow-only": no temporal striding anywhere, temporal
kernels of 3 only in the first convolution of the blocks of stages 3 and 4, and a global average pool at the end.

    stem      conv 1x7x7 stride (1,2,2) -> BN -> ReLU -> max-pool 1x3x3 stride (1,2,2)
    R3D-18    basic blocks [2, 2, 2, 2], widths 64/128/256/512 (stem 64):
              conv_a kT x3x3 (kT = 1, 1, 3, 3 per stage; carries the spatial stride 1, 2, 2, 2) -> BN -> ReLU
              -> conv_b 1x3x3 -> BN; + shortcut; ReLU
    R3D-50    bottleneck blocks [3, 4, 6, 3], widths 256/512/1024/2048 (inner = width / 4, stem 64):
              conv_a kT x1x1 (kT = 1, 1, 3, 3) -> BN -> ReLU -> conv_b 1x3x3 (spatial stride) -> BN -> ReLU
              -> conv_c 1x1x1 -> BN; + shortcut; ReLU
    shortcut  1x1x1 convolution + BN when the width or the stride changes, else the identity

Module names follow pytorchvideo exactly (`blocks.0.conv`, `blocks.0.norm`, `blocks.{s}.res_blocks.{i}.branch1_conv`,
`.branch1_norm`, `.branch2.conv_a`, `.branch2.norm_a`, ...), so the authors' weights, stored under `trunk.model.`,
load after removing that prefix (`sce_hf/conversion_video.py`).

Layout: the model boundary takes clips as transformers' video models do, `(batch, frames, channels, height, width)`;
:func:`to_conv3d_layout` is the one step that permutes them to the `(batch, channels, frames, height, width)` layout
of 3-D convolutions.

This file travels with exported checkpoints as remote code (a sibling of `configuration_sce.py` and
`modeling_sce.py`, imported relatively): it imports only torch and transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention


R3D_MODEL_TYPE = "r3d"
_LAYER_TYPES = ("basic", "bottleneck")


def _triple(value: Sequence[int], name: str) -> list[int]:
    value = [int(v) for v in value]
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"R3DConfig.{name} must be 3 positive integers (time, height, width), got {value!r}.")
    return value


class R3DConfig(PreTrainedConfig):
    r"""
    Architecture of a slow-only 3-D ResNet trunk (SCE_SPEC §2.1), nested in [`SCEConfig`] as its `backbone_config`.
    The defaults are R3D-18; [`R3DConfig.from_depth`] gives R3D-18 or R3D-50 with optional overrides (reduced
    widths for tests and small benchmarks).

    Args:
        layer_type (`str`, *optional*, defaults to `"basic"`):
            `"basic"` (two convolutions per block, R3D-18) or `"bottleneck"` (three, R3D-50).
        depths (`list[int]`, *optional*, defaults to `[2, 2, 2, 2]`):
            Number of residual blocks per stage.
        hidden_sizes (`list[int]`, *optional*, defaults to `[64, 128, 256, 512]`):
            Output width of each stage; the last one is the feature size. Bottleneck blocks work at a quarter of it.
        embedding_size (`int`, *optional*, defaults to 64):
            Width of the stem.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input frames.
        conv_a_temporal_kernel_sizes (`list[int]`, *optional*, defaults to `[1, 1, 3, 3]`):
            Temporal kernel size of every block's first convolution, per stage (padded to keep the frame count).
        spatial_strides (`list[int]`, *optional*, defaults to `[1, 2, 2, 2]`):
            Spatial stride of each stage's first block.
        temporal_strides (`list[int]`, *optional*, defaults to `[1, 1, 1, 1]`):
            Temporal stride of each stage's first block (1: slow-only, no temporal striding).
        stem_kernel_size (`list[int]`, *optional*, defaults to `[1, 7, 7]`):
            Kernel of the stem convolution (time, height, width).
        stem_stride (`list[int]`, *optional*, defaults to `[1, 2, 2]`):
            Stride of the stem convolution.
        stem_pool (`bool`, *optional*, defaults to `True`):
            Follow the stem with a 1x3x3 max-pool of stride (1, 2, 2).
        zero_init_residual (`bool`, *optional*, defaults to `True`):
            Start the last batch norm of every residual branch at zero scale, as pytorchvideo's initialisation does.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the batch norms.
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the batch norms' running statistics.
    """

    model_type = R3D_MODEL_TYPE

    def __init__(
        self,
        layer_type: str = "basic",
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_sizes: Sequence[int] = (64, 128, 256, 512),
        embedding_size: int = 64,
        num_channels: int = 3,
        conv_a_temporal_kernel_sizes: Sequence[int] = (1, 1, 3, 3),
        spatial_strides: Sequence[int] = (1, 2, 2, 2),
        temporal_strides: Sequence[int] = (1, 1, 1, 1),
        stem_kernel_size: Sequence[int] = (1, 7, 7),
        stem_stride: Sequence[int] = (1, 2, 2),
        stem_pool: bool = True,
        zero_init_residual: bool = True,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
        **kwargs,
    ):
        self.layer_type = layer_type
        self.depths = [int(v) for v in depths]
        self.hidden_sizes = [int(v) for v in hidden_sizes]
        self.embedding_size = int(embedding_size)
        self.num_channels = int(num_channels)
        self.conv_a_temporal_kernel_sizes = [int(v) for v in conv_a_temporal_kernel_sizes]
        self.spatial_strides = [int(v) for v in spatial_strides]
        self.temporal_strides = [int(v) for v in temporal_strides]
        self.stem_kernel_size = _triple(stem_kernel_size, "stem_kernel_size")
        self.stem_stride = _triple(stem_stride, "stem_stride")
        self.stem_pool = stem_pool
        self.zero_init_residual = zero_init_residual
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.layer_type not in _LAYER_TYPES:
            raise ValueError(f"R3DConfig.layer_type must be one of {_LAYER_TYPES}, got {self.layer_type!r}.")
        num_stages = len(self.depths)
        for name in ("hidden_sizes", "conv_a_temporal_kernel_sizes", "spatial_strides", "temporal_strides"):
            values = getattr(self, name)
            if len(values) != num_stages or min(values, default=0) < 1:
                raise ValueError(
                    f"R3DConfig.{name} must hold one positive integer per stage ({num_stages}, as `depths`), got {values!r}."
                )
        if num_stages < 1 or min(self.depths) < 1:
            raise ValueError(f"R3DConfig.depths must be positive block counts, got {self.depths!r}.")
        if any(k % 2 == 0 for k in self.conv_a_temporal_kernel_sizes):
            raise ValueError(f"R3DConfig.conv_a_temporal_kernel_sizes must be odd, got {self.conv_a_temporal_kernel_sizes!r}.")
        if self.layer_type == "bottleneck" and any(h % 4 for h in self.hidden_sizes):
            raise ValueError(f"Bottleneck R3D widths must be multiples of 4 (inner width = width / 4), got {self.hidden_sizes!r}.")

    @classmethod
    def from_depth(cls, depth: int, **kwargs) -> "R3DConfig":
        """R3D-18 (`depth=18`, basic blocks) or R3D-50 (`depth=50`, bottlenecks), with keyword overrides."""
        if depth == 18:
            values = dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
        elif depth == 50:
            values = dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
        else:
            raise ValueError(f"R3D depth must be 18 or 50 (the SCE video trunks), got {depth!r}.")
        values.update(kwargs)
        return cls(**values)


def to_conv3d_layout(pixel_values: torch.Tensor) -> torch.Tensor:
    """Clips from the model-boundary layout `(B, T, C, H, W)` to the 3-D convolution layout `(B, C, T, H, W)`."""
    return pixel_values.permute(0, 2, 1, 3, 4)


def _conv(in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)) -> nn.Conv3d:
    padding = tuple(k // 2 for k in kernel)
    return nn.Conv3d(in_channels, out_channels, tuple(kernel), stride=tuple(stride), padding=padding, bias=False)


def _norm(num_features: int, config: R3DConfig, final: bool = False) -> nn.BatchNorm3d:
    norm = nn.BatchNorm3d(num_features, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
    norm.block_final_bn = final and config.zero_init_residual  # read by SCEPreTrainedModel._init_weights
    return norm


class R3DStem(nn.Module):
    """conv (1x7x7, stride (1, 2, 2)) → BN → ReLU → max-pool (1x3x3, stride (1, 2, 2)); pytorchvideo's ResNetBasicStem."""

    def __init__(self, config: R3DConfig):
        super().__init__()
        self.conv = _conv(config.num_channels, config.embedding_size, config.stem_kernel_size, config.stem_stride)
        self.norm = _norm(config.embedding_size, config)
        self.activation = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)) if config.stem_pool else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.norm(self.conv(hidden)))
        return hidden if self.pool is None else self.pool(hidden)


class R3DBasicBlock(nn.Module):
    """Residual branch of R3D-18: conv_a (kT x3x3, strided) → BN → ReLU → conv_b (1x3x3) → BN."""

    def __init__(self, config: R3DConfig, dim_in: int, dim_out: int, temporal_kernel: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv_a = _conv(dim_in, dim_out, (temporal_kernel, 3, 3), stride)
        self.norm_a = _norm(dim_out, config)
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b = _conv(dim_out, dim_out, (1, 3, 3))
        self.norm_b = _norm(dim_out, config, final=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.act_a(self.norm_a(self.conv_a(hidden)))
        return self.norm_b(self.conv_b(hidden))


class R3DBottleneckBlock(nn.Module):
    """Residual branch of R3D-50: conv_a (kT x1x1) → BN → ReLU → conv_b (1x3x3, spatially strided) → BN → ReLU
    → conv_c (1x1x1) → BN; pytorchvideo's BottleneckBlock ("v1.5": the 3x3 convolution strides)."""

    def __init__(self, config: R3DConfig, dim_in: int, dim_out: int, temporal_kernel: int, stride: tuple[int, int, int]):
        super().__init__()
        dim_inner = dim_out // 4
        self.conv_a = _conv(dim_in, dim_inner, (temporal_kernel, 1, 1), (stride[0], 1, 1))
        self.norm_a = _norm(dim_inner, config)
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b = _conv(dim_inner, dim_inner, (1, 3, 3), (1, stride[1], stride[2]))
        self.norm_b = _norm(dim_inner, config)
        self.act_b = nn.ReLU(inplace=True)
        self.conv_c = _conv(dim_inner, dim_out, (1, 1, 1))
        self.norm_c = _norm(dim_out, config, final=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.act_a(self.norm_a(self.conv_a(hidden)))
        hidden = self.act_b(self.norm_b(self.conv_b(hidden)))
        return self.norm_c(self.conv_c(hidden))


class R3DResBlock(nn.Module):
    """`activation(shortcut(x) + branch2(x))`; the shortcut (`branch1_conv` 1x1x1 + `branch1_norm`) exists only when
    the width or the stride changes, as in pytorchvideo's ResBlock."""

    def __init__(self, config: R3DConfig, dim_in: int, dim_out: int, temporal_kernel: int, stride: tuple[int, int, int]):
        super().__init__()
        if dim_in != dim_out or stride != (1, 1, 1):
            self.branch1_conv = nn.Conv3d(dim_in, dim_out, (1, 1, 1), stride=stride, bias=False)
            self.branch1_norm = _norm(dim_out, config)
        else:
            self.branch1_conv = None
            self.branch1_norm = None
        block = R3DBasicBlock if config.layer_type == "basic" else R3DBottleneckBlock
        self.branch2 = block(config, dim_in, dim_out, temporal_kernel, stride)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shortcut = hidden if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(hidden))
        return self.activation(shortcut + self.branch2(hidden))


class R3DStage(nn.Module):
    """`depth` residual blocks; the first one carries the stage's stride and width change."""

    def __init__(self, config: R3DConfig, stage: int, dim_in: int):
        super().__init__()
        dim_out = config.hidden_sizes[stage]
        stride = (config.temporal_strides[stage], config.spatial_strides[stage], config.spatial_strides[stage])
        kernel = config.conv_a_temporal_kernel_sizes[stage]
        self.res_blocks = nn.ModuleList(
            R3DResBlock(config, dim_in if i == 0 else dim_out, dim_out, kernel, stride if i == 0 else (1, 1, 1))
            for i in range(config.depths[stage])
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            hidden = block(hidden)
        return hidden


class R3DModel(nn.Module):
    """A slow-only 3-D ResNet: `blocks[0]` the stem, `blocks[1:]` the stages; global average pooling.

    Input clips `(batch, frames, channels, height, width)`; output `last_hidden_state` `(batch, width, frames',
    height', width')` and `pooler_output` `(batch, width)`, the mean over time and space.
    """

    def __init__(self, config: R3DConfig):
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = [R3DStem(config)]
        dim_in = config.embedding_size
        for stage in range(len(config.depths)):
            blocks.append(R3DStage(config, stage, dim_in))
            dim_in = config.hidden_sizes[stage]
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        hidden = to_conv3d_layout(pixel_values)  # (B, T, C, H, W) -> (B, C, T, H, W)
        hidden_states = []
        for block in self.blocks:
            hidden = block(hidden)
            if output_hidden_states:
                hidden_states.append(hidden)
        pooled = hidden.mean(dim=(2, 3, 4))  # (B, width)
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=tuple(hidden_states) if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()


__all__ = ["R3DConfig", "R3DModel", "R3D_MODEL_TYPE", "to_conv3d_layout"]
