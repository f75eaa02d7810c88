"""SCEForPreTraining: queue, momentum teacher, view pairs, split batch norm, saving."""

import math

import pytest
import torch

from sce_hf import SCEForPreTraining, SCEModel
from sce_hf.batchnorm import SplitBatchNorm, convert_to_split_batchnorm
from sce_hf.optim import cosine_momentum
from tests.tiny import tiny_config


def _views(num_views=2, batch_size=4, sizes=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = sizes or [16] * num_views
    return [torch.randn(batch_size, 3, s, s, generator=generator) for s in sizes]


def test_queue__fifo_with_wrap_around():
    model = SCEForPreTraining(tiny_config(queue_size=5, projector_output_size=2))
    keys = torch.arange(7, dtype=torch.float32).repeat_interleave(2).view(7, 2)  # key r = (r, r)
    model.enqueue(keys[:3])
    assert model.queue[:3, 0].tolist() == [0, 1, 2] and int(model.queue_ptr) == 3
    assert math.isclose(model.queue_fill, 3 / 5)
    model.enqueue(keys[3:7])  # 4 keys from pointer 3: rows 3, 4, then wrap to 0, 1
    assert model.queue[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(model.queue_ptr) == 2 and model.queue_fill == 1.0
    model.enqueue(torch.arange(16, dtype=torch.float32).view(8, 2))  # more keys than rows: the last 5 stay
    assert sorted(model.queue[:, 0].tolist()) == [6, 8, 10, 12, 14]


def test_queue__initialised_with_unit_norm_rows_and_refused_wrong_width():
    model = SCEForPreTraining(tiny_config())
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(model.queue.shape[0]))
    with pytest.raises(ValueError, match="keys.*must have shape"):
        model.enqueue(torch.zeros(3, 7))


def test_queue__the_loss_uses_the_snapshot_before_enqueue():
    model = SCEForPreTraining(tiny_config())
    views = _views()
    torch.manual_seed(0)
    loss_before = model(pixel_values=views).loss
    torch.manual_seed(0)
    again = model(pixel_values=views)
    assert torch.equal(loss_before, again.loss)  # forward changes no queue state
    model.enqueue(again.teacher_keys)
    torch.manual_seed(0)
    assert not torch.equal(model(pixel_values=views).loss, loss_before)


def test_teacher__starts_as_a_frozen_copy_of_the_student():
    model = SCEForPreTraining(tiny_config())
    for (name, s), (_, t) in zip(model.sce.named_parameters(), model.teacher_encoder.named_parameters()):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    assert all(not p.requires_grad for p in model.teacher_projector.parameters())


def test_teacher__receives_no_gradient():
    model = SCEForPreTraining(tiny_config())
    model(pixel_values=_views()).loss.backward()
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    assert all(p.grad is None for p in model.teacher_projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_teacher__equals_an_ema_recomputed_from_recorded_student_weights():
    model = SCEForPreTraining(tiny_config())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    max_steps = 6
    student = lambda: {  # noqa: E731
        **{f"sce.{n}": p.detach().clone() for n, p in model.sce.named_parameters()},
        **{f"projector.{n}": p.detach().clone() for n, p in model.projector.named_parameters()},
    }
    expected = student()  # the teacher starts as the student
    for step in range(max_steps):
        output = model(pixel_values=_views(seed=step))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        momentum = model.momentum_at(step, max_steps)
        model.update_teacher(momentum)
        model.enqueue(output.teacher_keys)
        current = student()
        expected = {n: momentum * expected[n] + (1 - momentum) * current[n] for n in expected}
    teacher = {
        **{f"sce.{n}": p for n, p in model.teacher_encoder.named_parameters()},
        **{f"projector.{n}": p for n, p in model.teacher_projector.named_parameters()},
    }
    assert teacher.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(teacher[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # Batch-norm buffers are the teacher's own, not copies of the student's.
    student_bn = model.sce.trunk.embedder.embedder.normalization.running_mean
    teacher_bn = model.teacher_encoder.trunk.embedder.embedder.normalization.running_mean
    assert not torch.equal(student_bn, teacher_bn)


def test_momentum__cosine_schedule_from_m0_to_one():
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(99, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(33, 67, 0.99, 1.0) == pytest.approx(0.995)  # the midpoint
    values = [cosine_momentum(t, 50) for t in range(50)]
    assert values == sorted(values)
    constant = SCEForPreTraining(tiny_config(momentum_schedule="constant", initial_momentum=0.99))
    assert constant.momentum_at(40, 50) == 0.99
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(100, 100)


@pytest.mark.parametrize(
    "symmetric, num_views, num_global, expected_pairs",
    [(True, 2, 2, 2), (True, 6, 2, 10), (False, 2, 2, 1), (False, 6, 2, 5), (True, 3, 1, 2)],
)
def test_view_pairs__count(symmetric, num_views, num_global, expected_pairs):
    model = SCEForPreTraining(tiny_config(symmetric=symmetric, num_global_views=num_global))
    pairs = model.view_pairs(num_views)
    assert len(pairs) == expected_pairs
    assert all(i < (num_global if symmetric else 1) and j != i for j, i in pairs)


def test_multicrop__teacher_on_global_crops_only_and_queue_fed_by_both_global_views():
    model = SCEForPreTraining(tiny_config(queue_size=48))
    calls = []
    model.teacher_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    output = model(pixel_values=_views(6, sizes=[16, 16, 14, 12, 10, 8]))
    assert output.num_pairs == 10
    assert calls == [16, 16]
    assert output.teacher_keys.shape == (2 * 4, 10)  # both global views' keys, view 0 first


def test_multicrop__loss_is_the_mean_over_pairs():
    from sce_hf.losses import sce_loss

    model = SCEForPreTraining(tiny_config()).eval()  # eval: batch norm independent of the forward order
    views = _views(3, sizes=[16, 16, 12])
    output = model(pixel_values=views)
    q = [model.student_embed(v) for v in views]
    k = [model.teacher_embed(v) for v in views[:2]]
    kwargs = dict(coeff=0.5, temperature=0.1, target_temperature=0.07)
    pairs = [(1, 0), (2, 0), (0, 1), (2, 1)]
    expected = sum(sce_loss(q[j], k[i], model.queue, **kwargs) for j, i in pairs) / 4
    torch.testing.assert_close(output.loss, expected)


def test_forward__bad_views():
    model = SCEForPreTraining(tiny_config())
    with pytest.raises(ValueError, match="pixel_values.*list of at least 2 views"):
        model(pixel_values=torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="same images.*batch sizes"):
        model(pixel_values=[torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)])
    with pytest.raises(ValueError, match="pixel_values.*3 channels"):
        model(pixel_values=[torch.randn(4, 1, 16, 16)] * 2)


def test_split_batchnorm__equals_separate_batches():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(5)
    plain.weight.data.uniform_(0.5, 1.5)
    split = convert_to_split_batchnorm(torch.nn.Sequential(plain), 2)[0]
    assert isinstance(split, SplitBatchNorm)
    x = torch.randn(8, 5, 3, 3)
    reference = torch.cat([torch.nn.functional.batch_norm(c, None, None, plain.weight, plain.bias, True) for c in x.chunk(2)])
    torch.testing.assert_close(split(x), reference)
    with pytest.raises(ValueError, match="divisible by 2"):
        split(torch.randn(7, 5, 3, 3))
    split.eval()
    torch.testing.assert_close(split(x), torch.nn.functional.batch_norm(x, split.running_mean, split.running_var, plain.weight, plain.bias, False))


def test_split_batchnorm__teacher_of_the_cifar_setting():
    model = SCEForPreTraining(tiny_config(split_batchnorm_groups=4, shuffle_teacher_batch=True))
    assert any(isinstance(m, SplitBatchNorm) for m in model.teacher_encoder.modules())
    assert not any(isinstance(m, SplitBatchNorm) for m in model.sce.modules())
    output = model(pixel_values=_views(batch_size=8))
    assert torch.isfinite(output.loss)


def test_save_load__pretraining_folder_round_trip(tmp_path):
    model = SCEForPreTraining(tiny_config())
    output = model(pixel_values=_views())
    output.loss.backward()
    model.update_teacher(0.5)
    model.enqueue(output.teacher_keys)
    model.save_pretrained(tmp_path / "pretraining")
    loaded = SCEForPreTraining.from_pretrained(tmp_path / "pretraining")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert not any(p.requires_grad for p in loaded.teacher_encoder.parameters())
    # The exported encoder alone: an SCEModel folder with encoder weights only.
    model.save_encoder(tmp_path / "encoder")
    encoder = SCEModel.from_pretrained(tmp_path / "encoder")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "encoder" / "model.safetensors").keys()
    assert all(k.startswith("trunk.") for k in keys)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder.eval()(x).pooler_output, model.sce.eval()(x).pooler_output)


def test_save_load__encoder_folder_starts_the_teacher_as_the_student(tmp_path):
    SCEModel(tiny_config()).save_pretrained(tmp_path)
    model = SCEForPreTraining.from_pretrained(tmp_path)
    for s, t in zip(model.sce.parameters(), model.teacher_encoder.parameters()):
        assert torch.equal(s, t)


def test_split_batchnorm__keeps_dtype_and_momentum_semantics():
    plain = torch.nn.BatchNorm1d(3, momentum=None).double()
    split = convert_to_split_batchnorm(torch.nn.Sequential(plain), 2)[0]
    assert split.weight.dtype == torch.float64 and split.running_mean.dtype == torch.float64
    x = torch.randn(8, 3, dtype=torch.float64) * 3 + 2
    split(x)
    halves = [torch.nn.BatchNorm1d(3, momentum=None).double() for _ in range(2)]
    for half, chunk in zip(halves, x.chunk(2)):
        half(chunk)
    torch.testing.assert_close(split.running_mean, (halves[0].running_mean + halves[1].running_mean) / 2)
    frozen = convert_to_split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=0.0)), 2)[0]
    frozen(x.float())
    assert torch.equal(frozen.running_mean, torch.zeros(3))


def test_loss_function__ressl_baseline_uses_ressl_loss():
    from sce_hf.losses import ressl_loss

    model = SCEForPreTraining(tiny_config(loss_function="ressl")).eval()
    views = _views()
    output = model(pixel_values=views)
    q = [model.student_embed(v) for v in views]
    k = [model.teacher_embed(v) for v in views]
    expected = (ressl_loss(q[1], k[0], model.queue, temperature=0.1, target_temperature=0.07)
                + ressl_loss(q[0], k[1], model.queue, temperature=0.1, target_temperature=0.07)) / 2
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(ValueError, match="loss_function"):
        tiny_config(loss_function="byol")
