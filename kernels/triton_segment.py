"""Triton segment-attention kernel: one KV chunk x one tile of stacked queries -> fp32 partials.

The same kernel serves both relay parts:
  * prefix: a tile of a group's members x the query heads of one KV head is stacked into the
    M dimension (``BLOCK_M`` rows: row ``i`` is member ``i // GQA``, head ``i % GQA``), so the
    shared KV chunk is read once per tile and multiplied on tensor cores (``tl.dot``);
  * suffix: one row's GQA heads (``member_count = 1``, ``BLOCK_M >= 16`` padded), like
    SGLang's ``_fwd_grouped_kernel_stage1``.
Each program writes one attention state ``(o, lse)`` per (member, head) into its part slot.

The grid is persistent and fixed (``[num_kv_heads, num_programs]``): program ``pid`` walks
work items ``pid, pid + num_programs, ...`` below the live count read from a device tensor,
so a CUDA graph captured once replays any later plan that fits the capacities. The KV head is
the fast grid axis so that, when a step has fewer items than programs, the working programs
(the low ``pid``\ s of every head) are launched first and spread over all SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_segment_attention"]

_LOG2E = 1.4426950408889634  # 1 / ln(2)
_LN2 = 0.6931471805599453


@triton.jit
def _tanh(x):
    # tanh through sigmoid (tl has no tanh in every backend): 2*sigmoid(2x) - 1.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _segment_attention_kernel(
    # Pointers
    Q,  # [bs, num_q_heads, head_dim] q.dtype
    K_Buffer,  # [num_slots, num_kv_heads, head_dim]
    V_Buffer,  # [num_slots, num_kv_heads, head_dim]
    Kv_Indices,  # [total_tokens] int32 KV slot ids of the segments
    Rows,  # [num_members] int32 batch row of each member (identity for suffix work)
    Slot_Base,  # [num_members] int32 first part slot of each member's parts of this segment
    Work,  # [max_work, WORK_FIELDS] int32: kv_start, kv_len, member_start, member_count, chunk
    Num_Work,  # [1] int32 live work items
    Part_O,  # [max_parts, num_q_heads, head_dim] fp32
    Part_Lse,  # [max_parts, num_q_heads] fp32, natural log
    # Scalars
    sm_scale,
    logit_cap,
    # Strides (elements)
    stride_q_bs,
    stride_q_h,
    stride_k_s,
    stride_k_h,
    stride_v_s,
    stride_v_h,
    stride_po_p,
    stride_po_h,
    stride_pl_p,
    # Meta
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORK_FIELDS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    K_ROW_MAJOR: tl.constexpr,
):
    # A tile must hold at least one member's GQA heads, and tl.dot needs M >= 16.
    tl.static_assert(BLOCK_M >= GQA)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    kv_head = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    num_programs = tl.num_programs(1)
    num_work = tl.load(Num_Work)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    member_local = offs_m // GQA
    head = kv_head * GQA + (offs_m % GQA)  # [BLOCK_M] query head of each stacked row

    for w in range(pid, num_work, num_programs):
        wp = Work + w * WORK_FIELDS
        kv_start = tl.load(wp + 0)
        kv_len = tl.load(wp + 1)
        member_start = tl.load(wp + 2)
        member_count = tl.load(wp + 3)
        chunk = tl.load(wp + 4)

        # Padded rows (beyond the tile's members) read row 0's query (finite) and store nothing.
        mask_m = member_local < member_count
        row = tl.load(Rows + member_start + member_local, mask=mask_m, other=0).to(tl.int64)
        # int64: row * stride_q_bs can exceed 2**31 for large batches x heads x head_dim.
        q_ptrs = Q + row[:, None] * stride_q_bs + head[:, None] * stride_q_h + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base-2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, kv_len, BLOCK_N):
            n = start_n + offs_n
            mask_n = n < kv_len
            # Out-of-range keys load slot 0 and are masked to -inf below.
            slot = tl.load(Kv_Indices + kv_start + n, mask=mask_n, other=0).to(tl.int64)
            # int64 flat offsets: num_slots * num_kv_heads * head_dim exceeds 2**31 on big pools.
            if K_ROW_MAJOR:
                # K tile as stored ([BLOCK_N, BLOCK_D], head_dim contiguous), transposed for the dot.
                k = tl.load(
                    K_Buffer + slot[:, None] * stride_k_s + kv_head * stride_k_h + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0,
                )  # [BLOCK_N, BLOCK_D]
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_N]
            else:
                k = tl.load(
                    K_Buffer + slot[None, :] * stride_k_s + kv_head * stride_k_h + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0,
                )  # [BLOCK_D, BLOCK_N]
                s = tl.dot(q, k, input_precision=INPUT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_N]
            if HAS_CAP:
                s = logit_cap * _tanh(s / logit_cap)
            s = tl.where(mask_n[None, :], s * 1.4426950408889634, float("-inf"))  # base 2
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a live key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V_Buffer + slot[:, None] * stride_v_s + kv_head * stride_v_h + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new

        # Empty state (0, -inf) when no key was seen (cannot happen for kv_len >= 1; kept exact).
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        part = (tl.load(Slot_Base + member_start + member_local, mask=mask_m, other=0) + chunk).to(tl.int64)
        tl.store(
            Part_O + part[:, None] * stride_po_p + head[:, None] * stride_po_h + offs_d[None, :],
            o, mask=mask_m[:, None] & mask_d[None, :],
        )
        tl.store(Part_Lse + part * stride_pl_p + head, lse, mask=mask_m)


def launch_segment_attention(
    *,
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    rows: torch.Tensor,
    slot_base: torch.Tensor,
    work: torch.Tensor,
    num_work: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    sm_scale: float,
    logit_cap: float,
    num_programs: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    k_row_major: bool = False,
) -> None:
    """Launch the segment kernel over a fixed persistent grid ``[num_kv_heads, num_programs]``.

    q ``[bs, num_q_heads, head_dim]``; k/v_buffer ``[num_slots, num_kv_heads, head_dim]`` (last
    dim contiguous); kv_indices/rows/slot_base int32; work ``[max_work, 5]`` int32;
    num_work ``[1]`` int32 (device); part_o ``[max_parts, num_q_heads, head_dim]`` fp32 and
    part_lse ``[max_parts, num_q_heads]`` fp32 (natural log) are written at the planned slots.
    k_row_major: load each K tile as stored (``[BLOCK_N, BLOCK_D]``) and transpose it for the dot,
    instead of gathering it transposed (``[BLOCK_D, BLOCK_N]``); same result, a launch variant
    measured by ``bench/kernels/run.py`` (off by default until it is faster on the GPU).
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert work.shape[1] == 5 and work.is_contiguous()
    gqa = num_q_heads // num_kv_heads
    if head_dim > 128:
        # K/V tiles of 64 x 256 x 3 stages would not fit in shared memory (228 KB on H100).
        block_n, num_stages = min(block_n, 32), min(num_stages, 2)
    grid = (num_kv_heads, max(1, num_programs))
    _segment_attention_kernel[grid](
        q, k_buffer, v_buffer, kv_indices, rows, slot_base, work, num_work, part_o, part_lse,
        float(sm_scale), float(logit_cap) if logit_cap > 0 else 1.0,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), part_o.stride(0), part_o.stride(1), part_lse.stride(0),
        GQA=gqa, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, WORK_FIELDS=5, HAS_CAP=logit_cap > 0,
        # fp32 inputs: exact fp32 dot (tf32 would cost ~1e-3 relative error).
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None, K_ROW_MAJOR=k_row_major,
        num_warps=num_warps, num_stages=num_stages,
    )
