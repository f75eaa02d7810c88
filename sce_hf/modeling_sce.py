"""SCE encoder models: the trunk used for features, and its linear-probe head.

Paper: "Similarity Contrastive Estimation for Self-Supervised Soft Contrastive Learning" (Denize et al., WACV 2023,
arXiv:2111.14585). The encoder is any transformers vision model (the paper's is ResNet-50) whose last hidden state
is pooled into one feature vector per image. Video encoders use the R3D trunk of the sibling `modeling_resnet3d.py`
(arXiv:2212.11187); their inputs are clips `(batch, frames, channels, height, width)`.

This file travels with exported checkpoints as remote code: it imports only torch, transformers and its siblings
`configuration_sce.py` and `modeling_resnet3d.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_sce import SCEConfig
from .modeling_resnet3d import R3DModel


def _small_input_stem(trunk: nn.Module, num_channels: int) -> None:
    """Make a transformers ResNet trunk take 32 px images: 3x3 stride-1 first convolution, no max-pool."""
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer

    config = trunk.config
    trunk.embedder.embedder = ResNetConvLayer(
        num_channels, config.embedding_size, kernel_size=3, stride=1, activation=config.hidden_act
    )
    trunk.embedder.pooler = nn.Identity()


def build_trunk(config: SCEConfig) -> PreTrainedModel:
    """The encoder's trunk: a transformers vision model built from `config.backbone_config`.

    A trunk's pooler that has parameters (ViT's dense + tanh) is removed: SCE pools the last hidden state itself,
    and a layer that receives no gradient would break distributed training. A video config (`config.is_video`)
    gets the R3D trunk of `modeling_resnet3d.py`, rebuilt from the config's own fields.
    """
    if config.is_video:
        return R3DModel(config.backbone_config)
    trunk = AutoModel.from_config(config.backbone_config)
    if config.small_input_stem:
        _small_input_stem(trunk, config.num_channels)
    pooler = getattr(trunk, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        trunk.pooler = None
    return trunk


class SCEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the Auto-class plumbing shared by every SCE model."""

    config_class = SCEConfig
    base_model_prefix = "sce"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; a folder saved from either SCE model class serves both the encoder
        (`AutoModel`) and the linear-probe head (`AutoModelForImageClassification`) as remote code."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_sce.SCEModel")
            auto_map.setdefault("AutoModelForImageClassification", "modeling_sce.SCEForImageClassification")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # The trunk is a transformers model and initialises itself; this covers the heads.
        if isinstance(module, nn.Linear):
            # torch's own default for Linear layers (kaiming-uniform with a = sqrt(5)), as the authors' heads use.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                # R3D marks the last norm of each residual branch (pytorchvideo starts it at zero scale).
                (init.zeros_ if getattr(module, "block_final_bn", False) else init.ones_)(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


class SCEModel(SCEPreTrainedModel):
    """The SCE encoder: a vision trunk whose last hidden state is pooled into one feature vector.

    `pooler_output` is the representation SCE learns, used for k-NN, linear probes and retrieval. Loading a
    pretraining folder (heads, teacher, queue) with this class keeps the student encoder and drops the rest.
    """

    # what a pretraining or classification folder adds around the encoder
    _keys_to_ignore_on_load_unexpected = [
        r"^teacher_", r"^projector\.", r"^predictor\.", r"^queue", r"^num_enqueued", r"^classifier\.",
    ]

    def __init__(self, config: SCEConfig):
        super().__init__(config)
        self.trunk = build_trunk(config)
        self.post_init()

    def _pool(self, last_hidden_state: torch.Tensor, trunk_pooled: torch.Tensor | None) -> torch.Tensor:
        pooling = self.config.pooling
        if pooling == "auto":
            if trunk_pooled is not None:
                return trunk_pooled.flatten(1)  # ResNet: (B, C, 1, 1); ConvNeXt: (B, C), layer-normed.
            pooling = "mean" if last_hidden_state.ndim >= 4 else "cls"
        if pooling == "mean":  # feature maps (B, C, H, W) or (B, C, T, H, W): mean over everything after C
            if last_hidden_state.ndim >= 4:
                return last_hidden_state.mean(dim=tuple(range(2, last_hidden_state.ndim)))
            return last_hidden_state.mean(dim=1)
        if last_hidden_state.ndim != 3:
            raise ValueError(f"`pooling='cls'` needs a token sequence, got a hidden state of shape {tuple(last_hidden_state.shape)}.")
        return last_hidden_state[:, 0]

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when `pixel_values` is not (batch, channels, height, width), or
        (batch, frames, channels, height, width) for a video encoder."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if self.config.is_video:
            if pixel_values.ndim != 5 or pixel_values.shape[2] != self.config.num_channels:
                raise ValueError(
                    f"A video encoder takes clips: `pixel_values` must have shape (batch_size, num_frames, "
                    f"{self.config.num_channels}, height, width), got shape {tuple(pixel_values.shape)}; prepare clips "
                    "with `sce_hf.video.SCEVideoProcessor` (a single image is a clip of 1 frame)."
                )
            return
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {self.config.num_channels}, height, width), got a "
                f"{pixel_values.ndim}-D tensor of shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must have {self.config.num_channels} channels (dim 1), got {pixel_values.shape[1]} "
                f"(shape {tuple(pixel_values.shape)}); convert images with the model's image processor."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Images prepared by [`SCEImageProcessor`]; for a video encoder (`config.is_video`), clips of shape
                `(batch_size, num_frames, num_channels, height, width)` prepared by `SCEVideoProcessor`.
            output_hidden_states (`bool`, *optional*):
                Also return the trunk's hidden states.
            return_dict (`bool`, *optional*):
                Return a [`BaseModelOutputWithPooling`] instead of a tuple.

        Returns:
            [`BaseModelOutputWithPooling`] with `last_hidden_state` (the trunk's; `(batch_size, channels, h, w)` for
            convolutional trunks, `(batch_size, channels, t, h, w)` for R3D, `(batch_size, tokens, hidden)` for
            transformers) and `pooler_output`
            `(batch_size, feature_dim)`, the SCE representation.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.check_pixel_values(pixel_values)
        trunk_kwargs = {"return_dict": True}
        if output_hidden_states is not None:
            trunk_kwargs["output_hidden_states"] = output_hidden_states
        outputs = self.trunk(pixel_values, **trunk_kwargs)
        pooled = self._pool(outputs.last_hidden_state, getattr(outputs, "pooler_output", None))
        result = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=getattr(outputs, "hidden_states", None),
        )
        return result if return_dict else result.to_tuple()


class SCEForImageClassification(SCEPreTrainedModel):
    """An SCE encoder with a linear head, for linear probes and the image-classification pipeline.

    With `config.freeze_encoder` the encoder's parameters do not require gradients (so DDP and optimizers see only
    the head) and it stays in eval mode (batch-norm statistics frozen), as a linear probe requires.
    """

    def __init__(self, config: SCEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.sce = SCEModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.feature_dim, config.num_labels)
        self.post_init()
        if config.freeze_encoder:
            self.sce.requires_grad_(False)

    def train(self, mode: bool = True) -> "SCEForImageClassification":
        super().train(mode)
        if self.config.freeze_encoder:
            self.sce.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Images prepared by [`SCEImageProcessor`].
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices; when given, the output carries the cross-entropy `loss`.

        Returns:
            [`ImageClassifierOutput`] with `logits` `(batch_size, num_labels)` and, with `labels`, `loss`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            outputs = self.sce(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"`labels` must have shape ({logits.shape[0]},), got {tuple(labels.shape)}.")
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device))
        result = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return result if return_dict else result.to_tuple()


__all__ = ["SCEPreTrainedModel", "SCEModel", "SCEForImageClassification", "build_trunk"]
