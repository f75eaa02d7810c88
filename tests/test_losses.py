"""Numerical tests of `sce_hf.losses` against naive float64 references written from the method spec.

The references below are deliberately slow and plain: Python loops over anchors and candidates, math.exp and
math.log on Python floats (float64). They follow the formulas of SCE_SPEC.md and share no code with
`sce_hf/losses.py`:

- `_reference_paper_batch`: §1.2, the paper's batch form (teacher-teacher similarities with the indicator
  1_{i != k}, no queue).
- `_reference_sce`: §1.3 (candidates [positive | queue], teacher logit a constant 0 at the positive, or -inf with
  the paper's exact exclusion, §8.1) and §1.4 (candidates [gathered keys | queue], positive at column
  offset + i, 1e9 subtracted from the teacher similarity at the positive before dividing by tau_m).
- `_reference_infonce`, `_reference_ressl`, `_reference_positive_probability`: the terms of §1.7.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch

from sce_hf.losses import infonce_loss, ressl_loss, sce_loss


LARGE_NUM = 1e9  # §1.8: subtracted from the teacher similarity at the positive in in-batch-keys mode

SIZES = [(3, 5, 7), (8, 16, 32), (13, 12, 50)]  # (B, d, K), distinct and not powers of two
COEFFS = [0.0, 0.3, 0.5, 1.0]
TEMPERATURES = [(0.1, 0.07), (0.2, 0.05), (0.5, 0.5)]  # (temperature tau, target_temperature tau_m)
# mode -> keyword arguments of sce_loss (the queue is passed separately)
MODES = {
    "default": {},
    "exact_self_exclusion": {"exact_self_exclusion": True},
    "in_batch_keys_with_queue": {"in_batch_keys": True},
    "in_batch_keys_without_queue": {"in_batch_keys": True},
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP spin contention on a busy CPU (up to 1000x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _unit_rows(rows: int, dim: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def _inputs(batch_size: int, dim: int, queue_size: int, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    query = _unit_rows(batch_size, dim, generator, dtype)
    key = _unit_rows(batch_size, dim, generator, dtype)
    queue = _unit_rows(queue_size, dim, generator, dtype) if queue_size else None
    return query, key, queue


def _mode_inputs(mode: str, batch_size: int, dim: int, queue_size: int, seed: int = 0):
    """(query, key, queue, kwargs, reference mode) for one of MODES."""
    query, key, queue = _inputs(batch_size, dim, queue_size, seed)
    if mode == "in_batch_keys_without_queue":
        queue = None
    reference_mode = {"default": "code", "exact_self_exclusion": "exact"}.get(mode, "in_batch")
    return query, key, queue, dict(MODES[mode]), reference_mode


# ----------------------------------------------------------------------------------------------------------------
# Naive float64 references (loops, no torch ops)
# ----------------------------------------------------------------------------------------------------------------


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(map(operator.mul, a, b))  # sum_i a_i * b_i


def _rows(tensor: torch.Tensor | None) -> list[list[float]]:
    return [] if tensor is None else tensor.detach().to(torch.float64).tolist()


def _candidates(key, queue, mode, gathered_keys=None, positive_offset=0):
    """Per anchor i: the candidate vectors and the column of its positive (§1.3, §1.4, §8.4)."""
    keys, past = _rows(key), _rows(queue)
    if mode in ("code", "exact"):  # [k_i | queue], positive at column 0
        return [([keys[i]] + past, 0) for i in range(len(keys))]
    batch_keys = keys if gathered_keys is None else _rows(gathered_keys)  # [gathered keys | queue]
    return [(batch_keys + past, positive_offset + i) for i in range(len(keys))]


def _teacher_logits(key_i, candidates, positive, mode, target_temperature):
    logits = []
    for j, c in enumerate(candidates):
        if j != positive:
            logits.append(_dot(key_i, c) / target_temperature)
        elif mode == "code":
            logits.append(0.0)  # §1.3: constant 0 at the positive, not -inf
        elif mode == "exact":
            logits.append(-math.inf)  # §8.1: the paper's exact exclusion
        else:
            logits.append((_dot(key_i, c) - LARGE_NUM) / target_temperature)  # §1.4: mask, then divide
    return logits


def _softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(x) for x in logits]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _log_softmax(logits: list[float]) -> list[float]:
    log_total = math.log(math.fsum(math.exp(x) for x in logits))
    return [x - log_total for x in logits]


def _reference_sce(query, key, queue, *, coeff, temperature, target_temperature, mode, gathered_keys=None,
                   positive_offset=0) -> float:
    """§1.3 / §1.4: -mean_i sum_j y_ij log_softmax(a_i)_j with y_i = coeff * onehot + (1 - coeff) softmax(b_i)."""
    queries, keys = _rows(query), _rows(key)
    losses = []
    for i, (candidates, positive) in enumerate(_candidates(key, queue, mode, gathered_keys, positive_offset)):
        student = [_dot(queries[i], c) / temperature for c in candidates]
        target = _softmax(_teacher_logits(keys[i], candidates, positive, mode, target_temperature))
        mixed = [coeff * (j == positive) + (1 - coeff) * t for j, t in enumerate(target)]
        log_p = _log_softmax(student)
        losses.append(-math.fsum(y * lp for y, lp in zip(mixed, log_p)))
    return math.fsum(losses) / len(losses)


def _reference_paper_batch(z1, z2, *, coeff, temperature, target_temperature) -> float:
    """§1.2 verbatim: z1 the student outputs, z2 the teacher outputs, N instances, no queue."""
    z1, z2 = _rows(z1), _rows(z2)
    n = len(z1)
    total = 0.0
    for i in range(n):
        s_denominator = math.fsum(math.exp(_dot(z2[i], z2[j]) / target_temperature) for j in range(n) if j != i)
        p_denominator = math.fsum(math.exp(_dot(z1[i], z2[j]) / temperature) for j in range(n))
        for k in range(n):
            s = (i != k) * math.exp(_dot(z2[i], z2[k]) / target_temperature) / s_denominator
            w = coeff * (i == k) + (1 - coeff) * s
            p = math.exp(_dot(z1[i], z2[k]) / temperature) / p_denominator
            total += w * math.log(p)
    return -total / n


def _reference_positive_probability(query, key, queue, *, temperature, in_batch=False, gathered_keys=None,
                                    positive_offset=0) -> list[float]:
    """p_iP: the student probability of the positive among all candidates."""
    queries = _rows(query)
    mode = "in_batch" if in_batch else "code"
    probabilities = []
    for i, (candidates, positive) in enumerate(_candidates(key, queue, mode, gathered_keys, positive_offset)):
        exps = [math.exp(_dot(queries[i], c) / temperature) for c in candidates]
        probabilities.append(exps[positive] / math.fsum(exps))
    return probabilities


def _reference_infonce(query, key, queue, *, temperature, in_batch=False, gathered_keys=None,
                       positive_offset=0) -> float:
    """-mean_i log p_iP (MoCo's loss with the queue, plus the other batch keys in in-batch mode)."""
    p = _reference_positive_probability(query, key, queue, temperature=temperature, in_batch=in_batch,
                                        gathered_keys=gathered_keys, positive_offset=positive_offset)
    return -math.fsum(math.log(x) for x in p) / len(p)


def _reference_ressl(query, key, queue, *, temperature, target_temperature, in_batch=False, gathered_keys=None,
                     positive_offset=0) -> float:
    """§1.7 eztorch ReSSL: -mean_i sum_{j in N} s_ij log p'_ij, the positive removed from both distributions."""
    queries, keys = _rows(query), _rows(key)
    mode = "in_batch" if in_batch else "code"
    losses = []
    for i, (candidates, positive) in enumerate(_candidates(key, queue, mode, gathered_keys, positive_offset)):
        others = [c for j, c in enumerate(candidates) if j != positive]
        s = _softmax([_dot(keys[i], c) / target_temperature for c in others])
        log_p_prime = _log_softmax([_dot(queries[i], c) / temperature for c in others])
        losses.append(-math.fsum(a * b for a, b in zip(s, log_p_prime)))
    return math.fsum(losses) / len(losses)


def _reference_ceiling(query, key, queue, *, temperature, in_batch=False) -> float:
    """§1.7 "ceiling" term: mean_i -log(1 - p_iP)."""
    p = _reference_positive_probability(query, key, queue, temperature=temperature, in_batch=in_batch)
    return -math.fsum(math.log(1 - x) for x in p) / len(p)


# ----------------------------------------------------------------------------------------------------------------
# 1. sce_loss against the looped reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature, target_temperature", TEMPERATURES)
@pytest.mark.parametrize("coeff", COEFFS)
@pytest.mark.parametrize("batch_size, dim, queue_size", SIZES)
def test_sce_loss__matches_looped_reference(batch_size, dim, queue_size, coeff, temperature, target_temperature,
                                            mode):
    query, key, queue, kwargs, reference_mode = _mode_inputs(mode, batch_size, dim, queue_size, seed=batch_size)
    loss = sce_loss(query, key, queue, coeff=coeff, temperature=temperature,
                    target_temperature=target_temperature, **kwargs)
    expected = _reference_sce(query, key, queue, coeff=coeff, temperature=temperature,
                              target_temperature=target_temperature, mode=reference_mode)
    assert loss.shape == ()
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


@pytest.mark.parametrize("coeff", COEFFS)
@pytest.mark.parametrize("batch_size, dim", [(3, 5), (8, 16), (13, 12)])
def test_sce_loss__in_batch_keys_without_queue_is_paper_batch_form(batch_size, dim, coeff):
    # §1.2 and §1.4: with the batch keys as the only candidates, the code's form is the paper's formula.
    query, key, _ = _inputs(batch_size, dim, 0, seed=7)
    loss = sce_loss(query, key, None, coeff=coeff, temperature=0.2, target_temperature=0.05, in_batch_keys=True)
    expected = _reference_paper_batch(query, key, coeff=coeff, temperature=0.2, target_temperature=0.05)
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_loss__default_arguments(dtype):
    # Defaults per DESIGN.md: coeff 0.5, temperature 0.1, target_temperature 0.07, code mode (constant-0 logit).
    query, key, queue = _inputs(8, 16, 32, seed=3)
    loss = sce_loss(query.to(dtype), key.to(dtype), queue.to(dtype))
    expected = _reference_sce(query, key, queue, coeff=0.5, temperature=0.1, target_temperature=0.07, mode="code")
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10 if dtype == torch.float64 else 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 2. Distributed in-batch keys
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.parametrize("world_size, batch_size", [(2, 3), (3, 5)])
def test_sce_loss__distributed_in_batch_keys(world_size, batch_size, with_queue):
    dim, queue_size, coeff, temperature, target_temperature = 12, 19, 0.3, 0.2, 0.05
    query, key, queue = _inputs(world_size * batch_size, dim, queue_size, seed=11)
    queue = queue if with_queue else None
    gathered = torch.cat([key[r * batch_size:(r + 1) * batch_size] for r in range(world_size)])  # rank order
    per_rank = []
    for rank in range(world_size):
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        loss = sce_loss(query[rows], key[rows], queue, coeff=coeff, temperature=temperature,
                        target_temperature=target_temperature, in_batch_keys=True, gathered_keys=gathered,
                        positive_offset=rank * batch_size)
        expected = _reference_sce(query[rows], key[rows], queue, coeff=coeff, temperature=temperature,
                                  target_temperature=target_temperature, mode="in_batch", gathered_keys=gathered,
                                  positive_offset=rank * batch_size)
        assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)
        per_rank.append(loss)
    single_process = sce_loss(query, key, queue, coeff=coeff, temperature=temperature,
                              target_temperature=target_temperature, in_batch_keys=True)
    assert torch.stack(per_rank).mean().item() == pytest.approx(single_process.item(), rel=0, abs=1e-10)


def test_sce_loss__distributed_wrong_offset_changes_the_loss():
    # The positive must be looked up at rank * B: offset 0 on rank 1 points at rank 0's keys.
    query, key, queue = _inputs(6, 12, 10, seed=12)
    gathered = key
    right = sce_loss(query[3:], key[3:], queue, in_batch_keys=True, gathered_keys=gathered, positive_offset=3)
    wrong = sce_loss(query[3:], key[3:], queue, in_batch_keys=True, gathered_keys=gathered, positive_offset=0)
    assert abs(right.item() - wrong.item()) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 3. coeff = 1 is InfoNCE
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature, target_temperature", TEMPERATURES)
def test_sce_loss__coeff_one_equals_infonce(mode, temperature, target_temperature):
    query, key, queue, kwargs, _ = _mode_inputs(mode, 8, 16, 32, seed=5)
    sce = sce_loss(query, key, queue, coeff=1.0, temperature=temperature, target_temperature=target_temperature,
                   **kwargs)
    kwargs.pop("exact_self_exclusion", None)
    infonce = infonce_loss(query, key, queue, temperature=temperature, **kwargs)
    assert sce.item() == pytest.approx(infonce.item(), rel=0, abs=1e-10)


@pytest.mark.parametrize("in_batch, with_queue", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("batch_size, dim, queue_size", SIZES)
def test_infonce_loss__matches_explicit_formula(batch_size, dim, queue_size, temperature, in_batch, with_queue):
    query, key, queue = _inputs(batch_size, dim, queue_size, seed=6)
    queue = queue if with_queue else None
    loss = infonce_loss(query, key, queue, temperature=temperature, in_batch_keys=in_batch)
    expected = _reference_infonce(query, key, queue, temperature=temperature, in_batch=in_batch)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


def test_infonce_loss__distributed_in_batch_keys():
    query, key, queue = _inputs(6, 12, 9, seed=13)
    loss = infonce_loss(query[2:4], key[2:4], queue, temperature=0.2, in_batch_keys=True, gathered_keys=key,
                        positive_offset=2)
    expected = _reference_infonce(query[2:4], key[2:4], queue, temperature=0.2, in_batch=True, gathered_keys=key,
                                  positive_offset=2)
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 4. §1.7 decomposition: SCE = coeff * InfoNCE + (1 - coeff) * (ReSSL + ceiling)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_batch, with_queue", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("temperature, target_temperature", TEMPERATURES)
@pytest.mark.parametrize("batch_size, dim, queue_size", SIZES)
def test_ressl_loss__matches_looped_reference(batch_size, dim, queue_size, temperature, target_temperature,
                                              in_batch, with_queue):
    query, key, queue = _inputs(batch_size, dim, queue_size, seed=8)
    queue = queue if with_queue else None
    loss = ressl_loss(query, key, queue, temperature=temperature, target_temperature=target_temperature,
                      in_batch_keys=in_batch)
    expected = _reference_ressl(query, key, queue, temperature=temperature, target_temperature=target_temperature,
                                in_batch=in_batch)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


@pytest.mark.parametrize("in_batch, with_queue", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("temperature, target_temperature", TEMPERATURES)
def test_sce_loss__coeff_zero_is_ressl_plus_ceiling(temperature, target_temperature, in_batch, with_queue):
    query, key, queue = _inputs(13, 12, 50, seed=9)
    queue = queue if with_queue else None
    mode_kwargs = {"in_batch_keys": True} if in_batch else {"exact_self_exclusion": True}
    sce = sce_loss(query, key, queue, coeff=0.0, temperature=temperature, target_temperature=target_temperature,
                   **mode_kwargs)
    ressl = ressl_loss(query, key, queue, temperature=temperature, target_temperature=target_temperature,
                       in_batch_keys=in_batch)
    ceiling = _reference_ceiling(query, key, queue, temperature=temperature, in_batch=in_batch)
    assert sce.item() == pytest.approx(ressl.item() + ceiling, rel=0, abs=1e-10)
    assert ceiling > 0  # the student softmax keeps the positive (§8.2): SCE at coeff 0 is not ReSSL


@pytest.mark.parametrize("coeff", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("in_batch, with_queue", [(False, True), (True, True), (True, False)])
def test_sce_loss__decomposition_general_coeff(coeff, in_batch, with_queue):
    temperature, target_temperature = 0.2, 0.05
    query, key, queue = _inputs(8, 16, 32, seed=10)
    queue = queue if with_queue else None
    mode_kwargs = {"in_batch_keys": True} if in_batch else {"exact_self_exclusion": True}
    sce = sce_loss(query, key, queue, coeff=coeff, temperature=temperature, target_temperature=target_temperature,
                   **mode_kwargs)
    infonce = _reference_infonce(query, key, queue, temperature=temperature, in_batch=in_batch)
    ressl = _reference_ressl(query, key, queue, temperature=temperature, target_temperature=target_temperature,
                             in_batch=in_batch)
    ceiling = _reference_ceiling(query, key, queue, temperature=temperature, in_batch=in_batch)
    expected = coeff * infonce + (1 - coeff) * (ressl + ceiling)
    assert sce.item() == pytest.approx(expected, rel=0, abs=1e-10)


@pytest.mark.parametrize("coeff", [0.0, 0.5])
def test_sce_loss__default_mode_close_to_exact_for_large_queue(coeff):
    # §8.1: the constant-0 teacher logit puts an extra target mass (1 - coeff) / Z on the positive, Z ~ K.
    query, key, queue = _inputs(8, 16, 4096, seed=14)
    official = sce_loss(query, key, queue, coeff=coeff, temperature=0.1, target_temperature=0.07)
    exact = sce_loss(query, key, queue, coeff=coeff, temperature=0.1, target_temperature=0.07,
                     exact_self_exclusion=True)
    relative = abs(official.item() - exact.item()) / abs(exact.item())
    assert 0 < relative < 1e-3


def test_sce_loss__exact_self_exclusion_ignored_by_in_batch_keys():
    # In in-batch mode the positive's teacher logit is always excluded, so the flag changes nothing.
    query, key, queue = _inputs(8, 16, 32, seed=15)
    plain = sce_loss(query, key, queue, in_batch_keys=True)
    flagged = sce_loss(query, key, queue, in_batch_keys=True, exact_self_exclusion=True)
    assert flagged.item() == pytest.approx(plain.item(), rel=0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 5. Gradient paths (§1.8): only the query receives a gradient
# ----------------------------------------------------------------------------------------------------------------


def _no_gradient(tensor: torch.Tensor) -> bool:
    return tensor.grad is None or bool((tensor.grad == 0).all())


@pytest.mark.parametrize("mode", list(MODES) + ["distributed"])
@pytest.mark.parametrize("loss_name", ["sce", "infonce", "ressl"])
def test_losses__gradient_reaches_only_query(loss_name, mode):
    query, key, queue = _inputs(5, 12, 7, seed=16, dtype=torch.float32)
    gathered = _inputs(10, 12, 0, seed=17, dtype=torch.float32)[1]
    kwargs = {"in_batch_keys": True, "gathered_keys": gathered, "positive_offset": 5} if mode == "distributed" \
        else dict(MODES[mode])
    if mode == "in_batch_keys_without_queue":
        queue = None
    if loss_name != "sce":
        kwargs.pop("exact_self_exclusion", None)
    loss_fn = {"sce": sce_loss, "infonce": infonce_loss, "ressl": ressl_loss}[loss_name]
    leaves = [t.requires_grad_() for t in (query, key, queue, gathered) if t is not None]
    loss_fn(query, key, queue, **kwargs).backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert all(_no_gradient(t) for t in leaves[1:])


# ----------------------------------------------------------------------------------------------------------------
# 6. Cases computed by hand
# ----------------------------------------------------------------------------------------------------------------


def test_sce_loss__hand_computed_default_mode():
    # q = k = (1, 0), queue = [(0, 1)], tau = 0.1, coeff = 0.5.
    # Student logits: [q.k, q.u] / tau = [10, 0]. Teacher logits: [0 (constant), k.u / tau_m = 0] -> target
    # [1/2, 1/2], mixed: [0.5 + 0.5 * 1/2, 0.5 * 1/2] = [3/4, 1/4].
    # Loss = -(3/4 * (10 - log(e^10 + 1)) + 1/4 * (0 - log(e^10 + 1))) = log(e^10 + 1) - 7.5.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    expected = math.log(math.exp(10) + 1) - 7.5
    assert sce_loss(q, q.clone(), u, coeff=0.5, temperature=0.1).item() == pytest.approx(expected, abs=1e-12)
    # With exact self-exclusion the target is [0, 1] and the mix [1/2, 1/2]: log(e^10 + 1) - 5.
    expected_exact = math.log(math.exp(10) + 1) - 5
    loss = sce_loss(q, q.clone(), u, coeff=0.5, temperature=0.1, exact_self_exclusion=True)
    assert loss.item() == pytest.approx(expected_exact, abs=1e-12)


def test_sce_loss__hand_computed_two_queue_entries():
    # q = (0.6, 0.8), k = (0.8, 0.6), queue = [(0, 1), (1, 0)], tau = tau_m = 0.1, coeff = 0.3.
    # Student logits: [0.96, 0.8, 0.6] / 0.1 = [9.6, 8, 6].
    # Teacher logits (code default): [0, 0.6 / 0.1, 0.8 / 0.1] = [0, 6, 8].
    q = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    k = torch.tensor([[0.8, 0.6]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    log_z_student = math.log(math.exp(9.6) + math.exp(8) + math.exp(6))
    z_teacher = 1 + math.exp(6) + math.exp(8)
    y = [0.3 + 0.7 / z_teacher, 0.7 * math.exp(6) / z_teacher, 0.7 * math.exp(8) / z_teacher]
    expected = -(y[0] * (9.6 - log_z_student) + y[1] * (8 - log_z_student) + y[2] * (6 - log_z_student))
    loss = sce_loss(q, k, u, coeff=0.3, temperature=0.1, target_temperature=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # InfoNCE on the same inputs: -log(e^9.6 / (e^9.6 + e^8 + e^6)).
    assert infonce_loss(q, k, u, temperature=0.1).item() == pytest.approx(log_z_student - 9.6, abs=1e-12)
    # ReSSL: target softmax([6, 8]) over the queue, student log_softmax([8, 6]) over the queue.
    log_z_queue = math.log(math.exp(8) + math.exp(6))
    s = [math.exp(6) / (math.exp(6) + math.exp(8)), math.exp(8) / (math.exp(6) + math.exp(8))]
    expected_ressl = -(s[0] * (8 - log_z_queue) + s[1] * (6 - log_z_queue))
    assert ressl_loss(q, k, u, temperature=0.1, target_temperature=0.1).item() == pytest.approx(
        expected_ressl, abs=1e-12
    )


def test_sce_loss__hand_computed_in_batch_pair():
    # Two instances, no queue, in-batch keys: q = k = [(1, 0), (0, 1)], tau = 0.5, coeff = 0.5.
    # Each row has one other key, so the teacher target over it is 1 (own key masked): mix [1/2, 1/2].
    # Student logits per row: [1/0.5, 0] = [2, 0] (own key, other key) -> loss log(e^2 + 1) - 1 per row.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss = sce_loss(z, z.clone(), None, coeff=0.5, temperature=0.5, target_temperature=0.1, in_batch_keys=True)
    assert loss.item() == pytest.approx(math.log(math.exp(2) + 1) - 1, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 7. Dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_sce_loss__half_inputs_give_float32(dtype, tolerance, mode):
    query, key, queue, kwargs, _ = _mode_inputs(mode, 8, 16, 32, seed=18)
    half = [t.to(dtype) if t is not None else None for t in (query, key, queue)]
    loss = sce_loss(*half, **kwargs)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # Same numbers as a float32 computation on the rounded inputs (the upcast happens before any arithmetic) ...
    upcast = sce_loss(*[t.float() if t is not None else None for t in half], **kwargs)
    assert loss.item() == pytest.approx(upcast.item(), rel=1e-6, abs=1e-6)
    # ... and close to the float32 computation on the original inputs, up to the rounding of the inputs.
    full = sce_loss(*[t.float() if t is not None else None for t in (query, key, queue)], **kwargs)
    assert loss.item() == pytest.approx(full.item(), rel=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("loss_name", ["sce", "infonce", "ressl"])
def test_losses__output_dtype(loss_name, dtype):
    query, key, queue = _inputs(3, 5, 7, seed=19, dtype=dtype)
    loss_fn = {"sce": sce_loss, "infonce": infonce_loss, "ressl": ressl_loss}[loss_name]
    loss = loss_fn(query, key, queue)
    assert loss.shape == ()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_sce_loss__half_embeddings_with_float32_queue():
    # The usual AMP call: student and teacher outputs in float16, the queue buffer in float32.
    query, key, queue = _inputs(8, 16, 32, seed=25, dtype=torch.float32)
    loss = sce_loss(query.half(), key.half(), queue)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sce_loss(query.half().float(), key.half().float(), queue).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 8. Bad inputs
# ----------------------------------------------------------------------------------------------------------------


def _bad_inputs():
    query, key, queue = _inputs(3, 5, 7, seed=20, dtype=torch.float32)
    return {
        "query_rank": ((query[0], key[0], queue), {}, "query"),
        "query_rank_3d": ((query[None], key[None], queue), {}, "query"),
        "key_shape": ((query, key[:2], queue), {}, "key"),
        "key_width": ((query, key[:, :4], queue), {}, "key"),
        "queue_width": ((query, key, queue[:, :4]), {}, "queue"),
        "queue_rank": ((query, key, queue[0]), {}, "queue"),
        "temperature_zero": ((query, key, queue), {"temperature": 0.0}, r"(?<!target_)temperature"),
        "temperature_negative": ((query, key, queue), {"temperature": -0.1}, r"(?<!target_)temperature"),
        "target_temperature_zero": ((query, key, queue), {"target_temperature": 0.0}, "target_temperature"),
        "target_temperature_negative": ((query, key, queue), {"target_temperature": -1.0}, "target_temperature"),
        "temperature_nan": ((query, key, queue), {"temperature": float("nan")}, r"(?<!target_)temperature"),
        "no_queue_no_in_batch_keys": ((query, key, None), {}, "queue"),
        "empty_queue_no_in_batch_keys": ((query, key, queue[:0]), {}, "queue"),
        "single_key_in_batch_no_queue": ((query[:1], key[:1], None), {"in_batch_keys": True}, "queue"),
        "gathered_keys_width": (
            (query, key, queue), {"in_batch_keys": True, "gathered_keys": torch.zeros(6, 4)}, "gathered_keys"),
        "positive_offset_out_of_range": (
            (query, key, queue), {"in_batch_keys": True, "gathered_keys": torch.cat([key, key]),
                                  "positive_offset": 4}, "positive_offset"),
        "positive_offset_negative": (
            (query, key, queue), {"in_batch_keys": True, "gathered_keys": torch.cat([key, key]),
                                  "positive_offset": -1}, "positive_offset"),
        "gathered_keys_without_in_batch_keys": ((query, key, queue), {"gathered_keys": key}, "gathered_keys"),
    }


_BAD_CASES = [
    (loss_name, case)
    for loss_name in ("sce", "infonce", "ressl")
    for case in _bad_inputs()
    if not (loss_name == "infonce" and case.startswith("target_temperature"))  # infonce has no tau_m
]


@pytest.mark.parametrize("loss_name, case", _BAD_CASES)
def test_losses__bad_input_raises(loss_name, case):
    args, kwargs, match = _bad_inputs()[case]
    loss_fn = {"sce": sce_loss, "infonce": infonce_loss, "ressl": ressl_loss}[loss_name]
    with pytest.raises(ValueError, match=match):
        loss_fn(*args, **kwargs)


@pytest.mark.parametrize("coeff", [-0.1, 1.5, float("nan")])
def test_sce_loss__coeff_outside_unit_interval_raises(coeff):
    query, key, queue = _inputs(3, 5, 7, seed=21)
    with pytest.raises(ValueError, match="coeff"):
        sce_loss(query, key, queue, coeff=coeff)


def test_sce_loss__single_key_with_queue_is_fine():
    # In-batch mode with one key still has the queue as candidates.
    query, key, queue = _inputs(1, 5, 7, seed=22)
    loss = sce_loss(query, key, queue, in_batch_keys=True)
    expected = _reference_sce(query, key, queue, coeff=0.5, temperature=0.1, target_temperature=0.07,
                              mode="in_batch")
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 9. Sanity
# ----------------------------------------------------------------------------------------------------------------


def _orthonormal_keys_and_queue(mode: str, batch_size: int = 5, dim: int = 20, queue_size: int = 7):
    """key = e_0 .. e_{B-1}; queue rows e_B .. e_{B+K-1}, orthogonal to every key (None without a queue)."""
    eye = torch.eye(dim, dtype=torch.float64)
    queue = None if mode == "in_batch_keys_without_queue" else eye[batch_size:batch_size + queue_size]
    return eye[:batch_size], queue


@pytest.mark.parametrize("coeff", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("mode", list(MODES))
def test_sce_loss__aligned_query_beats_query_on_another_instance(mode, coeff):
    # (Not at coeff = 0: there the target has no mass on the positive and the student is pushed away from it.)
    key, queue = _orthonormal_keys_and_queue(mode)
    kwargs = dict(MODES[mode])
    aligned = sce_loss(key.clone(), key, queue, coeff=coeff, **kwargs)
    # A student that matches another candidate instance instead of its own key.
    other = key.roll(1, dims=0) if queue is None else queue[:1].expand_as(key).clone()
    misaligned = sce_loss(other, key, queue, coeff=coeff, **kwargs)
    assert torch.isfinite(aligned) and torch.isfinite(misaligned)
    assert aligned.item() < misaligned.item()


@pytest.mark.parametrize("mode", list(MODES))
def test_sce_loss__coeff_one_aligned_query_beats_random_query(mode):
    # With coeff = 1 (InfoNCE) perfect alignment is near-optimal: loss ~ log(1 + (C - 1) e^{-1/tau}) ~ 0.
    key, queue = _orthonormal_keys_and_queue(mode)
    kwargs = dict(MODES[mode])
    aligned = sce_loss(key.clone(), key, queue, coeff=1.0, **kwargs)
    random_query = _inputs(5, 20, 0, seed=23)[0]
    assert aligned.item() < 1e-3 < sce_loss(random_query, key, queue, coeff=1.0, **kwargs).item()


def test_sce_loss__aligned_query_with_orthogonal_queue_closed_form():
    # q = k = e_i and K orthogonal queue rows, code default. Teacher logits are all 0, so the target is uniform
    # 1/(K + 1) and y_P = coeff + (1 - coeff)/(K + 1). Student logits: [1/tau, 0, ..., 0]. Hence
    #     loss = log(e^{1/tau} + K) - y_P / tau.
    # For coeff < 1 this is about (1 - coeff)/tau: SCE does not reward a one-hot student when the target spreads
    # mass over the other instances (the §1.7 "ceiling" term), so a random query can score lower.
    key, queue = _orthonormal_keys_and_queue("default")
    tau, coeff, k = 0.1, 0.5, queue.shape[0]
    y_positive = coeff + (1 - coeff) / (k + 1)
    expected = math.log(math.exp(1 / tau) + k) - y_positive / tau
    aligned = sce_loss(key.clone(), key, queue, coeff=coeff, temperature=tau)
    assert aligned.item() == pytest.approx(expected, abs=1e-12)
    random_query = _inputs(5, 20, 0, seed=23)[0]
    assert sce_loss(random_query, key, queue, coeff=coeff, temperature=tau).item() < aligned.item()


def test_sce_loss__does_not_modify_inputs():
    query, key, queue = _inputs(8, 16, 32, seed=24)
    copies = [t.clone() for t in (query, key, queue)]
    sce_loss(query, key, queue)
    sce_loss(query, key, queue, in_batch_keys=True)
    assert all(torch.equal(a, b) for a, b in zip((query, key, queue), copies))
