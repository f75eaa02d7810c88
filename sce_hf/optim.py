"""Optimisation of SCE training: LARS, parameter groups, and the learning-rate and momentum schedules."""

from __future__ import annotations

import math

import torch


def cosine_momentum(step: int, max_steps: int, initial: float = 0.99, final: float = 1.0) -> float:
    r"""The teacher's EMA momentum at optimizer step `step` (0-based), rising from `initial` to `final`.

    .. math:: m(t) = f - (f - m_0)\,\frac{\cos(\pi t / T) + 1}{2}, \qquad T = \text{max\_steps} - 1

    so the first update uses ``initial`` and the last one ``final`` (SCE_SPEC §2.2, §8.10).
    """
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}.")
    if not 0 <= step < max_steps:
        raise ValueError(f"`step` must be in [0, {max_steps - 1}], got {step}.")
    if max_steps == 1:
        return initial
    progress = step / (max_steps - 1)
    return final - (final - initial) * (math.cos(math.pi * progress) + 1) / 2


def warmup_cosine_lr(step: int, max_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Learning rate at optimizer step `step`: linear warm-up from 0 over `warmup_steps`, then cosine to `final_lr`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (peak_lr - final_lr) * (math.cos(math.pi * progress) + 1) / 2




class LARS(torch.optim.Optimizer):
    r"""SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as the authors train SCE.

    For a parameter w with gradient g, weight decay λ and trust coefficient η:

    .. math::
        g \leftarrow g + \lambda w, \qquad
        g \leftarrow g \cdot \eta \frac{\lVert w \rVert}{\lVert g \rVert} \;\;(\text{when both norms are} > 0), \qquad
        v \leftarrow \mu v + g, \qquad w \leftarrow w - \text{lr}\, v

    Tensors with one dimension or fewer (batch-norm scales and shifts, biases) get neither the weight decay nor the
    trust ratio (SCE_SPEC §8.11).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"`lr` must be >= 0, got {lr}.")
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if param.ndim > 1:
                    grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad)
                    trust_ratio = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        group["trust_coefficient"] * param_norm / (grad_norm + group["eps"]),
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust_ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: weight decay on tensors with 2+ dimensions, none on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    """LARS, SGD (momentum, no Nesterov) or AdamW over `parameter_groups(model, weight_decay)`."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "cosine_momentum", "parameter_groups", "warmup_cosine_lr"]
