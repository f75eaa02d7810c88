"""Losses of Similarity Contrastive Estimation and of the two methods it interpolates.

SCE: Denize et al., "Similarity Contrastive Estimation for Self-Supervised Soft Contrastive Learning",
WACV 2023 (arXiv:2111.14585), and its video extension (arXiv:2212.11187).

All functions are pure: they read tensors and return a scalar, they never normalise their inputs (the caller
does, since normalising here would change the gradient), and they never touch a queue buffer.

Shapes, used throughout:
    B: local batch size, d: embedding size, K: queue length, N: number of keys gathered from all processes.
    query (B, d): student outputs, L2-normalised; gradients flow through them.
    key   (B, d): teacher outputs of the other view, L2-normalised; treated as constants.
    queue (K, d): past teacher keys, one per ROW, L2-normalised; treated as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["sce_loss", "infonce_loss", "ressl_loss"]


def _check_embeddings(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None) -> None:
    if query.ndim != 2:
        raise ValueError(f"`query` must have shape (batch_size, dim), got a {query.ndim}-D tensor of shape {tuple(query.shape)}.")
    if key.shape != query.shape:
        raise ValueError(f"`key` must have the shape of `query` {tuple(query.shape)}, got {tuple(key.shape)}.")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != query.shape[1]):
        raise ValueError(
            f"`queue` must have shape (queue_size, {query.shape[1]}) (one past key per row), got {tuple(queue.shape)}."
        )


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """One common dtype for all inputs: float64 if any input is float64, else float32 (half and bfloat16 upcast)."""
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype) if t is not None else None for t in tensors]


def _candidate_similarities(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None,
    in_batch_keys: bool,
    gathered_keys: torch.Tensor | None,
    positive_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check and upcast the inputs, then the raw cosine similarities of the student and the teacher with every
    candidate.

    Columns are ``[key_i | queue]`` by default (the positive is column 0), or ``[all batch keys | queue]`` with
    ``in_batch_keys`` (the positive of row i is column ``positive_offset + i``).

    Returns:
        student_sim (B, C), teacher_sim (B, C), positive_index (B,) and positive_mask (B, C), with C the number of
        candidates.
    """
    _check_embeddings(query, key, queue)
    query, key, queue, gathered_keys = _upcast(query, key, queue, gathered_keys)
    batch_size = query.shape[0]
    key = key.detach()
    queue = queue.detach() if queue is not None else None
    if in_batch_keys:
        batch_keys = key if gathered_keys is None else gathered_keys.detach()
        if batch_keys.ndim != 2 or batch_keys.shape[1] != query.shape[1]:
            raise ValueError(
                f"`gathered_keys` must have shape (num_keys, {query.shape[1]}), got {tuple(batch_keys.shape)}."
            )
        if not 0 <= positive_offset <= batch_keys.shape[0] - batch_size:
            raise ValueError(
                f"`positive_offset` must be in [0, {batch_keys.shape[0] - batch_size}] so that the {batch_size} "
                f"positives fall inside the {batch_keys.shape[0]} gathered keys, got {positive_offset}."
            )
        candidates = batch_keys if queue is None else torch.cat([batch_keys, queue], dim=0)  # (C, d)
        student_sim = query @ candidates.T  # (B, C)
        teacher_sim = key @ candidates.T  # (B, C)
        positive_index = torch.arange(batch_size, device=query.device) + positive_offset
    else:
        if gathered_keys is not None:
            raise ValueError("`gathered_keys` is only used with `in_batch_keys=True`.")
        if queue is None:
            raise ValueError(
                "SCE needs candidates besides the positive: pass a `queue` of past keys, or set `in_batch_keys=True`."
            )
        positive_sim = (query * key).sum(dim=1, keepdim=True)  # (B, 1)
        student_sim = torch.cat([positive_sim, query @ queue.T], dim=1)  # (B, 1 + K)
        teacher_sim = torch.cat([torch.zeros_like(positive_sim), key @ queue.T], dim=1)  # (B, 1 + K)
        positive_index = torch.zeros(batch_size, dtype=torch.long, device=query.device)
    if student_sim.shape[1] < 2:
        raise ValueError(
            "SCE needs candidates besides the positive, but the queue is empty or absent and the batch holds a "
            "single key: pass a non-empty `queue`, or use `in_batch_keys=True` with a larger batch."
        )
    positive_mask = torch.zeros_like(student_sim, dtype=torch.bool)
    positive_mask[torch.arange(batch_size, device=query.device), positive_index] = True
    return student_sim, teacher_sim, positive_index, positive_mask


def sce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None = None,
    *,
    coeff: float = 0.5,
    temperature: float = 0.1,
    target_temperature: float = 0.07,
    in_batch_keys: bool = False,
    exact_self_exclusion: bool = False,
    gathered_keys: torch.Tensor | None = None,
    positive_offset: int = 0,
) -> torch.Tensor:
    r"""Similarity Contrastive Estimation loss for one (student view, teacher view) pair.

    For anchor i with candidate columns j (the positive P, then the other instances):

    .. math::
        s_{ij} = \mathrm{softmax}_j\big(\mathbb 1_{j \neq P}\, k_i \cdot c_j / \tau_m\big), \qquad
        w_{ij} = \lambda\, \mathbb 1_{j = P} + (1 - \lambda)\, s_{ij},

        p_{ij} = \mathrm{softmax}_j\big(q_i \cdot c_j / \tau\big), \qquad
        \mathcal L = -\frac1B \sum_i \sum_j w_{ij} \log p_{ij}.

    The target ``w`` mixes the one-hot positive with the teacher's similarity distribution over the other
    instances; the student distribution ``p`` keeps the positive. How the positive is kept out of the target:

    - default (the authors' code): candidates are ``[key_i | queue]``; the positive's teacher logit is the
      constant 0 (not -inf), so the positive gets an extra target mass of ``(1 - coeff) / Z``, about 1e-5 with a
      large queue;
    - ``exact_self_exclusion=True`` (the paper's formula): the positive's teacher logit is -inf;
    - ``in_batch_keys=True``: candidates are ``[all batch keys | queue]``, the positive of row i is column
      ``positive_offset + i`` and its teacher logit is -inf (always exact).

    Args:
        query (`torch.Tensor` of shape `(B, d)`): L2-normalised student outputs.
        key (`torch.Tensor` of shape `(B, d)`): L2-normalised teacher outputs of the other view (no gradient).
        queue (`torch.Tensor` of shape `(K, d)`, *optional*): past teacher keys, one per row (no gradient).
        coeff (`float`, defaults to 0.5): weight λ of the one-hot term; 1 gives InfoNCE, 0 the relational target.
        temperature (`float`, defaults to 0.1): student temperature τ.
        target_temperature (`float`, defaults to 0.07): teacher temperature τ_m (the sharpening one).
        in_batch_keys (`bool`, defaults to `False`): also use the keys of the whole batch as candidates.
        exact_self_exclusion (`bool`, defaults to `False`): -inf instead of 0 for the positive's teacher logit in
            the default mode.
        gathered_keys (`torch.Tensor` of shape `(N, d)`, *optional*): with ``in_batch_keys``, the keys of every
            process concatenated in rank order; defaults to ``key`` (one process).
        positive_offset (`int`, defaults to 0): with ``in_batch_keys``, the row of this process's first key in
            ``gathered_keys`` (``rank * B``).

    Returns:
        `torch.Tensor`: the scalar loss, the mean over the batch, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: on shape mismatches, ``coeff`` outside [0, 1], temperatures <= 0, or no candidate besides the
            positive.
    """
    if not 0.0 <= coeff <= 1.0:
        raise ValueError(f"`coeff` must be in [0, 1], got {coeff}.")
    _check_temperature("temperature", temperature)
    _check_temperature("target_temperature", target_temperature)
    student_sim, teacher_sim, _, positive_mask = _candidate_similarities(  # (B, C) each
        query, key, queue, in_batch_keys, gathered_keys, positive_offset
    )

    with torch.no_grad():
        if in_batch_keys or exact_self_exclusion:
            teacher_sim = teacher_sim.masked_fill(positive_mask, float("-inf"))
        relational_target = F.softmax(teacher_sim / target_temperature, dim=1)  # (B, C)
        target = coeff * positive_mask.to(student_sim.dtype) + (1.0 - coeff) * relational_target  # (B, C)

    log_prob = F.log_softmax(student_sim / temperature, dim=1)  # (B, C)
    return -(target * log_prob).sum(dim=1).mean()


def infonce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    in_batch_keys: bool = False,
    gathered_keys: torch.Tensor | None = None,
    positive_offset: int = 0,
) -> torch.Tensor:
    r"""InfoNCE with queue negatives (MoCo v2), the ``coeff = 1`` end of SCE.

    .. math::
        \mathcal L = -\frac1B \sum_i \log \frac{\exp(q_i \cdot k_i / \tau)}{\sum_j \exp(q_i \cdot c_j / \tau)}

    over the candidates ``c`` of :func:`sce_loss` (``[key_i | queue]``, or ``[all batch keys | queue]`` with
    ``in_batch_keys``). Arguments and shapes as in :func:`sce_loss`.

    Returns:
        `torch.Tensor`: the scalar loss, the mean over the batch.
    """
    _check_temperature("temperature", temperature)
    student_sim, _, positive_index, _ = _candidate_similarities(
        query, key, queue, in_batch_keys, gathered_keys, positive_offset
    )
    return F.cross_entropy(student_sim / temperature, positive_index)


def ressl_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    target_temperature: float = 0.07,
    in_batch_keys: bool = False,
    gathered_keys: torch.Tensor | None = None,
    positive_offset: int = 0,
) -> torch.Tensor:
    r"""ReSSL's relational loss (Zheng et al., NeurIPS 2021): the positive is removed from both distributions.

    .. math::
        s_{ij} = \mathrm{softmax}_{j \in N}(k_i \cdot c_j / \tau_m), \qquad
        p'_{ij} = \mathrm{softmax}_{j \in N}(q_i \cdot c_j / \tau), \qquad
        \mathcal L = -\frac1B \sum_i \sum_{j \in N} s_{ij} \log p'_{ij}

    where N is the candidates of :func:`sce_loss` other than the positive. With exact self-exclusion,
    ``sce_loss(coeff=0) = ressl_loss + mean_i(-log(1 - p_iP))`` (SCE_SPEC §1.7). Arguments as in :func:`sce_loss`.

    Returns:
        `torch.Tensor`: the scalar loss, the mean over the batch.
    """
    _check_temperature("temperature", temperature)
    _check_temperature("target_temperature", target_temperature)
    student_sim, teacher_sim, _, positive_mask = _candidate_similarities(  # (B, C) each
        query, key, queue, in_batch_keys, gathered_keys, positive_offset
    )
    with torch.no_grad():
        target = F.softmax(teacher_sim.masked_fill(positive_mask, float("-inf")) / target_temperature, dim=1)
    log_prob = F.log_softmax((student_sim / temperature).masked_fill(positive_mask, float("-inf")), dim=1)
    # 0 * -inf at the positive column would be nan: drop that column from the sum explicitly.
    return -(target * log_prob).masked_fill(positive_mask, 0.0).sum(dim=1).mean()
