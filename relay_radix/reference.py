"""Exact relay attention in plain PyTorch: the CPU execution path and the oracle for every kernel.

Relay attention splits one decode query's attention over its sequence into parts whose
keys are disjoint (a shared prefix segment per relay group the request belongs to, and its
own suffix), computes each part with its log-sum-exp, and merges the parts exactly:

    o = sum_i exp(lse_i - lse) * o_i,     lse = log(sum_i exp(lse_i))

An *attention state* is the pair ``(o, lse)``:
  * ``o``   ``[..., head_dim]``: softmax-weighted mean of the part's values,
  * ``lse`` ``[...]``: natural-log log-sum-exp of the part's (scaled, capped) scores.
All LSEs in this module are **natural log** (``lse``; a base-2 LSE is always named ``lse2``).
The **empty state** (a part with no keys) is ``(o = 0, lse = -inf)``; merging it with any
state returns that state, and merging two empty states returns the empty state (never NaN).

Arithmetic runs in float32 for half-precision inputs and in float64 for float64 inputs, so
the same code is the float64 oracle in tests.
"""

from __future__ import annotations

import torch

__all__ = [
    "EMPTY_LSE",
    "attention_state",
    "merge_states",
    "naive_decode_attention",
    "relay_decode_attention",
]

EMPTY_LSE = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, sm_scale: float, logit_cap: float) -> torch.Tensor:
    """Scaled (and optionally tanh-capped) scores.

    q: ``[n, num_kv_heads, group, head_dim]``; k: ``[n, L, num_kv_heads, head_dim]``
    -> ``[n, num_kv_heads, group, L]``.
    """
    s = torch.einsum("nhgd,nlhd->nhgl", q, k) * sm_scale
    if logit_cap > 0:
        # Same capping as SGLang's kernels: cap * tanh(s / cap), after scaling.
        s = logit_cap * torch.tanh(s / logit_cap)
    return s


def attention_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention state of queries over a (padded) key set.

    Args:
        q: ``[n, num_q_heads, head_dim]``.
        k: ``[n, L, num_kv_heads, head_dim]``; ``num_q_heads % num_kv_heads == 0`` (GQA).
        v: ``[n, L, num_kv_heads, head_dim_v]``.
        key_mask: ``[n, L]`` bool, True where the key exists; None means all exist.
        sm_scale: softmax scale applied to q.k.
        logit_cap: tanh soft cap (0 disables).

    Returns:
        ``(o, lse)``: ``[n, num_q_heads, head_dim_v]`` and ``[n, num_q_heads]`` in the compute
        dtype (float32, or float64 for float64 inputs); rows with no key get the empty state
        ``(0, -inf)``.
    """
    cd = _compute_dtype(q.dtype)
    n, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"num_q_heads={hq} is not a multiple of num_kv_heads={hkv}")
    qg = q.to(cd).reshape(n, hkv, hq // hkv, d)
    s = _scores(qg, k.to(cd), sm_scale, logit_cap)  # [n, hkv, g, L]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key
    # exp(s - lse) is NaN for rows with lse=-inf; those rows are zeroed below.
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    o = torch.einsum("nhgl,nlhd->nhgd", p, v.to(cd))
    return o.reshape(n, hq, -1), lse.reshape(n, hq)


def merge_states(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention states over disjoint key sets.

    Args:
        o_parts: ``[num_parts, ..., head_dim]`` float32/float64.
        lse_parts: ``[num_parts, ...]`` natural-log LSE, ``-inf`` for empty parts.

    Returns:
        ``(o, lse)`` of shapes ``[..., head_dim]`` and ``[...]``. All-empty positions give
        the empty state ``(0, -inf)``.
    """
    m = lse_parts.max(dim=0).values
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_parts - m_safe)  # exp(-inf) = 0 for empty parts
    denom = w.sum(dim=0)
    o = (w[..., None] * o_parts).sum(dim=0) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    lse = torch.where(denom > 0, m_safe + torch.log(denom), torch.full_like(m, EMPTY_LSE))
    return o, lse


def _gather_padded(
    buf: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ragged token lists from a KV buffer into a padded batch.

    buf: ``[num_slots, num_kv_heads, head_dim]``; indptr ``[n+1]``; indices ``[indptr[-1]]``
    slot ids. Returns ``([n, Lmax, num_kv_heads, head_dim], mask [n, Lmax])``.
    """
    indptr = indptr.to(torch.int64).cpu()
    lens = indptr[1:] - indptr[:-1]
    n = lens.numel()
    lmax = int(lens.max().item()) if n > 0 else 0
    pos = torch.arange(lmax)
    mask = pos[None, :] < lens[:, None]
    flat = (indptr[:-1, None] + pos[None, :]).clamp(max=max(int(indptr[-1]) - 1, 0))
    idx = indices.to(torch.int64).to(buf.device)
    if idx.numel() == 0:
        gathered = buf.new_zeros((n, lmax) + tuple(buf.shape[1:]))
    else:
        gathered = buf[idx[flat.to(buf.device)]]
    return gathered, mask.to(buf.device)


def naive_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain decode attention of each request over its whole KV list (no relay).

    q: ``[bs, num_q_heads, head_dim]``; k/v_buffer: ``[num_slots, num_kv_heads, head_dim]``;
    kv_indptr: ``[bs+1]``; kv_indices: slot ids. Returns ``(o, lse)`` in the compute dtype.
    """
    k, mask = _gather_padded(k_buffer, kv_indptr, kv_indices)
    v, _ = _gather_padded(v_buffer, kv_indptr, kv_indices)
    return attention_state(q, k, v, mask, sm_scale, logit_cap)


def relay_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    *,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    member_indptr: torch.Tensor,
    member_rows: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relay decode attention: shared prefix segments once per group, own suffix per request.

    Args:
        q: ``[bs, num_q_heads, head_dim]`` query of the token being decoded per request.
        k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]`` one layer's KV pool
            (SGLang's layout, page size 1).
        prefix_kv_indptr: ``[num_groups+1]`` int; group ``g``'s shared segment is
            ``prefix_kv_indices[prefix_kv_indptr[g]:prefix_kv_indptr[g+1]]`` (slot ids).
        prefix_kv_indices: ``[total_prefix_tokens]`` int slot ids.
        member_indptr: ``[num_groups+1]`` int; group ``g``'s members are
            ``member_rows[member_indptr[g]:member_indptr[g+1]]``.
        member_rows: ``[total_members]`` int batch rows. A row may be in several groups
            (nested levels); the segments of one row's groups and its suffix are disjoint.
        suffix_kv_indptr: ``[bs+1]`` int; row ``r``'s own part is
            ``suffix_kv_indices[suffix_kv_indptr[r]:suffix_kv_indptr[r+1]]`` (may be empty).
        suffix_kv_indices: ``[total_suffix_tokens]`` int slot ids.
        sm_scale, logit_cap: as in SGLang's decode kernels.

    Returns:
        ``(o, lse)``: ``[bs, num_q_heads, head_dim_v]`` in ``q.dtype`` and
        ``[bs, num_q_heads]`` natural-log LSE in the compute dtype.
    """
    bs, hq, _ = q.shape
    # Suffix states, one per row.
    o_suf, lse_suf = naive_decode_attention(
        q, k_buffer, v_buffer, suffix_kv_indptr, suffix_kv_indices, sm_scale, logit_cap
    )
    o_acc, lse_acc = o_suf, lse_suf
    member_indptr = member_indptr.to(torch.int64).cpu()
    member_rows = member_rows.to(torch.int64).to(q.device)
    prefix_kv_indptr = prefix_kv_indptr.to(torch.int64).cpu()
    for g in range(member_indptr.numel() - 1):
        rows = member_rows[member_indptr[g] : member_indptr[g + 1]]
        if rows.numel() == 0:
            continue
        idx = prefix_kv_indices[prefix_kv_indptr[g] : prefix_kv_indptr[g + 1]].to(torch.int64).to(k_buffer.device)
        # All members read the same keys: one [1, P, ...] gather broadcast over members.
        k = k_buffer[idx].unsqueeze(0).expand(rows.numel(), -1, -1, -1)
        v = v_buffer[idx].unsqueeze(0).expand(rows.numel(), -1, -1, -1)
        o_g, lse_g = attention_state(q[rows], k, v, None, sm_scale, logit_cap)
        o_m, lse_m = merge_states(
            torch.stack([o_acc[rows], o_g]), torch.stack([lse_acc[rows], lse_g])
        )
        o_acc = o_acc.index_copy(0, rows, o_m)
        lse_acc = lse_acc.index_copy(0, rows, lse_m)
    return o_acc.to(q.dtype), lse_acc
