"""Exact log-sum-exp merge of relay partial states (Triton).

Attention state of a part: ``(o [head_dim], lse)`` with ``lse`` the natural-log
log-sum-exp of its scores. Merge of parts ``i``: ``lse = log(sum_i exp(lse_i))``,
``o = sum_i exp(lse_i - lse) * o_i``. The empty state is ``(0, -inf)``: it has weight 0,
and a row whose parts are all empty (or which has none) gets ``(0, -inf)``, never NaN
(unlike FlashInfer's merge_state, flashinfer #4051).

Two kernels:
  * :func:`launch_merge_parts`: the Triton relay path; row ``r`` merges the contiguous part
    slots ``[row_part_indptr[r], row_part_indptr[r+1])`` of one fp32 partial buffer, optionally
    on top of a *base state* already in ``o`` (the row's suffix attention computed by
    FlashInfer's paged decode, base-2 LSE): then a row with no part slot is left as it is.
  * :func:`launch_merge_fi_states`: the FlashInfer relay path; row ``r`` merges its suffix
    state (FlashInfer decode output, base-2 LSE) with the prefix states of its memberships
    (FlashInfer prefill output over gathered member queries, base-2 LSE). Base 2 is
    converted to natural log at load: this is the one boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_merge_parts", "launch_merge_fi_states"]


@triton.jit
def _merge_step(m, l, acc, lse, o):
    """Fold state (o [BLOCK_H, BLOCK_D], lse [BLOCK_H]) into (m, l, acc); -inf stays weight 0."""
    m_new = tl.maximum(m, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)  # exp(-inf) = 0 while nothing was merged
    w = tl.exp(lse - m_safe)  # 0 for an empty part
    return m_new, l * alpha + w, acc * alpha[:, None] + w[:, None] * o


@triton.jit
def _merge_entries(m, l, acc, O, Lse2, Pos, start, end, stride_o_p, stride_o_h, stride_l_p, offs_h, offs_d,
                   mask_h, mask):
    """Fold states ``O[Pos[e]]`` / ``Lse2[Pos[e]]`` (any float dtype, **base-2** LSE, converted to
    natural log here) for ``e`` in ``[start, end)`` into (m, l, acc): FlashInfer's states."""
    for e in range(start, end):
        p64 = tl.load(Pos + e).to(tl.int64)
        lse = tl.load(Lse2 + p64 * stride_l_p + offs_h, mask=mask_h, other=float("-inf")) * 0.6931471805599453
        o = tl.load(O + p64 * stride_o_p + offs_h[:, None] * stride_o_h + offs_d[None, :], mask=mask, other=0.0)
        m, l, acc = _merge_step(m, l, acc, lse, o.to(tl.float32))
    return m, l, acc


@triton.jit
def _merge_parts_kernel(
    Part_O,  # [max_parts, num_q_heads, head_dim] fp32
    Part_Lse,  # [max_parts, num_q_heads] fp32, natural log
    Row_Part_Indptr,  # [max_bs+1] int32
    Num_Rows,  # [1] int32 live batch size
    O,  # [bs, num_q_heads, head_dim] output dtype (HAS_BASE: holds the base state's o on entry)
    Lse_Out,  # [max_bs, num_q_heads] fp32, natural log
    Base_Lse2,  # HAS_BASE: [max_bs, num_q_heads] fp32 base-2 LSE of the base state in O
    Pool_O,  # HAS_POOL: [max_rows, num_q_heads, head_dim] q.dtype, states of the pool prefix pass
    Pool_Lse2,  # HAS_POOL: [max_rows, num_q_heads] fp32 base 2
    Pool_Entry_Indptr,  # HAS_POOL: [max_bs+1] int32: row r's states are Pool_Entry_Pos[indptr[r]:indptr[r+1]]
    Pool_Entry_Pos,  # HAS_POOL: [max_rows] int32 rows of Pool_O
    stride_po_p,
    stride_po_h,
    stride_pl_p,
    stride_o_bs,
    stride_o_h,
    stride_lse_bs,
    stride_bl_bs,
    stride_pool_o_p,
    stride_pool_o_h,
    stride_pool_l_p,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,  # part slots folded per iteration (1: the plain loop)
    HAS_BASE: tl.constexpr,
    HAS_POOL: tl.constexpr,
):
    row = tl.program_id(0)
    if row >= tl.load(Num_Rows):
        return  # programs beyond the live batch (fixed CUDA-graph grid)
    r64 = row.to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < NUM_Q_HEADS
    mask = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)
    # int64 loop bounds: p * stride_po_p (max_parts * num_q_heads * head_dim) can exceed 2**31.
    start = tl.load(Row_Part_Indptr + row).to(tl.int64)
    end = tl.load(Row_Part_Indptr + row + 1).to(tl.int64)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    mask_o = mask
    has_parts = end > start
    if HAS_POOL:
        e_start = tl.load(Pool_Entry_Indptr + row)
        e_end = tl.load(Pool_Entry_Indptr + row + 1)
        has_parts = has_parts | (e_end > e_start)
    if HAS_BASE:
        # A row with no part keeps o as it is: no load, no store of o (masks all false), so
        # with no sharing this launch costs the indptr and LSE reads and the LSE store.
        mask_o = mask & has_parts
        # Base 2 -> natural log here: the one boundary of this path.
        base_lse = tl.load(Base_Lse2 + r64 * stride_bl_bs + offs_h, mask=mask_h, other=float("-inf")) * 0.6931471805599453
        base_o = tl.load(O + r64 * stride_o_bs + offs_h[:, None] * stride_o_h + offs_d[None, :], mask=mask_o, other=0.0)
        m, l, acc = _merge_step(m, l, acc, base_lse, base_o.to(tl.float32))
    if BLOCK_P == 1:
        # Enough rows to fill the chip (or few parts per row): one slot per iteration.
        for p in range(start, end):
            lse = tl.load(Part_Lse + p * stride_pl_p + offs_h, mask=mask_h, other=float("-inf"))
            o = tl.load(Part_O + p * stride_po_p + offs_h[:, None] * stride_po_h + offs_d[None, :], mask=mask, other=0.0)
            m, l, acc = _merge_step(m, l, acc, lse, o)
    else:
        # BLOCK_P slots per iteration, loaded at once: a row's parts are independent loads, and a
        # loop over single slots was a chain of dependent iterations (one load latency each).
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + offs_p  # [BLOCK_P]
            live = p < end
            lse = tl.load(Part_Lse + p[:, None] * stride_pl_p + offs_h[None, :],
                          mask=live[:, None] & mask_h[None, :], other=float("-inf"))  # [BLOCK_P, BLOCK_H]
            o = tl.load(Part_O + p[:, None, None] * stride_po_p + offs_h[None, :, None] * stride_po_h
                        + offs_d[None, None, :], mask=live[:, None, None] & mask[None, :, :], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # exp(-inf) = 0 while nothing was merged
            w = tl.exp(lse - m_safe[None, :])  # [BLOCK_P, BLOCK_H], 0 for empty or missing parts
            l = l * alpha + tl.sum(w, 0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
            m = m_new
    if HAS_POOL:
        # States of the pool prefix pass (FlashInfer: o in q's dtype, base-2 LSE).
        m, l, acc = _merge_entries(m, l, acc, Pool_O, Pool_Lse2, Pool_Entry_Pos, e_start, e_end, stride_pool_o_p,
                                   stride_pool_o_h, stride_pool_l_p, offs_h, offs_d, mask_h, mask)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse_out = tl.where(has, tl.where(has, m, 0.0) + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(O + r64 * stride_o_bs + offs_h[:, None] * stride_o_h + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask_o)
    tl.store(Lse_Out + r64 * stride_lse_bs + offs_h, lse_out, mask=mask_h)


def _block_h(num_q_heads: int, head_dim: int) -> int:
    # ~4K fp32 accumulator elements per program.
    return max(1, min(triton.next_power_of_2(num_q_heads), 4096 // triton.next_power_of_2(head_dim)))


def merge_parts_blocks(num_q_heads: int, head_dim: int, grid_rows: int, target_programs: int) -> tuple[int, int]:
    """``(BLOCK_H, BLOCK_P)`` of :func:`launch_merge_parts`.

    By default all heads of a row are in one program, one part slot per iteration
    (``BLOCK_P = 1``). A grid ``[grid_rows, cdiv(num_q_heads, BLOCK_H)]`` of fewer than
    ``target_programs / 4`` programs (a small batch: a long prefix is then split in many chunks
    to fill the chip, so each row has a long chain of part slots) gets fewer heads per program,
    halved (down to 1) until the grid has ``target_programs`` programs, and each iteration folds
    ``BLOCK_P`` slots loaded at once (``BLOCK_P x BLOCK_H x head_dim`` up to 8K fp32 values: 32 KB
    of registers over 4 warps). ``target_programs`` is the SM count. On the H100 (session 10,
    ``bench/results/kernels-h100-s10-merge.md``) the folded loop took the server path's layer
    time at 8 and 32 rows down by up to 20% (GQA-4 4K x 32: 0.070 -> 0.059 ms, 16K x 8: 0.073 ->
    0.058), was neutral at 64 rows and 5-13% slower at 128 (few slots per row), hence the quarter."""
    block_h = _block_h(num_q_heads, head_dim)
    if 4 * grid_rows * triton.cdiv(num_q_heads, block_h) >= target_programs:
        return block_h, 1
    while block_h > 1 and grid_rows * triton.cdiv(num_q_heads, block_h) < target_programs:
        block_h //= 2
    block_p = max(2, min(16, 8192 // (block_h * triton.next_power_of_2(head_dim))))
    return block_h, block_p


def launch_merge_parts(
    *,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    row_part_indptr: torch.Tensor,
    num_rows: torch.Tensor,
    o: torch.Tensor,
    lse_out: torch.Tensor,
    grid_rows: int,
    base_lse2: torch.Tensor | None = None,
    target_programs: int = 1,
    pool=None,
) -> None:
    """Merge each row's part slots into ``o`` ``[bs, num_q_heads, head_dim]`` (written in full for
    ``row < num_rows[0]``) and ``lse_out`` ``[>=bs, num_q_heads]`` fp32 natural log.

    part_o ``[max_parts, num_q_heads, head_dim]`` fp32; part_lse ``[max_parts, num_q_heads]``;
    row_part_indptr ``[>=bs+1]`` int32; num_rows ``[1]`` int32 device; grid_rows: fixed grid rows
    (>= live bs; the CUDA-graph capacity). target_programs: programs wanted in the grid (the SM
    count); smaller batches get fewer heads per program (:func:`merge_parts_blocks`).

    base_lse2: ``[>=bs, num_q_heads]`` fp32 **base-2** LSE of a base state that ``o`` already holds
    (FlashInfer's decode output over each row's suffix). The row's parts are merged on top of it,
    in place; rows with no part keep ``o`` untouched (only their LSE is converted to ``lse_out``).

    pool: ``(pool_o, pool_lse2, entry_indptr, entry_pos)``, the states of the pool prefix pass
    (:mod:`relay_radix.kernels.pool_prefix`): row ``r`` also merges ``pool_o[p]`` /
    ``pool_lse2[p]`` (q's dtype, **base-2** LSE) for ``p`` in ``entry_pos[entry_indptr[r] :
    entry_indptr[r+1]]``.
    """
    num_q_heads, head_dim = o.shape[1], o.shape[2]
    assert o.stride(2) == 1 and part_o.stride(2) == 1 and part_lse.stride(1) == 1 and lse_out.stride(1) == 1
    assert base_lse2 is None or base_lse2.stride(1) == 1
    block_h, block_p = merge_parts_blocks(num_q_heads, head_dim, max(1, grid_rows), target_programs)
    grid = (max(1, grid_rows), triton.cdiv(num_q_heads, block_h))
    has_base = base_lse2 is not None
    bl = base_lse2 if has_base else lse_out  # unused pointer when not HAS_BASE
    if pool is not None:
        pool_o, pool_lse2, entry_indptr, entry_pos = pool
        assert pool_o.stride(2) == 1 and pool_lse2.stride(1) == 1 and pool_o.shape[1:] == o.shape[1:]
    else:  # unused pointers when not HAS_POOL
        pool_o, pool_lse2, entry_indptr, entry_pos = part_o, part_lse, row_part_indptr, row_part_indptr
    _merge_parts_kernel[grid](
        part_o, part_lse, row_part_indptr, num_rows, o, lse_out, bl, pool_o, pool_lse2, entry_indptr, entry_pos,
        part_o.stride(0), part_o.stride(1), part_lse.stride(0), o.stride(0), o.stride(1), lse_out.stride(0),
        bl.stride(0), pool_o.stride(0), pool_o.stride(1), pool_lse2.stride(0),
        NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_H=block_h,
        BLOCK_P=block_p, HAS_BASE=has_base, HAS_POOL=pool is not None, num_warps=4,
    )


@triton.jit
def _merge_fi_states_kernel(
    # Pointers
    Suffix_O,  # [bs, num_q_heads, head_dim] q.dtype, FlashInfer decode output
    Suffix_Lse2,  # [bs, num_q_heads] fp32, base 2
    Suffix_Kv_Indptr,  # [bs+1] int32: empty suffix (len 0) is the empty state, whatever FI wrote
    Prefix_O,  # [max_members, num_q_heads, head_dim] q.dtype, FlashInfer prefill output
    Prefix_Lse2,  # [max_members, num_q_heads] fp32, base 2
    Row_Entry_Indptr,  # [bs+1] int32: row r's memberships with a non-empty segment
    Row_Entry_Pos,  # [num_entries] int32 position in member_rows (= row of Prefix_O)
    O,  # [bs, num_q_heads, head_dim] output
    Lse_Out,  # [bs, num_q_heads] fp32, natural log
    # Strides
    stride_so_bs,
    stride_so_h,
    stride_sl_bs,
    stride_po_p,
    stride_po_h,
    stride_pl_p,
    stride_o_bs,
    stride_o_h,
    stride_lse_bs,
    # Meta
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < NUM_Q_HEADS
    mask = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    suffix_len = tl.load(Suffix_Kv_Indptr + row + 1) - tl.load(Suffix_Kv_Indptr + row)
    if suffix_len > 0:
        lse = tl.load(Suffix_Lse2 + r64 * stride_sl_bs + offs_h, mask=mask_h, other=float("-inf")) * 0.6931471805599453
        o = tl.load(Suffix_O + r64 * stride_so_bs + offs_h[:, None] * stride_so_h + offs_d[None, :], mask=mask, other=0.0)
        m, l, acc = _merge_step(m, l, acc, lse, o.to(tl.float32))
    start = tl.load(Row_Entry_Indptr + row)
    end = tl.load(Row_Entry_Indptr + row + 1)
    m, l, acc = _merge_entries(m, l, acc, Prefix_O, Prefix_Lse2, Row_Entry_Pos, start, end, stride_po_p, stride_po_h,
                               stride_pl_p, offs_h, offs_d, mask_h, mask)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse_out = tl.where(has, tl.where(has, m, 0.0) + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(O + r64 * stride_o_bs + offs_h[:, None] * stride_o_h + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask)
    tl.store(Lse_Out + r64 * stride_lse_bs + offs_h, lse_out, mask=mask_h)


def launch_merge_fi_states(
    *,
    suffix_o: torch.Tensor,
    suffix_lse2: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    prefix_o: torch.Tensor,
    prefix_lse2: torch.Tensor,
    row_entry_indptr: torch.Tensor,
    row_entry_pos: torch.Tensor,
    o: torch.Tensor,
    lse_out: torch.Tensor,
) -> None:
    """Merge FlashInfer suffix and prefix states (base-2 LSEs) into ``o`` ``[bs, num_q_heads, head_dim]``
    and ``lse_out`` ``[bs, num_q_heads]`` (natural log). Grid: ``o.shape[0]`` rows (fixed per graph)."""
    bs, num_q_heads, head_dim = o.shape
    # The kernel indexes heads' last dims with stride 1.
    assert all(t.stride(-1) == 1 for t in (suffix_o, suffix_lse2, prefix_o, prefix_lse2, o, lse_out))
    block_h = _block_h(num_q_heads, head_dim)
    grid = (max(1, bs), triton.cdiv(num_q_heads, block_h))
    _merge_fi_states_kernel[grid](
        suffix_o, suffix_lse2, suffix_kv_indptr, prefix_o, prefix_lse2, row_entry_indptr, row_entry_pos, o, lse_out,
        suffix_o.stride(0), suffix_o.stride(1), suffix_lse2.stride(0), prefix_o.stride(0), prefix_o.stride(1),
        prefix_lse2.stride(0), o.stride(0), o.stride(1), lse_out.stride(0),
        NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_H=block_h,
        num_warps=4,
    )
