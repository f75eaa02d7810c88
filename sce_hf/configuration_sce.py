"""SCE model configuration.

This file travels with exported checkpoints as remote code: it imports only transformers (and, for the video
trunk, a sibling file), never `sce_hf`.
"""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, PreTrainedConfig

from .modeling_resnet3d import R3D_MODEL_TYPE, R3DConfig


_POOLING_MODES = ("auto", "mean", "cls")
_MOMENTUM_SCHEDULES = ("cosine", "constant")
_LOSS_FUNCTIONS = ("sce", "ressl")

# Head sizes of SCE_SPEC §2.1, per preset. The encoder architecture of each preset is in `_preset_backbone`.
_RESNET50_HEADS: dict[str, Any] = dict(
    projector_hidden_size=4096,
    projector_output_size=256,
    projector_num_layers=3,
    projector_last_batchnorm=True,
    projector_last_bias=False,
    predictor_hidden_size=4096,
    predictor_num_layers=2,
)
_PRESET_HEADS: dict[str, dict[str, Any]] = {
    "resnet50": _RESNET50_HEADS,
    # The authors' CIFAR-10 heads (their first code release): 512 -> 512 -> 128 with a bias, no predictor.
    "resnet18": dict(
        projector_hidden_size=512,
        projector_output_size=128,
        projector_num_layers=2,
        projector_last_batchnorm=False,
        projector_last_bias=True,
        predictor_hidden_size=512,
        predictor_num_layers=0,
    ),
    # Video: R3D-18 512 -> 1024 -> 1024 -> 256 with predictor 256 -> 1024 -> 256; R3D-50 as ResNet-50.
    "r3d18": {**_RESNET50_HEADS, "projector_hidden_size": 1024, "predictor_hidden_size": 1024},
    "r3d50": _RESNET50_HEADS,
}
PRESETS = ("resnet50", "resnet18", "resnet18-small", "resnet50-small", "r3d18", "r3d50")
VIDEO_PRESETS = ("r3d18", "r3d50")


def _preset_backbone(name: str) -> dict[str, Any]:
    if name == "r3d18":
        return dict(model_type=R3D_MODEL_TYPE, layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
    if name == "r3d50":
        return dict(model_type=R3D_MODEL_TYPE, layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
    if name.startswith("resnet50"):
        return dict(model_type="resnet", layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
    return dict(model_type="resnet", layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])


def _as_backbone_config(backbone_config: dict | PreTrainedConfig | None) -> PreTrainedConfig:
    if backbone_config is None:
        # The paper's trunk: torchvision's ResNet-50 ("v1.5": the 3x3 convolution strides).
        return CONFIG_MAPPING["resnet"](downsample_in_bottleneck=False)
    if isinstance(backbone_config, PreTrainedConfig):
        return backbone_config
    if isinstance(backbone_config, dict):
        backbone_config = dict(backbone_config)
        model_type = backbone_config.pop("model_type", None)
        if model_type == R3D_MODEL_TYPE:  # the video trunk: defined beside this file, unknown to transformers
            return R3DConfig(**backbone_config)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"`backbone_config` must name a transformers model type under 'model_type' (for example 'resnet', "
                f"'convnext' or 'vit'), got {model_type!r}."
            )
        return CONFIG_MAPPING[model_type](**backbone_config)
    raise ValueError(
        f"`backbone_config` must be a dict, a PreTrainedConfig or None, got {type(backbone_config).__name__}."
    )


class SCEConfig(PreTrainedConfig):
    r"""
    Configuration of an SCE encoder ([`SCEModel`]), its linear-probe head ([`SCEForImageClassification`]) and
    its self-supervised pretraining module ([`SCEForPreTraining`]). The defaults describe the paper's ImageNet
    setting (ResNet-50 trunk, 3-layer projector to 256, 2-layer predictor, queue of 65,536, τ = 0.1, τ_m = 0.07,
    λ = 0.5, momentum 0.99 → 1 on a cosine), the one of the authors' released ResNet-50 checkpoints.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The trunk: any transformers vision model config (ResNet, ConvNeXt, ViT, ...), as a config or as its
            dict with a `model_type` key, or the video trunk's [`R3DConfig`] (`model_type` `"r3d"`: R3D-18/50, whose
            inputs are clips `(batch, frames, channels, height, width)`). Defaults to ResNet-50.
        small_input_stem (`bool`, *optional*, defaults to `False`):
            Replace a ResNet trunk's 7x7 stride-2 stem and max-pool with a 3x3 stride-1 convolution and no
            max-pool, as the paper does on 32 px images. Only valid with a ResNet trunk.
        pooling (`str`, *optional*, defaults to `"auto"`):
            How the trunk's last hidden state becomes one feature vector: `"mean"` (global average over space or
            tokens), `"cls"` (the first token) or `"auto"` (the trunk's parameter-free pooler when it has one,
            else the mean of a feature map, else the first token).
        projector_hidden_size (`int`, *optional*, defaults to 4096):
            Width of the projector's hidden layers.
        projector_output_size (`int`, *optional*, defaults to 256):
            Size of the embeddings the loss compares.
        projector_num_layers (`int`, *optional*, defaults to 3):
            Number of linear layers of the projector.
        projector_last_batchnorm (`bool`, *optional*, defaults to `True`):
            End the projector with a BatchNorm without affine parameters (the ResNet-50 heads).
        projector_last_bias (`bool`, *optional*, defaults to `False`):
            Give the projector's last linear layer a bias (the CIFAR heads).
        predictor_hidden_size (`int`, *optional*, defaults to 4096):
            Width of the predictor's hidden layer.
        predictor_num_layers (`int`, *optional*, defaults to 2):
            Number of linear layers of the student's predictor; 0 means no predictor.
        queue_size (`int`, *optional*, defaults to 65536):
            Number of past teacher keys kept as candidates; 0 means no queue (then `in_batch_keys` must be set).
        student_temperature (`float`, *optional*, defaults to 0.1):
            Student temperature τ. (Not named `temperature`: transformers reserves it for generation.)
        teacher_temperature (`float`, *optional*, defaults to 0.07):
            Teacher (target) temperature τ_m, the sharpening one.
        coeff (`float`, *optional*, defaults to 0.5):
            Weight λ of the one-hot positive in the target; 1 gives InfoNCE (MoCo), 0 the relational target.
        in_batch_keys (`bool`, *optional*, defaults to `False`):
            Also use the teacher keys of the whole (gathered) batch as candidates (SCE_SPEC §1.4).
        exact_self_exclusion (`bool`, *optional*, defaults to `False`):
            Give the positive's teacher logit -inf (the paper) instead of 0 (the authors' code).
        loss_function (`str`, *optional*, defaults to `"sce"`):
            `"sce"`, or `"ressl"` (the positive removed from both distributions; a baseline for comparisons).
        initial_momentum (`float`, *optional*, defaults to 0.99):
            Teacher EMA momentum at the first step.
        final_momentum (`float`, *optional*, defaults to 1.0):
            Teacher EMA momentum at the last step (reached with the cosine schedule).
        momentum_schedule (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` (per step, from `initial_momentum` to `final_momentum`) or `"constant"`.
        symmetric (`bool`, *optional*, defaults to `True`):
            Every global view serves as teacher and student; `False` makes view 0 the only teacher view
            (the authors' weak-teacher CIFAR setting).
        num_global_views (`int`, *optional*, defaults to 2):
            Number of leading views the teacher sees; later views are local crops seen by the student only.
        split_batchnorm_groups (`int`, *optional*, defaults to 1):
            Split the teacher's batch statistics into this many interleaved groups, simulating that many devices
            on one (the authors' single-GPU CIFAR setting uses 8). 1 keeps plain batch norm.
        shuffle_teacher_batch (`bool`, *optional*, defaults to `False`):
            Permute the teacher's batch before its forward and restore the order after (MoCo's shuffle-BN; useful
            with `split_batchnorm_groups > 1`).
        freeze_encoder (`bool`, *optional*, defaults to `False`):
            For [`SCEForImageClassification`]: train only the linear head (a linear probe).
        classifier_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before the linear head of [`SCEForImageClassification`].
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of layers without a dedicated rule.

    Example:

    ```python
    >>> from sce_hf import SCEConfig, SCEModel
    >>> config = SCEConfig.from_preset("resnet18-small")
    >>> model = SCEModel(config)
    >>> config.feature_dim
    512
    ```
    """

    model_type = "sce"

    def __init__(
        self,
        backbone_config: dict | PreTrainedConfig | None = None,
        small_input_stem: bool = False,
        pooling: str = "auto",
        projector_hidden_size: int = 4096,
        projector_output_size: int = 256,
        projector_num_layers: int = 3,
        projector_last_batchnorm: bool = True,
        projector_last_bias: bool = False,
        predictor_hidden_size: int = 4096,
        predictor_num_layers: int = 2,
        queue_size: int = 65536,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        coeff: float = 0.5,
        in_batch_keys: bool = False,
        exact_self_exclusion: bool = False,
        loss_function: str = "sce",
        initial_momentum: float = 0.99,
        final_momentum: float = 1.0,
        momentum_schedule: str = "cosine",
        symmetric: bool = True,
        num_global_views: int = 2,
        split_batchnorm_groups: int = 1,
        shuffle_teacher_batch: bool = False,
        freeze_encoder: bool = False,
        classifier_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.backbone_config = _as_backbone_config(backbone_config)
        self.small_input_stem = small_input_stem
        self.pooling = pooling
        self.projector_hidden_size = projector_hidden_size
        self.projector_output_size = projector_output_size
        self.projector_num_layers = projector_num_layers
        self.projector_last_batchnorm = projector_last_batchnorm
        self.projector_last_bias = projector_last_bias
        self.predictor_hidden_size = predictor_hidden_size
        self.predictor_num_layers = predictor_num_layers
        self.queue_size = queue_size
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.coeff = coeff
        self.in_batch_keys = in_batch_keys
        self.exact_self_exclusion = exact_self_exclusion
        self.loss_function = loss_function
        self.initial_momentum = initial_momentum
        self.final_momentum = final_momentum
        self.momentum_schedule = momentum_schedule
        self.symmetric = symmetric
        self.num_global_views = num_global_views
        self.split_batchnorm_groups = split_batchnorm_groups
        self.shuffle_teacher_batch = shuffle_teacher_batch
        self.freeze_encoder = freeze_encoder
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"`{name}` must be {expected}, got {getattr(self, name)!r}.")

        if self.small_input_stem and self.backbone_config.model_type != "resnet":
            raise ValueError(
                f"`small_input_stem=True` needs a ResNet trunk, got backbone model_type "
                f"{self.backbone_config.model_type!r}."
            )
        if self.pooling not in _POOLING_MODES:
            fail("pooling", f"one of {_POOLING_MODES}")
        for name in ("projector_hidden_size", "projector_output_size", "projector_num_layers", "predictor_hidden_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        for name in ("predictor_num_layers", "queue_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "a non-negative integer")
        for name in ("student_temperature", "teacher_temperature"):
            if not getattr(self, name) > 0:
                fail(name, "> 0")
        for name in ("coeff", "initial_momentum", "final_momentum", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "in [0, 1]")
        if self.loss_function not in _LOSS_FUNCTIONS:
            fail("loss_function", f"one of {_LOSS_FUNCTIONS}")
        if self.momentum_schedule not in _MOMENTUM_SCHEDULES:
            fail("momentum_schedule", f"one of {_MOMENTUM_SCHEDULES}")
        for name in ("num_global_views", "split_batchnorm_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        if self.queue_size == 0 and not self.in_batch_keys:
            raise ValueError(
                "`queue_size=0` leaves SCE with no candidates besides the positive: set `queue_size > 0` or "
                "`in_batch_keys=True`."
            )

    @property
    def feature_dim(self) -> int:
        """Size of the pooled feature vector (`pooler_output`) of the trunk."""
        hidden_sizes = getattr(self.backbone_config, "hidden_sizes", None)
        if hidden_sizes:
            return int(hidden_sizes[-1])
        return int(self.backbone_config.hidden_size)

    @property
    def is_video(self) -> bool:
        """Whether the trunk is the video R3D trunk, which takes clips `(batch, frames, channels, height, width)`."""
        return getattr(self.backbone_config, "model_type", None) == R3D_MODEL_TYPE

    @property
    def num_channels(self) -> int:
        """Number of input image channels the trunk expects."""
        return int(getattr(self.backbone_config, "num_channels", 3))

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SCEConfig":
        """Build the configuration of a named preset, with keyword overrides.

        Presets: `"resnet50"` (the paper's ImageNet model and heads), `"resnet18"` (ResNet-18 with the authors'
        CIFAR heads), `"resnet18-small"` (the same with the 3x3 stride-1 stem and no max-pool for 32 px images,
        the authors' CIFAR-10 model), `"resnet50-small"`, and the video models `"r3d18"` and `"r3d50"` (R3D trunks
        and heads of SCE_SPEC §2.1, with the Kinetics settings of §4: τ_m = 0.05, queue 65,536).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {PRESETS}.")
        values: dict[str, Any] = dict(_PRESET_HEADS[name.split("-")[0]])
        values["backbone_config"] = _preset_backbone(name)
        values["small_input_stem"] = name.endswith("-small")
        if name == "resnet18-small":  # The authors' CIFAR-10 recipe (SCE_SPEC §4).
            values.update(queue_size=4096, teacher_temperature=0.05, momentum_schedule="constant", symmetric=False,
                          split_batchnorm_groups=8, shuffle_teacher_batch=True)
        if name in VIDEO_PRESETS:  # The authors' Kinetics recipes (SCE_SPEC §4).
            values.update(queue_size=65536, teacher_temperature=0.05, momentum_schedule="cosine", symmetric=True)
        values.update(kwargs)
        return cls(**values)


__all__ = ["R3DConfig", "SCEConfig"]
