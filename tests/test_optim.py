"""LARS, parameter groups and the schedules."""

import math

import pytest
import torch

from sce_hf.optim import LARS, build_optimizer, parameter_groups, warmup_cosine_lr


def test_lars__one_step_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([2.0])
    optimizer = LARS([weight, bias], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.01)
    optimizer.step()
    # 2-D: g + wd*w = (2.1, 2.8), norm 3.5; trust = 0.01 * 5 / 3.5; step = lr * trust * g'.
    trust = 0.01 * 5 / 3.5
    torch.testing.assert_close(weight.data, torch.tensor([[3.0 - 0.1 * trust * 2.1, 4.0 - 0.1 * trust * 2.8]]))
    # 1-D: no weight decay, no trust ratio.
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1 * 2.0]))
    # Second step: the momentum buffer carries the first update.
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    torch.testing.assert_close(bias.data, torch.tensor([0.8 - 0.1 * (0.9 * 2.0 + 2.0)]))


def test_parameter_groups__no_decay_on_one_dimensional_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2, bias=False))
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3), (2, 4)]
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,)]
    assert isinstance(build_optimizer(model, "lars", 0.1, 1e-6), LARS)
    assert isinstance(build_optimizer(model, "adamw", 0.1, 1e-6), torch.optim.AdamW)
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        build_optimizer(model, "adam", 0.1, 0.0)


def test_warmup_cosine__linear_warmup_then_cosine_to_zero():
    peak = 4.8
    assert warmup_cosine_lr(0, 100, 10, peak) == pytest.approx(peak / 10)
    assert warmup_cosine_lr(9, 100, 10, peak) == pytest.approx(peak)
    assert warmup_cosine_lr(10, 100, 10, peak) == pytest.approx(peak)
    assert warmup_cosine_lr(55, 100, 10, peak) == pytest.approx(peak * (math.cos(math.pi * 0.5) + 1) / 2)
    assert warmup_cosine_lr(100, 100, 10, peak) == pytest.approx(0.0)
    assert warmup_cosine_lr(0, 100, 0, peak) == pytest.approx(peak)
