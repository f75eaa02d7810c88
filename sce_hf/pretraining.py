"""SCE pretraining: student encoder + projector + predictor, momentum teacher, and a queue of teacher keys.

One training step (SCE_SPEC §1.5, §1.6, §2):

    out = model(pixel_values=views)             # loss over view pairs; out.teacher_keys: this step's gathered keys
    accelerator.backward(out.loss); optimizer.step()
    model.update_teacher(momentum)              # EMA of the student's parameters (explicit, never in forward)
    model.enqueue(out.teacher_keys)                     # FIFO queue, after the loss used its snapshot

`forward` never changes state besides batch-norm statistics: the EMA and the enqueue are calls the training step
makes, once per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .batchnorm import convert_to_split_batchnorm
from .configuration_sce import SCEConfig
from .losses import ressl_loss, sce_loss
from .modeling_sce import SCEModel, SCEPreTrainedModel
from .optim import cosine_momentum


@dataclass
class SCEPreTrainingOutput(ModelOutput):
    """Output of [`SCEForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): the SCE loss averaged over the view pairs.
        teacher_keys (`torch.FloatTensor` of shape `(num_keys, projector_output_size)`): this step's teacher keys gathered
            from every process (view 0 of all processes, then view 1, ...), to pass to `enqueue` after the
            optimizer step.
        num_pairs (`int`): number of (student view, teacher view) pairs averaged.
    """

    loss: torch.FloatTensor | None = None
    teacher_keys: torch.FloatTensor | None = None
    num_pairs: int | None = None


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bias: bool, last_batchnorm: bool) -> nn.Sequential:
    """`num_layers` linear layers; the hidden ones are Linear (no bias) → BatchNorm1d → ReLU, the last one a Linear
    (with a bias if asked) optionally followed by a BatchNorm1d without affine parameters."""
    layers: list[nn.Module] = []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        in_dim = hidden_dim
    layers.append(nn.Linear(in_dim, out_dim, bias=last_bias))
    if last_batchnorm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def build_projector(config: SCEConfig) -> nn.Sequential:
    """Projector g: (B, feature_dim) → (B, projector_output_size).

    The ResNet-50 heads end with a BatchNorm1d without affine parameters; the CIFAR heads end with a biased Linear
    (SCE_SPEC §2.1).
    """
    return _mlp(
        config.feature_dim, config.projector_hidden_size, config.projector_output_size, config.projector_num_layers,
        config.projector_last_bias, config.projector_last_batchnorm,
    )


def build_predictor(config: SCEConfig) -> nn.Module:
    """Predictor h of the student only: (B, out) → (B, out); an identity when `predictor_num_layers == 0`."""
    if config.predictor_num_layers == 0:
        return nn.Identity()
    out = config.projector_output_size
    return _mlp(out, config.predictor_hidden_size, out, config.predictor_num_layers, last_bias=False, last_batchnorm=False)


def _gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process in rank order (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SCEForPreTraining(SCEPreTrainedModel):
    """SCE's self-supervised pretraining model (SCE_SPEC §1–2).

    Holds the student (`sce`: the encoder users get; `projector`; `predictor`), the momentum teacher
    (`teacher_encoder`, `teacher_projector`, copies of the student updated by EMA of the parameters only, never by
    gradient) and the queue of past teacher keys (`queue` (K, d), one key per row, with its pointer).

    `save_pretrained` saves all of it, so `SCEForPreTraining.from_pretrained` resumes training from the folder;
    [`SCEForPreTraining.save_encoder`] writes the encoder alone, an [`SCEModel`] folder users load with `AutoModel`.
    """

    def __init__(self, config: SCEConfig):
        super().__init__(config)
        self.sce = SCEModel(config)
        self.projector = build_projector(config)
        self.predictor = build_predictor(config)
        self.teacher_encoder = SCEModel(config)
        self.teacher_projector = build_projector(config)
        self.register_buffer("queue", torch.zeros(config.queue_size, config.projector_output_size))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long))
        self.post_init()
        if config.split_batchnorm_groups > 1:
            convert_to_split_batchnorm(self.teacher_encoder, config.split_batchnorm_groups)
            convert_to_split_batchnorm(self.teacher_projector, config.split_batchnorm_groups)
        self.reset_teacher()

    # ----------------------------------------------------------------------------------------------------------
    # Initialisation and loading

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SCEForPreTraining) and module.queue.numel():
            init.copy_(module.queue, F.normalize(torch.randn_like(module.queue), dim=1))
            init.zeros_(module.queue_ptr)
            init.zeros_(module.num_enqueued)

    def _teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.sce, self.teacher_encoder), (self.projector, self.teacher_projector)]

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Copy the student's encoder and projector (parameters and buffers) into the teacher and freeze it."""
        for student, teacher in self._teacher_pairs():
            teacher.load_state_dict(student.state_dict())
            teacher.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a folder without a teacher (an exported encoder) starts the
        teacher as a copy of the student, as a fresh run does."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if any(key.startswith("teacher_") for key in info["missing_keys"]):
            model.reset_teacher()
        for _, teacher in model._teacher_pairs():
            teacher.requires_grad_(False)
        return (model, info) if output_loading_info else model

    def save_encoder(self, save_directory: str, **kwargs) -> None:
        """Save the student encoder alone as an [`SCEModel`] folder (config, weights, remote code)."""
        self.sce.save_pretrained(save_directory, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Embeddings

    def student_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """q = normalize(h(g(f(x)))): (B, C, H, W) → (B, projector_output_size), float32."""
        features = self.sce(pixel_values).pooler_output
        return F.normalize(self.predictor(self.projector(features)).float(), dim=1)

    @torch.no_grad()
    def teacher_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """k = normalize(g_m(f_m(x))): (B, C, H, W) → (B, projector_output_size), float32, no gradient.

        With `shuffle_teacher_batch`, the batch is permuted before the forward and restored after, so split batch
        norm sees random groups (MoCo's shuffle-BN).
        """
        if self.config.shuffle_teacher_batch:
            permutation = torch.randperm(pixel_values.shape[0], device=pixel_values.device)
            pixel_values = pixel_values[permutation]
        features = self.teacher_encoder(pixel_values).pooler_output
        keys = F.normalize(self.teacher_projector(features).float(), dim=1)
        if self.config.shuffle_teacher_batch:
            keys = keys[torch.argsort(permutation)]
        return keys

    # ----------------------------------------------------------------------------------------------------------
    # The loss

    def view_pairs(self, num_views: int) -> list[tuple[int, int]]:
        """(student view, teacher view) pairs the loss averages (SCE_SPEC §1.6, §8.12).

        Symmetric: every global view i < G teaches every other view j ≠ i, G·(V−1) pairs. Otherwise view 0 alone
        teaches views 1..V−1, V−1 pairs.
        """
        num_teacher_views = min(self.config.num_global_views, num_views) if self.config.symmetric else 1
        return [(j, i) for i in range(num_teacher_views) for j in range(num_views) if j != i]

    def forward(self, pixel_values: list[torch.Tensor] | tuple[torch.Tensor, ...], **kwargs) -> SCEPreTrainingOutput:
        r"""
        Args:
            pixel_values (list of `torch.Tensor`, each `(batch_size, num_channels, height_v, width_v)`):
                The augmented views of one batch, global views first. Each view goes through its own forward, so
                batch-norm statistics are per view (SCE_SPEC §8.9).

        Returns:
            [`SCEPreTrainingOutput`]: the loss, and the gathered teacher keys to enqueue after the optimizer step.
        """
        if isinstance(pixel_values, torch.Tensor) or len(pixel_values) < 2:
            raise ValueError(
                "`pixel_values` must be a list of at least 2 views, each a (batch_size, channels, height, width) "
                f"tensor, got {type(pixel_values).__name__}"
                + ("" if isinstance(pixel_values, torch.Tensor) else f" of length {len(pixel_values)}")
                + "."
            )
        batch_size = pixel_values[0].shape[0]
        if any(view.shape[0] != batch_size for view in pixel_values):
            raise ValueError(f"Every view must hold the same images, got batch sizes {[v.shape[0] for v in pixel_values]}.")

        pairs = self.view_pairs(len(pixel_values))
        teacher_views = sorted({i for _, i in pairs})
        student_views = sorted({j for j, _ in pairs})
        keys = {i: self.teacher_embed(pixel_values[i]) for i in teacher_views}  # each (B, d)
        queries = {j: self.student_embed(pixel_values[j]) for j in student_views}  # each (B, d)

        queue = self.queue.detach().clone() if self.config.queue_size > 0 else None  # snapshot before the enqueue
        gathered = {i: _gather_no_grad(keys[i]) for i in teacher_views}  # each (W·B, d)
        loss_kwargs = dict(
            temperature=self.config.student_temperature,
            target_temperature=self.config.teacher_temperature,
            in_batch_keys=self.config.in_batch_keys,
        )
        if self.config.loss_function == "sce":
            loss_fn = sce_loss
            loss_kwargs.update(coeff=self.config.coeff, exact_self_exclusion=self.config.exact_self_exclusion)
        else:
            loss_fn = ressl_loss
        losses = []
        for j, i in pairs:
            if self.config.in_batch_keys:
                loss_kwargs.update(gathered_keys=gathered[i], positive_offset=_rank() * batch_size)
            losses.append(loss_fn(queries[j], keys[i], queue, **loss_kwargs))
        loss = torch.stack(losses).mean()
        return SCEPreTrainingOutput(loss=loss, teacher_keys=torch.cat([gathered[i] for i in teacher_views]), num_pairs=len(pairs))

    # ----------------------------------------------------------------------------------------------------------
    # State updates, called by the training step once per optimizer step

    def momentum_at(self, step: int, max_steps: int) -> float:
        """The EMA momentum for optimizer step `step` of `max_steps` under the configured schedule."""
        if self.config.momentum_schedule == "constant":
            return self.config.initial_momentum
        return cosine_momentum(step, max_steps, self.config.initial_momentum, self.config.final_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_teacher ← m·θ_teacher + (1 − m)·θ_student on parameters only; batch-norm buffers stay the teacher's."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum}.")
        for student, teacher in self._teacher_pairs():
            teacher_params = list(teacher.parameters())
            student_params = [p.detach() for p in student.parameters()]
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (N, d) into the FIFO queue at its pointer, wrapping around; the oldest keys go first."""
        queue_size = self.queue.shape[0]
        if queue_size == 0:
            return
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"`keys` must have shape (num_keys, {self.queue.shape[1]}), got {tuple(keys.shape)}.")
        keys = keys.detach().to(self.queue.dtype)[-queue_size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % queue_size
        self.queue[rows] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % queue_size)
        self.num_enqueued.add_(keys.shape[0])

    @property
    def queue_fill(self) -> float:
        """Fraction of the queue holding real keys rather than its random initialisation."""
        if self.queue.shape[0] == 0:
            return 1.0
        return min(1.0, self.num_enqueued.item() / self.queue.shape[0])

    def convert_sync_batchnorm(self) -> "SCEForPreTraining":
        """Use SyncBatchNorm everywhere (multi-GPU runs only; it does not run on CPU processes)."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)


__all__ = ["SCEForPreTraining", "SCEPreTrainingOutput", "build_projector", "build_predictor"]
