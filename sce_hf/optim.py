"""Schedules of SCE training: the teacher's momentum and the learning rate."""

from __future__ import annotations

import math


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


__all__ = ["cosine_momentum", "warmup_cosine_lr"]
