"""Prefix pass read in place from the KV pool by FlashInfer's FA3 prefill (Hopper), for relay
groups whose shared segment is one run of consecutive KV slots.

Why: with GQA the prefix pass is bound by tensor-core math, not bytes (128 members x 32 query
heads against 8K keys is 17.2 GFLOP per layer). FlashInfer's FA3 kernel (warp-specialised,
TMA loads) runs it faster than the Triton segment kernel: on the H100 here GQA-4 8K x 128 took
36 us against 47, 16K 59 against 87, MHA 16K 112 against 126
(``bench/results/prefix-probe-h100-s14-pool.md``). A radix-cache prompt prefilled in one piece
sits in consecutive slots (SGLang's allocator, with ``RELAY_RADIX_SORT_FREE_SLOTS`` and
``RELAY_RADIX_CONSECUTIVE_ALLOC``), and consecutive slots are a dense ``[P, num_kv_heads,
head_dim]`` region of the pool: no copy is needed.

One ragged-prefill launch serves every such group of a step. Its key/value tensors are the
layer's whole pool ``[num_slots, num_kv_heads, head_dim]`` and ``kv_indptr`` holds absolute slot
numbers (FlashInfer only reads lengths and start offsets from it). Its requests, in order:

  * per group (taken in ascending slot order), ``S_g`` *splits*: the group's member queries
    (gathered into a static buffer, once per split) against one of ``S_g`` equal pieces of the
    segment, giving one attention state (``o`` in q's dtype, base-2 LSE) per member and split;
  * a *gap* request with no query over the slots between two groups' runs: ragged requests
    tile one non-decreasing ``kv_indptr``, and a request with no query makes no work;
  * *padding* requests with no query and no key, up to the fixed request count (in CUDA-graph
    mode FlashInfer fixes the batch size at the first plan).

``S_g`` fills the chip once: FA3 runs one CTA per SM, a CTA takes 128 stacked query rows
(members x GQA heads) of one KV head against one piece, and on the H100 one wave of CTAs was
fastest (8K x 128 members: 4 splits 36 us, 8 splits 44 us). Groups that are not one run, or do
not fit the static row/request capacity, are left to the Triton prefix launch of the same step.

Layouts (host plan -> device, all int32):
  * ``qo_indptr``/``kv_indptr`` ``[max_requests + 1]``: FlashInfer's arrays (absolute slots);
  * ``q_rows`` ``[rows]``: batch row of each stacked query row (gathered before the launch);
  * ``entry_indptr`` ``[bs + 1]`` / ``entry_pos`` ``[rows]``: for the merge, batch row ``r``'s
    states are output rows ``entry_pos[entry_indptr[r] : entry_indptr[r + 1]]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["PoolPlan", "PoolPrefixPass", "launch_gather_rows", "plan_pool_requests", "plan_ragged_pinned",
           "run_ragged_torch"]

# Stacked query rows of one FA3 CTA (members x GQA heads of one KV head); FlashInfer's SM90
# prefill tiles 128 query rows for head_dim 64/128 (fewer for 256, where this only over-splits).
CTA_ROWS = 128
# Fewest stacked rows (members x GQA heads) of a group the pass takes. Per-layer time of the
# server's path on the H100 (bench/results/kernels-h100-s15-pool.md, Triton launch / pool pass): GQA-4
# with 128 members (512 rows) 1.01-1.09x faster on the pool pass, 256 members 1.02-1.13x; with 8-64
# members 0.60-0.84x (a CTA's 128 rows mostly empty, many short splits); MHA 0.93-1.05x.
POOL_MIN_ROWS = 512


@dataclasses.dataclass(slots=True)
class PoolPlan:
    """One step's pool-prefill requests (host arrays; see the module docstring)."""

    splits: np.ndarray  # [G] int64: pieces per group this pass attends (0: left to the Triton launch)
    qo_indptr: np.ndarray  # [max_requests + 1] int32
    kv_indptr: np.ndarray  # [max_requests + 1] int32, absolute slot numbers
    q_rows: np.ndarray  # [rows] int32 batch row of each stacked query row
    entry_indptr: np.ndarray  # [bs + 1] int32
    entry_pos: np.ndarray  # [rows] int32
    num_requests: int  # live requests (splits and gaps; padding excluded)

    @property
    def taken(self) -> np.ndarray:
        """``[G]`` bool: groups this pass attends (the rest go to the Triton launch)."""
        return self.splits > 0

    @property
    def num_rows(self) -> int:
        return int(self.q_rows.size)


def plan_pool_requests(
    first_slot, seg_lens, member_indptr, member_rows, *, bs: int, gqa: int, num_kv_heads: int, num_sms: int,
    max_requests: int, max_rows: int, max_splits: int = 16, min_piece: int = 256, min_rows: int = POOL_MIN_ROWS,
) -> PoolPlan:
    """The pool-prefill requests of one decode step (NumPy, host).

    Args:
        first_slot: ``[G]`` first slot of each group's segment when it is one run, else -1.
        seg_lens: ``[G]`` tokens of each segment; member_indptr ``[G+1]``; member_rows ``[M]``.
        bs: batch rows (sizes ``entry_indptr``); gqa: query heads per KV head.
        num_sms: CTAs of one wave; max_requests / max_rows: the static capacities.
        max_splits, min_piece: most pieces of one segment, fewest keys of one piece.
        min_rows: fewest stacked rows (members x gqa) of a group the pass takes (``POOL_MIN_ROWS``).
    """
    first = np.asarray(first_slot, dtype=np.int64).reshape(-1)
    lens = np.asarray(seg_lens, dtype=np.int64).reshape(-1)
    indptr = np.asarray(member_indptr, dtype=np.int64).reshape(-1)
    rows = np.asarray(member_rows, dtype=np.int64).reshape(-1)
    num_groups = lens.size
    members = indptr[1:] - indptr[:-1]
    cand = np.flatnonzero((first >= 0) & (lens > 0) & (members > 0) & (members * gqa >= min_rows))
    cand = cand[np.argsort(first[cand], kind="stable")]
    # Runs of different groups are disjoint slot ranges (different tree nodes); an overlap would
    # make kv_indptr decrease, so a group that overlaps the previous one is left to Triton.
    keep, end = [], -1
    for g in cand.tolist():
        if first[g] >= end:
            keep.append(g)
            end = first[g] + lens[g]
    keep = np.asarray(keep, dtype=np.int64)

    splits = np.zeros(num_groups, dtype=np.int64)
    if keep.size:
        ctas = -(-members[keep] * gqa // CTA_ROWS) * num_kv_heads  # CTAs of one piece
        piece = max(float(min_piece), float((ctas * lens[keep]).sum()) / num_sms)  # keys per CTA, one wave
        s = np.clip(np.floor(lens[keep] / piece), 1, max_splits).astype(np.int64)
        while keep.size:
            gaps = int((first[keep][1:] > first[keep][:-1] + lens[keep][:-1]).sum())
            if int((members[keep] * s).sum()) <= max_rows and int(s.sum()) + gaps <= max_requests:
                break
            if (s > 1).any():
                s = -(-s // 2)
            else:  # even one piece each does not fit: the last run goes to Triton
                keep, s = keep[:-1], s[:-1]
        splits[keep] = s

    qo_lens, kv_bounds, q_rows = [], [], []
    start_kv = int(first[keep[0]]) if keep.size else 0
    cur_kv = start_kv
    for g in keep.tolist():
        if first[g] > cur_kv:  # gap: no query over the slots between two runs
            qo_lens.append(0)
            kv_bounds.append(int(first[g]))
        m = rows[indptr[g] : indptr[g + 1]]
        s = int(splits[g])
        for i in range(s):
            qo_lens.append(m.size)
            kv_bounds.append(int(first[g] + lens[g] * (i + 1) // s))
            q_rows.append(m)
        cur_kv = int(first[g] + lens[g])
    n_live = len(qo_lens)
    assert n_live <= max_requests
    qo_indptr = np.zeros(max_requests + 1, dtype=np.int64)
    kv_indptr = np.full(max_requests + 1, start_kv, dtype=np.int64)
    if n_live:
        qo_indptr[1 : n_live + 1] = np.cumsum(qo_lens)
        qo_indptr[n_live + 1 :] = qo_indptr[n_live]
        kv_indptr[1 : n_live + 1] = kv_bounds
        kv_indptr[n_live + 1 :] = kv_bounds[-1]
    q_rows = np.concatenate(q_rows) if q_rows else np.zeros(0, dtype=np.int64)
    # Entries by batch row: output row i holds a state of batch row q_rows[i].
    order = np.argsort(q_rows, kind="stable")
    entry_indptr = np.zeros(bs + 1, dtype=np.int64)
    np.cumsum(np.bincount(q_rows, minlength=bs)[:bs], out=entry_indptr[1:])
    i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return PoolPlan(splits=splits, qo_indptr=i32(qo_indptr), kv_indptr=i32(kv_indptr),
                    q_rows=i32(q_rows), entry_indptr=i32(entry_indptr), entry_pos=i32(order), num_requests=n_live)


@triton.jit
def _gather_rows_kernel(Src, Rows, Num_Rows, Dst, stride_src, stride_dst, ROW_ELEMS: tl.constexpr,
                        BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    """Dst[i] = Src[Rows[i]] for i < Num_Rows[0]; a fixed grid (CUDA graphs), idle programs exit."""
    n = tl.load(Num_Rows)
    first = tl.program_id(0) * ROWS_PER_PROGRAM
    if first >= n:
        return
    offs = tl.arange(0, BLOCK)
    for j in range(ROWS_PER_PROGRAM):
        i = first + j
        if i < n:
            r = tl.load(Rows + i).to(tl.int64)
            for c in range(0, ROW_ELEMS, BLOCK):
                m = c + offs < ROW_ELEMS
                x = tl.load(Src + r * stride_src + c + offs, mask=m)
                tl.store(Dst + i.to(tl.int64) * stride_dst + c + offs, x, mask=m)


def launch_gather_rows(src: torch.Tensor, rows: torch.Tensor, num_rows: torch.Tensor, dst: torch.Tensor,
                       rows_per_program: int = 4) -> None:
    """``dst[i] = src[rows[i]]`` for ``i < num_rows[0]`` (device count; the grid covers
    ``dst.shape[0]`` rows). src ``[n, ...]`` / dst ``[max_rows, ...]`` with contiguous rows."""
    row_elems = src[0].numel()
    assert dst[0].numel() == row_elems and src.dtype == dst.dtype
    assert src[0].is_contiguous() and dst[0].is_contiguous()
    block = min(4096, triton.next_power_of_2(row_elems))
    grid = (max(1, triton.cdiv(dst.shape[0], rows_per_program)),)
    _gather_rows_kernel[grid](src, rows, num_rows, dst, src.stride(0), dst.stride(0), ROW_ELEMS=row_elems,
                              BLOCK=block, ROWS_PER_PROGRAM=rows_per_program, num_warps=4)


class PoolPrefixPass:
    """Static buffers and the FlashInfer FA3 ragged-prefill wrapper of the pool prefix pass.

    The caller (:class:`relay_radix.kernels.TritonRelayDecode`) owns the int32 plan table on the
    device (``q_rows``, ``num_rows``, ``entry_*``); this object owns the gathered queries and
    the states: ``q`` / ``o`` ``[max_rows, num_q_heads, head_dim]`` (q's dtype: FlashInfer
    writes ``o`` in it), ``lse2`` ``[max_rows, num_q_heads]`` fp32 **base 2**.

    ``backend="fa3"``: FlashInfer, CUDA-graph mode (fixed request count, buffers fixed at the
    first plan, made here with ``max_rows`` rows so any later plan fits). ``backend="torch"``:
    the same requests attended by a float32 PyTorch loop over the host plan (the CPU tests of
    the plan layout; not capturable).
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, *, max_requests: int, max_rows: int, backend: str = "fa3",
                 workspace_bytes: int = 32 << 20) -> None:
        assert backend in ("fa3", "torch"), backend
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device, self.backend = dtype, torch.device(device), backend
        self.max_requests, self.max_rows = max_requests, max_rows
        self.q = torch.zeros((max_rows, num_q_heads, head_dim), dtype=dtype, device=self.device)
        self.o = torch.zeros_like(self.q)
        self.lse2 = torch.zeros((max_rows, num_q_heads), dtype=torch.float32, device=self.device)
        self._host_plan: PoolPlan | None = None
        self._plan_event = None
        self._planned_empty = False  # FlashInfer's buffers hold a plan with no query row
        self._wrapper = None
        if backend == "fa3":
            import flashinfer

            i32 = dict(dtype=torch.int32, device=self.device)
            self._ws = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
            self._wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                self._ws, "NHD", backend="fa3", use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(max_requests + 1, **i32), kv_indptr_buf=torch.zeros(max_requests + 1, **i32))
            # The first plan fixes FlashInfer's row capacity: plan max_rows rows once (one
            # request over slot 0), so every later plan fits it.
            qo = np.full(max_requests + 1, max_rows, dtype=np.int32)
            qo[0] = 0
            kv = np.ones(max_requests + 1, dtype=np.int32)
            kv[0] = 0
            self._plan_flashinfer(qo, kv)

    def _plan_flashinfer(self, qo_indptr: np.ndarray, kv_indptr: np.ndarray) -> None:
        """FlashInfer's schedule for these requests; the scale is set per layer at run."""
        self._plan_event = plan_ragged_pinned(self._wrapper, qo_indptr, kv_indptr, self.num_q_heads,
                                              self.num_kv_heads, self.head_dim, self.dtype, self._plan_event)

    def plan(self, pp: PoolPlan) -> None:
        """Host work: FlashInfer's schedule for ``pp`` (the caller copies ``pp``'s tables)."""
        assert pp.qo_indptr.size == self.max_requests + 1 and pp.num_rows <= self.max_rows
        self._host_plan = pp
        if self._wrapper is not None and not (pp.num_rows == 0 and self._planned_empty):
            # (A step with no group for the pass after another one keeps the empty schedule:
            # FlashInfer's plan costs ~1 ms of host time.)
            self._plan_flashinfer(pp.qo_indptr, pp.kv_indptr)
            self._planned_empty = pp.num_rows == 0

    def run(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, *, q_rows: torch.Tensor,
            num_rows: torch.Tensor, sm_scale: float) -> None:
        """One layer: gather the member queries, attend every request -> ``self.o``/``self.lse2``.

        q ``[bs, num_q_heads, head_dim]``; k/v_buffer the layer's pool ``[num_slots,
        num_kv_heads, head_dim]``; q_rows ``[max_rows]`` int32 and num_rows ``[1]`` int32 (device,
        the caller's plan table)."""
        launch_gather_rows(q, q_rows, num_rows, self.q)
        if self._wrapper is None:
            self._run_torch(k_buffer, v_buffer, sm_scale)
            return
        w = self._wrapper
        # Read at run (FlashInfer's own forward() sets it the same way), so one plan serves every
        # layer's scale; a captured launch keeps its layer's value.
        w._sm_scale = sm_scale
        # FlashInfer's Python check wants q's rows to equal the planned rows; the launch must see
        # the whole static buffer (a captured graph replays later plans with more rows), and the
        # kernel reads each request's rows through qo_indptr only.
        w._qo_indptr_last = self.max_rows
        w.run(self.q, k_buffer, v_buffer, out=self.o, lse=self.lse2, return_lse=True)

    def _run_torch(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor, sm_scale: float) -> None:
        """The requests of the last plan in float32 (CPU tests of the layout, not of FA3)."""
        pp = self._host_plan
        run_ragged_torch(self.q, k_buffer, v_buffer, pp.qo_indptr[: pp.num_requests + 1],
                         pp.kv_indptr[: pp.num_requests + 1], sm_scale, self.o, self.lse2)


def plan_ragged_pinned(wrapper, qo_indptr: np.ndarray, kv_indptr: np.ndarray, num_q_heads: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, last_event):
    """Plan a FlashInfer ragged prefill wrapper (non-causal, scale set per layer at run) from
    pinned copies of the host indptrs; returns the event after the plan's copies.

    FlashInfer stages its schedule in one pinned buffer per wrapper and copies it
    asynchronously: ``last_event`` (the previous plan's, or None) is waited on before that buffer
    is overwritten (it was queued a step or a batch ago, so this normally returns at once).
    Pinned indptrs: a pageable host->device copy would wait for the stream (a hidden sync)."""
    if last_event is not None:
        last_event.synchronize()
    pin = lambda a: torch.from_numpy(np.ascontiguousarray(a)).pin_memory()  # noqa: E731
    wrapper.plan(pin(qo_indptr), pin(kv_indptr), num_q_heads, num_kv_heads, head_dim,
                 causal=False, sm_scale=1.0, q_data_type=dtype, kv_data_type=dtype)
    event = torch.cuda.Event()
    event.record()
    return event


def run_ragged_torch(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, qo_indptr, kv_indptr,
                     sm_scale: float, o: torch.Tensor, lse2: torch.Tensor) -> None:
    """Non-causal ragged requests in float32 PyTorch, as FlashInfer's ragged prefill plans them:
    request ``i``'s query rows ``q[qo_indptr[i]:qo_indptr[i+1]]`` attend pool rows
    ``kv_indptr[i]:kv_indptr[i+1]`` (absolute slots); writes ``o`` (its dtype) and the base-2
    LSE ``lse2`` of those rows. The CPU stand-in for FA3 in the layout tests."""
    g = q.shape[1] // k_buffer.shape[1]
    for i in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[i]), int(qo_indptr[i + 1])
        k0, k1 = int(kv_indptr[i]), int(kv_indptr[i + 1])
        if q1 == q0:
            continue
        qf = q[q0:q1].float()  # [m, hq, d]
        kf = k_buffer[k0:k1].float().repeat_interleave(g, dim=1)  # [n, hq, d]
        vf = v_buffer[k0:k1].float().repeat_interleave(g, dim=1)
        s = torch.einsum("mhd,nhd->mhn", qf, kf) * sm_scale
        lse = torch.logsumexp(s, -1)
        o[q0:q1] = torch.einsum("mhn,nhd->mhd", torch.exp(s - lse[..., None]), vf).to(o.dtype)
        lse2[q0:q1] = lse / 0.6931471805599453
