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
(the low program ids of every head) are launched first and spread over all SMs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["launch_segment_attention", "slot_runs_supported"]


@triton.jit
def _tanh(x):
    # tanh through sigmoid (tl has no tanh in every backend): 2*sigmoid(2x) - 1.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _softmax_tile(q, k_t, m_i, l_i, mask_n, sm_scale, logit_cap,
                  HAS_CAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Scores of one KV tile and the online-softmax update (running max ``m_i`` in base-2 units).

    q ``[BLOCK_M, BLOCK_D]``, k_t ``[BLOCK_D, BLOCK_N]``; keys with ``mask_n`` false get
    probability 0. Every tile has at least one live key, so the new max is finite.
    Returns ``(p [BLOCK_M, BLOCK_N] fp32, alpha [BLOCK_M], m_new, l_new)``; the caller does
    ``acc = acc * alpha[:, None] + p @ v``.
    """
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_CAP:
        s = s * sm_scale
        s = logit_cap * _tanh(s / logit_cap) * 1.4426950408889634  # the cap applies in natural units
    else:
        # One multiply per score: scale and base change folded (on the H100 here the prefix pass
        # went 79 -> 70 us on MHA 8K x 128, 145 -> 125 us on MHA 16K, 47 -> 46 us on GQA-4 8K;
        # bench/results/raw/prefix-probe-h100-s8-qkahead.json against prefix-probe-h100.md).
        s = s * (sm_scale * 1.4426950408889634)  # 1.44... = 1 / ln(2)
    s = tl.where(mask_n[None, :], s, float("-inf"))  # base 2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_gathered(q, K_Buffer, V_Buffer, Kv_Indices, kv_start, kv_len, kv_head, stride_k_s, stride_k_h,
                     stride_v_s, stride_v_h, m_i, l_i, acc, sm_scale, logit_cap,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_CAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, K_ROW_MAJOR: tl.constexpr):
    """Keys ``Kv_Indices[kv_start : kv_start + kv_len]`` in any slot order: per-row pointer gathers."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start_n in range(0, kv_len, BLOCK_N):
        n = start_n + offs_n
        mask_n = n < kv_len
        # Out-of-range keys load slot 0 and are masked to -inf.
        slot = tl.load(Kv_Indices + kv_start + n, mask=mask_n, other=0).to(tl.int64)
        # int64 flat offsets: num_slots * num_kv_heads * head_dim exceeds 2**31 on big pools.
        if K_ROW_MAJOR:
            # K tile as stored ([BLOCK_N, BLOCK_D], head_dim contiguous), transposed for the dot.
            k_t = tl.trans(tl.load(
                K_Buffer + slot[:, None] * stride_k_s + kv_head * stride_k_h + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0,
            ))
        else:
            k_t = tl.load(
                K_Buffer + slot[None, :] * stride_k_s + kv_head * stride_k_h + offs_d[:, None],
                mask=mask_n[None, :] & mask_d[:, None], other=0.0,
            )  # [BLOCK_D, BLOCK_N]
        p, alpha, m_i, l_i = _softmax_tile(q, k_t, m_i, l_i, mask_n, sm_scale, logit_cap, HAS_CAP, INPUT_PRECISION)
        v = tl.load(
            V_Buffer + slot[:, None] * stride_v_s + kv_head * stride_v_h + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _is_slot_run(Kv_Indices, kv_start, kv_len, first_slot, RUN_CHECK: tl.constexpr):
    """True when ``Kv_Indices[kv_start + n] == first_slot + n`` for every ``n < kv_len``.

    Mismatches are OR-ed element-wise and reduced once at the end: the check costs about one
    load latency per ``RUN_CHECK`` keys (a reduction per block cost ~4 us per 2K-key chunk).
    """
    bad = tl.zeros([RUN_CHECK], dtype=tl.int1)
    for c in range(0, kv_len, RUN_CHECK):
        i = c + tl.arange(0, RUN_CHECK)
        live = i < kv_len
        sl = tl.load(Kv_Indices + kv_start + i, mask=live, other=0)
        bad = bad | (live & (sl != first_slot + i))
    return tl.max(bad.to(tl.int32), 0) == 0


@triton.jit
def _attend_run(q, k_desc, v_desc, K_Buffer, V_Buffer, first_slot, kv_len, kv_head, stride_k_s, stride_k_h,
                stride_v_s, stride_v_h, m_i, l_i, acc, sm_scale, logit_cap,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_CAP: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """Keys in consecutive slots ``first_slot ..``: full tiles by TMA (``k_desc``/``v_desc`` boxes
    ``[BLOCK_N, HEAD_DIM]`` of the pool as ``[num_slots, num_kv_heads * head_dim]``), the last
    partial tile by a masked load of the same consecutive slots (no key past the run is read)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col = (kv_head * HEAD_DIM).to(tl.int32)  # TMA coordinates are int32
    full = (kv_len // BLOCK_N) * BLOCK_N
    all_keys = offs_n < BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        k = k_desc.load([first_slot + start_n, col])  # [BLOCK_N, HEAD_DIM]
        v = v_desc.load([first_slot + start_n, col])
        p, alpha, m_i, l_i = _softmax_tile(q, k.T, m_i, l_i, all_keys, sm_scale, logit_cap, HAS_CAP, INPUT_PRECISION)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    if full < kv_len:
        n = full + offs_n
        mask_n = n < kv_len
        slot = (first_slot + n).to(tl.int64)
        k = tl.load(K_Buffer + slot[:, None] * stride_k_s + kv_head * stride_k_h + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        v = tl.load(V_Buffer + slot[:, None] * stride_v_s + kv_head * stride_v_h + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        p, alpha, m_i, l_i = _softmax_tile(q, tl.trans(k), m_i, l_i, mask_n, sm_scale, logit_cap, HAS_CAP,
                                           INPUT_PRECISION)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_i, l_i, acc


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
    Num_Active,  # [1] int32 programs per KV head that take work this step (HAS_ACTIVE only)
    Part_O,  # [max_parts, num_q_heads, head_dim] fp32
    Part_Lse,  # [max_parts, num_q_heads] fp32, natural log
    # Scalars
    sm_scale,
    logit_cap,
    num_slots,
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
    SLOT_RUNS: tl.constexpr,  # items whose slots are one consecutive run take the TMA loop
    ROW_WIDTH: tl.constexpr,  # num_kv_heads * head_dim (SLOT_RUNS only)
    HAS_ACTIVE: tl.constexpr,  # Num_Active given: only its first programs of each head work
):
    # A tile must hold at least one member's GQA heads, and tl.dot needs M >= 16.
    tl.static_assert(BLOCK_M >= GQA)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    kv_head = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    num_programs = tl.num_programs(1)
    if HAS_ACTIVE:
        # The plan may split this step's work for fewer programs than the grid holds (one per SM
        # beside a concurrent decode): the items are dealt over those alone, the rest exit.
        num_programs = tl.minimum(tl.load(Num_Active), num_programs)
    num_work = tl.load(Num_Work)
    if (pid >= num_work) | (pid >= num_programs):
        # Programs of the fixed (CUDA-graph) grid with no item this step leave before building
        # the TMA descriptors below (two 128-byte global writes and a tensormap fence each):
        # with no group in the batch, every program of the prefix launch takes this exit.
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    member_local = offs_m // GQA
    head = kv_head * GQA + (offs_m % GQA)  # [BLOCK_M] query head of each stacked row
    if SLOT_RUNS:
        # Device-side descriptors over the whole pool seen as [num_slots, num_kv_heads * head_dim]
        # (contiguous pool, checked by the launcher); one box is one KV head's [BLOCK_N, HEAD_DIM].
        k_desc = tl.make_tensor_descriptor(K_Buffer, shape=[num_slots, ROW_WIDTH], strides=[ROW_WIDTH, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V_Buffer, shape=[num_slots, ROW_WIDTH], strides=[ROW_WIDTH, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])

    for w in range(pid, num_work, num_programs):
        wp = Work + w * WORK_FIELDS
        kv_start = tl.load(wp + 0)
        kv_len = tl.load(wp + 1)
        member_start = tl.load(wp + 2)
        member_count = tl.load(wp + 3)
        chunk = tl.load(wp + 4)

        # Padded rows (beyond the tile's members) load q = 0 (finite scores) and store nothing.
        mask_m = member_local < member_count
        row = tl.load(Rows + member_start + member_local, mask=mask_m, other=0).to(tl.int64)
        # int64: row * stride_q_bs can exceed 2**31 for large batches x heads x head_dim.
        q_ptrs = Q + row[:, None] * stride_q_bs + head[:, None] * stride_q_h + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base-2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # The gather call is written under both branches on purpose: Triton compiles both sides of
        # a run-time ``if``, so the TMA loop (and its descriptors) may only appear under the
        # compile-time SLOT_RUNS, and gather-only builds stay as they were.
        if SLOT_RUNS:
            # The check reads the item's slot ids once (4 bytes per key against 2 * head_dim * 2
            # bytes of KV); a radix-cache prefix allocated in one piece is one run.
            first_slot = tl.load(Kv_Indices + kv_start)
            if _is_slot_run(Kv_Indices, kv_start, kv_len, first_slot, 2048):
                m_i, l_i, acc = _attend_run(q, k_desc, v_desc, K_Buffer, V_Buffer, first_slot, kv_len, kv_head,
                                            stride_k_s, stride_k_h, stride_v_s, stride_v_h, m_i, l_i, acc,
                                            sm_scale, logit_cap, HEAD_DIM, BLOCK_N, HAS_CAP, INPUT_PRECISION)
            else:
                m_i, l_i, acc = _attend_gathered(q, K_Buffer, V_Buffer, Kv_Indices, kv_start, kv_len, kv_head,
                                                 stride_k_s, stride_k_h, stride_v_s, stride_v_h, m_i, l_i, acc,
                                                 sm_scale, logit_cap, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_CAP,
                                                 INPUT_PRECISION, K_ROW_MAJOR)
        else:
            m_i, l_i, acc = _attend_gathered(q, K_Buffer, V_Buffer, Kv_Indices, kv_start, kv_len, kv_head,
                                             stride_k_s, stride_k_h, stride_v_s, stride_v_h, m_i, l_i, acc,
                                             sm_scale, logit_cap, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_CAP,
                                             INPUT_PRECISION, K_ROW_MAJOR)

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
    slot_runs: bool | None = False,
    num_active: torch.Tensor | None = None,
) -> None:
    """Launch the segment kernel over a fixed persistent grid ``[num_kv_heads, num_programs]``.

    q ``[bs, num_q_heads, head_dim]``; k/v_buffer ``[num_slots, num_kv_heads, head_dim]`` (last
    dim contiguous); kv_indices/rows/slot_base int32; work ``[max_work, 5]`` int32;
    num_work ``[1]`` int32 (device); part_o ``[max_parts, num_q_heads, head_dim]`` fp32 and
    part_lse ``[max_parts, num_q_heads]`` fp32 (natural log) are written at the planned slots.
    k_row_major: load each K tile as stored (``[BLOCK_N, BLOCK_D]``) and transpose it for the dot,
    instead of gathering it transposed (``[BLOCK_D, BLOCK_N]``); same result, a launch variant
    measured by ``bench/kernels/run.py`` (off by default until it is faster on the GPU).
    slot_runs: a work item whose slot ids are one consecutive run (``kv_indices[kv_start + n] ==
    kv_indices[kv_start] + n``, checked in the kernel per item) loads its K/V tiles by TMA
    instead of per-row gathers; other items take the gather loop. Needs contiguous pools, a
    power-of-two head_dim and a GPU with TMA (Hopper+): :func:`slot_runs_supported`. ``None``:
    on when the pools are on a GPU that supports it, off otherwise (the one place this is decided).
    num_active: ``[1]`` int32 (device): programs per KV head that take work, ``<= num_programs``
    (the plan's choice per step; the grid is fixed at capture). ``None``: all of them.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert part_o.stride(2) == 1 and part_lse.stride(1) == 1
    assert v_buffer.shape == k_buffer.shape and k_buffer.shape[2] == head_dim, \
        f"k/v pools {tuple(k_buffer.shape)}/{tuple(v_buffer.shape)} vs q head_dim {head_dim}"
    assert q.dtype == k_buffer.dtype == v_buffer.dtype, \
        f"q/k/v dtypes {q.dtype}/{k_buffer.dtype}/{v_buffer.dtype}: one dtype for the tensor-core dots (no quantized KV)"
    assert work.shape[1] == 5 and work.is_contiguous()
    gqa = num_q_heads // num_kv_heads
    if head_dim > 128:
        # K/V tiles of 64 x 256 x 3 stages would not fit in shared memory (228 KB on H100).
        block_n, num_stages = min(block_n, 32), min(num_stages, 2)
    if slot_runs is None:
        slot_runs = k_buffer.is_cuda and slot_runs_supported(k_buffer, v_buffer)
    elif slot_runs:
        assert slot_runs_supported(k_buffer, v_buffer), "slot_runs=True: see slot_runs_supported()"
    if slot_runs:
        _ensure_descriptor_allocator()
    grid = (num_kv_heads, max(1, num_programs))
    _segment_attention_kernel[grid](
        q, k_buffer, v_buffer, kv_indices, rows, slot_base, work, num_work,
        num_work if num_active is None else num_active, part_o, part_lse,
        float(sm_scale), float(logit_cap) if logit_cap > 0 else 1.0, k_buffer.shape[0],
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), part_o.stride(0), part_o.stride(1), part_lse.stride(0),
        GQA=gqa, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, WORK_FIELDS=5, HAS_CAP=logit_cap > 0,
        # fp32 inputs: exact fp32 dot (tf32 would cost ~1e-3 relative error).
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None, K_ROW_MAJOR=k_row_major,
        SLOT_RUNS=slot_runs, ROW_WIDTH=num_kv_heads * head_dim, HAS_ACTIVE=num_active is not None,
        num_warps=num_warps, num_stages=num_stages,
    )


def slot_runs_supported(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> bool:
    """Whether the TMA run loop can read these pools: contiguous ``[num_slots, num_kv_heads,
    head_dim]`` buffers with a power-of-two head_dim (the box width), rows 16-byte aligned, on a
    GPU with the tensor-memory accelerator (compute capability >= 9) or under the interpreter."""
    head_dim = k_buffer.shape[2]
    ok = (k_buffer.is_contiguous() and v_buffer.is_contiguous() and head_dim & (head_dim - 1) == 0
          and head_dim >= 16 and (k_buffer.shape[1] * head_dim * k_buffer.element_size()) % 16 == 0
          and k_buffer.data_ptr() % 16 == 0 and v_buffer.data_ptr() % 16 == 0)
    if k_buffer.device.type == "cuda":
        return ok and torch.cuda.get_device_capability(k_buffer.device)[0] >= 9
    return ok and os.environ.get("TRITON_INTERPRET") == "1"


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # In-kernel tensor descriptors (128 B each) live in a per-launch global scratch: a torch
    # allocation on the current stream, so CUDA-graph capture takes it from the graph's pool.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_descriptor_allocator() -> None:
    """Give Triton a scratch allocator for in-kernel descriptors unless one is set already
    (Triton keeps it in a context variable; one set by the host program is left alone)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)
