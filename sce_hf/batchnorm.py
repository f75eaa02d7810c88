"""Batch norm that computes its statistics over groups of the batch, simulating several devices on one.

The authors' single-GPU CIFAR setting splits the teacher's batch statistics into 8 groups (SCE_SPEC §2.4). Here the
groups are contiguous slices of the batch, as a data-parallel launcher splits a global batch across processes: a
model whose batch norms are split into G groups, run on a batch of G·B samples, computes what G processes with
plain batch norm compute on B samples each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over `num_groups` contiguous slices of the batch; any input rank (N, C, *).

    In eval mode it is plain batch norm. In training, each slice is normalised with its own statistics and the
    running statistics become the mean of the per-slice updates. State-dict keys equal those of `nn.BatchNorm*d`.
    """

    def __init__(self, num_features: int, num_groups: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_groups < 1:
            raise ValueError(f"`num_groups` must be >= 1, got {num_groups}.")
        self.num_groups = num_groups

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SplitBatchNorm expects an input of shape (N, C, *), got {tuple(input.shape)}.")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or self.num_groups == 1:
            return super().forward(input)
        if input.shape[0] % self.num_groups:
            raise ValueError(
                f"SplitBatchNorm with {self.num_groups} groups needs a batch size divisible by {self.num_groups}, "
                f"got {input.shape[0]}."
            )
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        outputs, means, variances = [], [], []
        for chunk in input.chunk(self.num_groups):
            running_mean = self.running_mean.clone() if self.running_mean is not None else None
            running_var = self.running_var.clone() if self.running_var is not None else None
            outputs.append(
                F.batch_norm(chunk, running_mean, running_var, self.weight, self.bias, True, momentum or 0.0, self.eps)
            )
            means.append(running_mean)
            variances.append(running_var)
        if self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outputs)


def convert_to_split_batchnorm(module: nn.Module, num_groups: int) -> nn.Module:
    """Replace every `nn.BatchNorm1d/2d/3d` inside `module` by a :class:`SplitBatchNorm` with the same state."""
    if num_groups == 1:
        return module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features,
            num_groups,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        reference = module.weight if module.affine else module.running_mean
        if reference is not None:
            split = split.to(device=reference.device, dtype=reference.dtype)
        split.load_state_dict(module.state_dict())
        split.train(module.training)
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_to_split_batchnorm(child, num_groups))
    return module


__all__ = ["SplitBatchNorm", "convert_to_split_batchnorm"]
