"""Relay decode attention in Triton: plan/run wrapper with static (CUDA-graph) buffers.

Per decode step, :meth:`TritonRelayDecode.plan` builds the work lists on the CPU
(:mod:`relay_radix.kernels.work_plan`) and copies them, with the slot lists, into buffers
allocated once in ``__init__``. Per layer, :meth:`TritonRelayDecode.run` issues three
fixed-grid launches that read only those buffers, q and the layer's KV pool:

  1. prefix segment kernel: every group's member queries (members x GQA heads stacked in M)
     against the group's shared KV, split in chunks -> fp32 partials;
  2. suffix segment kernel: each row's GQA heads against its own KV, split in chunks;
  3. merge kernel: per (row, head block), exact LSE merge of the row's part slots -> ``o``.

So ``run`` can be captured in a CUDA graph once and replayed after any later ``plan`` that
fits the capacities given to ``__init__``.

``prefix_pool="fa3"`` (the server's default for GQA models on Hopper): groups whose segment is one
run of consecutive slots go to FlashInfer's FA3 prefill over the pool in place
(:mod:`relay_radix.kernels.pool_prefix`, launched before launch 1 on the same stream), and launch
3 also folds their states.

``external_suffix=True`` (the server's default on CUDA): the suffixes are attended by ordinary
paged decode outside this object (SGLang's FlashInfer decode wrapper, the kernel vanilla
decode uses), which writes each row's suffix state into ``o`` and a base-2 LSE; ``run`` then
skips launch 2 and merges the prefix parts on top of that state in place. With no shared
segment in the batch this is vanilla decode plus one near-empty launch and an LSE copy.

``prefix_stream=True`` (CUDA, with ``run(suffix_state=...)``): the prefix launch runs on a
side stream while the suffix decode runs on the current one, joined before the merge. The
prefix pass is bound by tensor-core math (members x heads stacked against one KV read), the
suffix decode by HBM bandwidth, so the two overlap on the chip. Fork and join are stream
waits, which CUDA-graph capture records as graph edges.
"""

from __future__ import annotations

import torch

from .pool_prefix import POOL_MIN_ROWS, PoolPrefixPass, plan_pool_requests
from .triton_merge import launch_merge_parts
from .triton_segment import launch_segment_attention
from .work_plan import WORK_FIELDS, RelayWorkPlan, build_work_plan, prefix_tile_tokens, run_one_shot

__all__ = ["LONG_PREFIX_TILE_TOKENS_PER_SM", "TritonRelayDecode", "planned_programs_per_sm", "relay_decode_triton"]

# Prefix work per SM (tile-tokens: KV tokens walked per member tile and KV head, over the SM
# count) above which a prefix launch that runs beside the suffix decode on a grid of two programs
# per SM still splits its work for both, when a short step's split is asked for
# (``concurrent_programs_per_sm``, opt-in). Kernel bench, H100, server path
# (bench/results/kernels-h100-s14.md): on MHA one busy program per SM was 2-9% faster up to 4K
# tile-tokens per SM (4K x 256 members: 437 against 449 us), two 3.5-9% faster from 7.9K (16K x
# 128: 324 against 336 us; 32K x 256: 681 against 746 us).
LONG_PREFIX_TILE_TOKENS_PER_SM = 6144


def planned_programs_per_sm(tile_tokens_per_sm: float, *, concurrent: bool, grid_programs_per_sm: int,
                            concurrent_programs_per_sm: int | None = 1,
                            long_prefix: float = LONG_PREFIX_TILE_TOKENS_PER_SM) -> int:
    """Programs per SM one step's prefix work is split for (its chunk sizes; never above the grid).

    ``concurrent``: the prefix launch runs on a side stream beside the suffix decode. Then a
    short prefix pass is split for ``concurrent_programs_per_sm`` (the rest of the persistent
    grid finds no work and exits), leaving the SMs to the decode; a long one
    (``tile_tokens_per_sm > long_prefix``) is the step's long pole and takes the whole grid.
    ``concurrent_programs_per_sm=None`` always uses the grid.
    """
    if concurrent and concurrent_programs_per_sm and tile_tokens_per_sm <= long_prefix:
        return min(grid_programs_per_sm, concurrent_programs_per_sm)
    return grid_programs_per_sm


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU interpreter: few programs keep tests fast


class TritonRelayDecode:
    """Relay decode attention (shared prefix segments once per group + own suffix per row).

    Static device buffers (allocated here, addresses fixed for the object's life, so a CUDA
    graph captured around :meth:`run` stays valid after a new :meth:`plan`):
      * ``_meta`` int32: live counts, ``row_part_indptr``, per-membership slot bases,
        ``member_rows`` and both work lists (one H2D copy per plan),
      * ``_prefix_kv_indices`` ``[max_prefix_tokens]``, ``_suffix_kv_indices`` ``[max_suffix_tokens]`` int32,
      * ``part_o`` ``[max_parts, num_q_heads, head_dim]`` fp32, ``part_lse`` ``[max_parts, num_q_heads]`` fp32,
      * ``lse`` ``[max_bs, num_q_heads]`` fp32 (natural-log LSE of the merged output).

    Args:
        num_q_heads, num_kv_heads, head_dim: attention shape (``num_q_heads % num_kv_heads == 0``).
        dtype: q/KV dtype (bf16, fp16 or fp32).
        device: where the buffers live.
        max_bs, max_groups, max_members: most rows, groups and memberships of one step.
        max_prefix_tokens, max_suffix_tokens: most slot ids in ``prefix_kv_indices`` /
            ``suffix_kv_indices`` of one step.
        max_parts: fp32 partial slots (default ``4 * max_bs + 8 * max_members``); plans use
            larger chunks when they would need more.
        external_suffix: suffixes are attended outside (see the module docstring): ``plan``
            takes no suffix slot list and ``run`` needs ``base_lse2``.
        prefix_block_m: stacked query rows per prefix program (16/32/64/128); default 64.
        num_sms: programs are sized from it (default: the device's SM count).
        programs_per_sm: persistent programs per SM of the prefix launch (over all KV heads):
            its fixed grid (default 2).
        concurrent_programs_per_sm: with ``external_suffix`` and ``prefix_stream``, a step whose
            prefix work is short is split for this many programs per SM, not the grid's
            (:func:`planned_programs_per_sm`); ``None`` (default): always the grid's. Opt-in
            (``RELAY_RADIX_PREFIX_PROGRAMS``): the kernel bench finds one busy program per SM
            faster beside FlashInfer's decode (GQA-4 up to 1.13x), but inside the server's
            replayed decode step it was slower (session 14, H100, GQA-4 16K x 128 median TPOT:
            grid of 1 per SM 14.5 ms, 2 per SM 12.7 ms; bench/results/serving-h100-80gb-hbm3-s14.md).
        suffix_programs_per_sm: the suffix launch's own count. Default 16: suffix items are
            short, so a program's items form a chain of dependent loads; on the H100 here 16
            against 2 cut relay-Triton from 0.295 to 0.279 ms (MHA 4K x 128) and 0.079 to
            0.073 ms (GQA-4, no sharing, 128 short rows), MHA no-sharing 4K x 32 within 0.6%;
            but GQA-4 no-sharing 4K x 32 (one long item per row and head) went 0.201 -> 0.230 ms.
        prefix_stream: run the prefix launch on a side stream, concurrent with the suffix
            decode that ``run(suffix_state=...)`` issues (CUDA only; ignored on the CPU).
        k_row_major: K tile load variant of the segment kernel (``launch_segment_attention``).
        prefix_slot_runs: prefix work items whose slots are one consecutive run load K/V by TMA
            (``launch_segment_attention(slot_runs=...)``). ``None`` (default): on where the pools
            allow it (``slot_runs_supported``: Hopper+, contiguous pools, power-of-two head_dim).
            A radix-cache prefix prefilled in one piece sits in consecutive slots
            (SGLang's allocator hands out its never-used slots in order, and freed ones sorted with
            ``RELAY_RADIX_SORT_FREE_SLOTS``); on the H100 here the run loop took
            the GQA-4 8K x 128 prefix pass from 70.8 to 47.2 us, MHA 16K from 148 to 131 us
            (``bench/results/prefix-probe-h100.md``). Items that are not one run are gathered.
        prefix_pool: groups whose segment is one run of slots (``plan(prefix_first_slot_cpu=...)``)
            are attended by FlashInfer's FA3 prefill reading the pool in place
            (:mod:`relay_radix.kernels.pool_prefix`; Hopper, no logit cap); the other groups of
            the step take the Triton launch, and the merge folds both. ``"fa3"`` or ``"torch"``
            (the same requests in a float32 PyTorch loop: CPU tests of the layout); ``None``: off.
        pool_max_rows: stacked query rows (members x splits) of the pool pass (default ``4 * max_bs``).
        pool_min_rows: a group goes to the pool pass only with at least this many stacked rows
            (members x GQA heads; default ``pool_prefix.POOL_MIN_ROWS``: smaller ones were slower there).
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        max_bs: int,
        max_groups: int,
        max_members: int,
        max_prefix_tokens: int,
        max_suffix_tokens: int,
        max_parts: int | None = None,
        external_suffix: bool = False,
        max_suffix_splits: int = 16,
        prefix_block_m: int = 64,
        block_n: int = 64,
        min_chunk: int = 256,
        num_sms: int | None = None,
        programs_per_sm: int = 2,
        concurrent_programs_per_sm: int | None = None,
        suffix_programs_per_sm: int = 16,
        num_warps_prefix: int = 4,
        num_stages_prefix: int = 3,
        num_warps_suffix: int = 4,
        num_stages_suffix: int = 3,
        prefix_stream: bool = False,
        k_row_major: bool = False,
        prefix_slot_runs: bool | None = None,
        prefix_pool: str | None = None,
        pool_max_rows: int | None = None,
        pool_min_rows: int = POOL_MIN_ROWS,
    ) -> None:
        assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads (GQA)"
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.gqa = num_q_heads // num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.max_bs, self.max_groups, self.max_members = max_bs, max_groups, max_members
        self.max_suffix_splits = max_suffix_splits
        self.external_suffix = external_suffix
        if external_suffix:
            max_suffix_tokens = 0  # no suffix slot list, no suffix work
        self.block_n, self.min_chunk = block_n, min_chunk
        assert prefix_block_m >= 16 and prefix_block_m & (prefix_block_m - 1) == 0, "prefix_block_m: power of 2 >= 16"
        self.prefix_block_m = max(prefix_block_m, _next_pow2(self.gqa))
        self.members_per_tile = self.prefix_block_m // self.gqa
        self.suffix_block_m = max(16, _next_pow2(self.gqa))
        self.num_sms = num_sms or _num_sms(self.device)
        # Decided from the flags, not from the side stream (which exists on CUDA only), so the
        # CPU tests plan as the server does.
        self.concurrent = external_suffix and prefix_stream
        self.programs_per_sm = programs_per_sm
        self.target_programs = self.num_sms * programs_per_sm
        self.concurrent_programs_per_sm = concurrent_programs_per_sm
        self.launch_cfg = dict(num_warps_prefix=num_warps_prefix, num_stages_prefix=num_stages_prefix,
                               num_warps_suffix=num_warps_suffix, num_stages_suffix=num_stages_suffix)
        self.k_row_major = k_row_major
        self.prefix_slot_runs = prefix_slot_runs
        self.max_parts = max_parts or (4 * max_bs + 8 * max_members)
        max_tiles = max_groups + -(-max_members // self.members_per_tile)
        max_prefix_chunks = max(1, -(-self.max_parts // max(1, max_members)))
        self.max_prefix_work = max_tiles * max_prefix_chunks
        self.max_suffix_work = 0 if external_suffix else max_bs * max_suffix_splits

        # Persistent grids, split over the KV heads and never more than the capacity. Prefix:
        # programs_per_sm per SM in total (all co-resident: one wave, no straggler programs).
        per_head = max(1, self.target_programs // num_kv_heads)
        self.prefix_programs = min(self.max_prefix_work, max(per_head, 1))
        # Suffix items are short: more programs than co-resident slots shorten each program's
        # chain of dependent loads (suffix_programs_per_sm).
        s_per_head = max(1, self.num_sms * suffix_programs_per_sm // num_kv_heads)
        self.suffix_programs = min(self.max_suffix_work, s_per_head)

        # Pool prefix pass: one wave of FA3 CTAs needs at most ~num_sms splits over all groups, plus
        # one gap request between consecutive groups' runs.
        self.pool = None
        self.pool_min_rows = pool_min_rows
        pool_rows = 0
        if prefix_pool is not None:
            pool_rows = pool_max_rows or 4 * max_bs
            self.pool = PoolPrefixPass(num_q_heads, num_kv_heads, head_dim, dtype, self.device,
                                       max_requests=2 * max_groups + self.num_sms, max_rows=pool_rows,
                                       backend=prefix_pool)

        # One packed int32 table (one H2D copy per plan): views at fixed offsets.
        sizes = dict(counts=4, row_part_indptr=max_bs + 1, prefix_slot_base=max(1, max_members),
                     member_rows=max(1, max_members), prefix_work=self.max_prefix_work * WORK_FIELDS,
                     suffix_work=self.max_suffix_work * WORK_FIELDS, pool_num_rows=1,
                     pool_q_rows=max(1, pool_rows), pool_entry_indptr=max_bs + 1, pool_entry_pos=max(1, pool_rows))
        self._offsets, off = {}, 0
        for k, n in sizes.items():
            self._offsets[k] = (off, n)
            off += n
        self._meta = torch.zeros(off, dtype=torch.int32, device=self.device)
        # Host staging: pinned double buffer on CUDA. plan() writes buffer i while the
        # non_blocking copy of buffer i^1 (the previous step) may still be in flight; before
        # reusing buffer i we wait on the event recorded after its own copy two plans ago.
        pin = self.device.type == "cuda"
        self._stage = [torch.zeros(off, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._stage_event = [None, None]
        self._stage_idx = 0
        # [num_prefix_work, num_suffix_work, bs, prefix programs per KV head that take work]
        self.counts = self._view("counts")
        self.row_part_indptr = self._view("row_part_indptr")
        self.prefix_slot_base = self._view("prefix_slot_base")
        self.member_rows = self._view("member_rows")
        self.prefix_work = self._view("prefix_work").view(self.max_prefix_work, WORK_FIELDS)
        self.suffix_work = self._view("suffix_work").view(self.max_suffix_work, WORK_FIELDS)
        self.num_prefix_work = self.counts[0:1]
        self.num_suffix_work = self.counts[1:2]
        self.num_rows = self.counts[2:3]
        self.num_prefix_active = self.counts[3:4]
        self.pool_num_rows = self._view("pool_num_rows")
        self.pool_q_rows = self._view("pool_q_rows")
        self.pool_entry_indptr = self._view("pool_entry_indptr")
        self.pool_entry_pos = self._view("pool_entry_pos")
        self.row_arange = torch.arange(max_bs, dtype=torch.int32, device=self.device)

        self._prefix_kv_indices = torch.zeros(max(1, max_prefix_tokens), dtype=torch.int32, device=self.device)
        self._suffix_kv_indices = torch.zeros(max(1, max_suffix_tokens), dtype=torch.int32, device=self.device)
        self.part_o = torch.empty((self.max_parts, num_q_heads, head_dim), dtype=torch.float32, device=self.device)
        self.part_lse = torch.empty((self.max_parts, num_q_heads), dtype=torch.float32, device=self.device)
        self.lse = torch.empty((max_bs, num_q_heads), dtype=torch.float32, device=self.device)
        self.last_plan: RelayWorkPlan | None = None
        self.last_pool_plan = None
        # Made here, not in run(): a stream cannot be created during CUDA-graph capture.
        self._prefix_stream = torch.cuda.Stream(self.device) if prefix_stream and self.device.type == "cuda" else None

    def _view(self, name: str) -> torch.Tensor:
        off, n = self._offsets[name]
        return self._meta[off : off + n]

    def plan(
        self,
        *,
        prefix_kv_indices: torch.Tensor,
        suffix_kv_indices: torch.Tensor | None,
        prefix_lens_cpu: torch.Tensor,
        member_indptr_cpu: torch.Tensor,
        member_rows_cpu: torch.Tensor,
        suffix_lens_cpu: torch.Tensor,
        prefix_kv_indptr: torch.Tensor | None = None,
        member_indptr: torch.Tensor | None = None,
        member_rows: torch.Tensor | None = None,
        suffix_kv_indptr: torch.Tensor | None = None,
        prefix_first_slot_cpu: torch.Tensor | None = None,
    ) -> RelayWorkPlan:
        """Host work of one decode step: build work lists, fill the static buffers.

        Args:
            prefix_kv_indices: ``[total_prefix_tokens]`` int32 slot ids (device or CPU), groups
                concatenated in group order (``prefix_kv_indptr = [0, cumsum(prefix_lens_cpu)]``).
            suffix_kv_indices: ``[total_suffix_tokens]`` int32 slot ids, rows concatenated
                (``None`` with ``external_suffix``: the suffixes are attended outside).
            prefix_lens_cpu: ``[num_groups]`` CPU ints, tokens of each shared segment.
            member_indptr_cpu: ``[num_groups+1]`` CPU ints.
            member_rows_cpu: ``[total_members]`` CPU ints (batch rows).
            suffix_lens_cpu: ``[bs]`` CPU ints (0 allowed; with ``external_suffix`` only the
                batch size is taken from it).
            prefix_kv_indptr, member_indptr, member_rows, suffix_kv_indptr: the device copies of
                the same CSR arrays; unused here (offsets come from the CPU lengths, so plan never
                reads the device), accepted so both relay paths take one call.
            prefix_first_slot_cpu: ``[num_groups]`` CPU int64, with ``prefix_pool``: a group's first
                slot when its segment is one run of consecutive slots (``prefix_kv_indices`` of the
                group equal ``first + arange(len)``), else -1. Such groups go to the pool pass.
                The caller vouches for it (the pool pass reads those slots without the list).

        Returns the :class:`RelayWorkPlan` (also kept as ``self.last_plan``). Issues only
        stream-ordered copies: no device synchronisation.
        """
        del prefix_kv_indptr, member_indptr, member_rows, suffix_kv_indptr
        bs = int(suffix_lens_cpu.numel())
        nm = int(member_rows_cpu.numel())
        assert bs <= self.max_bs, f"bs={bs} > max_bs={self.max_bs}"
        assert int(prefix_lens_cpu.numel()) <= self.max_groups, "more groups than max_groups"
        assert nm <= self.max_members, "more memberships than max_members"
        if self.external_suffix:
            assert suffix_kv_indices is None, "external_suffix: the suffix slots are not planned here"
            suffix_lens_cpu = torch.zeros(bs, dtype=torch.int64)  # no suffix parts: merged from the base state
            suffix_kv_indices = prefix_kv_indices[:0]
        npt, nst = int(prefix_kv_indices.numel()), int(suffix_kv_indices.numel())
        assert npt <= self._prefix_kv_indices.numel() and nst <= self._suffix_kv_indices.numel(), "KV tokens over capacity"
        pool_plan = None
        if self.pool is not None:
            first = prefix_first_slot_cpu if prefix_first_slot_cpu is not None \
                else torch.full((int(prefix_lens_cpu.numel()),), -1, dtype=torch.int64)
            pool_plan = plan_pool_requests(
                first, prefix_lens_cpu, member_indptr_cpu, member_rows_cpu, bs=bs, gqa=self.gqa,
                num_kv_heads=self.num_kv_heads, num_sms=self.num_sms, max_requests=self.pool.max_requests,
                max_rows=self.pool.max_rows, min_rows=self.pool_min_rows)
            if pool_plan.taken.any():
                # The Triton launch keeps the other groups: taken groups keep their place in the
                # slot list (offsets unchanged) with no member, so they get no work item.
                counts = (member_indptr_cpu[1:] - member_indptr_cpu[:-1]).to(torch.int64)
                taken = torch.from_numpy(pool_plan.taken)
                member_rows_cpu = member_rows_cpu[~torch.repeat_interleave(taken, counts)]
                member_indptr_cpu = torch.zeros_like(member_indptr_cpu)
                member_indptr_cpu[1:] = torch.cumsum(counts.masked_fill(taken, 0), 0)
                nm = int(member_rows_cpu.numel())
        per_sm = prefix_tile_tokens(prefix_lens_cpu, member_indptr_cpu, self.members_per_tile) \
            * self.num_kv_heads / self.num_sms
        pps = planned_programs_per_sm(per_sm, concurrent=self.concurrent, grid_programs_per_sm=self.programs_per_sm,
                                      concurrent_programs_per_sm=self.concurrent_programs_per_sm)
        # Programs per KV head that take work: the plan's share of the fixed grid.
        active = min(self.prefix_programs, max(1, self.num_sms * pps // self.num_kv_heads))
        wp = build_work_plan(
            prefix_lens=prefix_lens_cpu, member_indptr=member_indptr_cpu, member_rows=member_rows_cpu,
            suffix_lens=suffix_lens_cpu, members_per_tile=self.members_per_tile, num_kv_heads=self.num_kv_heads,
            target_programs=self.num_sms * pps, prefix_programs_per_head=active, block_n=self.block_n,
            min_chunk=self.min_chunk,
            max_suffix_splits=self.max_suffix_splits, max_prefix_work=self.max_prefix_work,
            max_suffix_work=self.max_suffix_work, max_parts=self.max_parts,
        )
        i = self._stage_idx
        self._stage_idx ^= 1
        if self._stage_event[i] is not None:
            self._stage_event[i].synchronize()  # the copy from this staging buffer two plans ago
        st = self._stage[i]

        def put(name: str, t: torch.Tensor) -> None:
            off, _ = self._offsets[name]
            st[off : off + t.numel()] = t.reshape(-1)

        put("counts", torch.tensor([wp.prefix_work.shape[0], wp.suffix_work.shape[0], bs, active], dtype=torch.int32))
        put("row_part_indptr", wp.row_part_indptr)
        put("prefix_slot_base", wp.prefix_slot_base)
        put("member_rows", member_rows_cpu.to(torch.int32))
        put("prefix_work", wp.prefix_work)
        put("suffix_work", wp.suffix_work)
        if pool_plan is not None:
            put("pool_num_rows", torch.tensor([pool_plan.num_rows], dtype=torch.int32))
            put("pool_q_rows", torch.from_numpy(pool_plan.q_rows))
            put("pool_entry_indptr", torch.from_numpy(pool_plan.entry_indptr))
            put("pool_entry_pos", torch.from_numpy(pool_plan.entry_pos))
            self.pool.plan(pool_plan)
        non_blocking = self.device.type == "cuda"
        self._meta.copy_(st, non_blocking=non_blocking)
        if non_blocking:
            ev = torch.cuda.Event()
            ev.record()
            self._stage_event[i] = ev
        if npt:
            self._prefix_kv_indices[:npt].copy_(prefix_kv_indices, non_blocking=non_blocking)
        if nst:
            self._suffix_kv_indices[:nst].copy_(suffix_kv_indices, non_blocking=non_blocking)
        self.last_plan = wp
        self.last_pool_plan = pool_plan
        return wp

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        o: torch.Tensor,
        *,
        sm_scale: float,
        logit_cap: float = 0.0,
        base_lse2: torch.Tensor | None = None,
        suffix_state=None,
    ) -> torch.Tensor:
        """One layer's relay decode attention over the last plan (CUDA-graph capturable).

        Args:
            q: ``[bs, num_q_heads, head_dim]`` (``bs`` = the planned batch size; rows are read only
                through the plan, so a padded q with more rows is fine).
            k_buffer, v_buffer: ``[num_slots, num_kv_heads, head_dim]`` the layer's KV pool.
            o: ``[bs, num_q_heads, head_dim]`` output, written in full for the planned rows (mutated).
            sm_scale, logit_cap: per layer (taken at run time, not plan time).
            base_lse2: ``external_suffix`` only: ``[>=bs, num_q_heads]`` fp32 base-2 LSE of the
                suffix state that ``o`` holds on entry (FlashInfer's ``return_lse`` output).
            suffix_state: ``external_suffix`` only: a callable that writes that state into
                ``(o, base_lse2)`` on the current stream; given, ``run`` calls it after issuing
                the prefix launch (on the side stream with ``prefix_stream``), so the two
                overlap. Without it, ``o``/``base_lse2`` must hold the state on entry.

        Returns ``o``. ``self.lse[:bs]`` holds the natural-log LSE of each output row.
        """
        assert q.shape[1:] == (self.num_q_heads, self.head_dim) and o.shape[1:] == q.shape[1:]
        assert k_buffer.shape[1:] == (self.num_kv_heads, self.head_dim)  # V and dtypes: launch_segment_attention
        assert self.last_plan is not None, "run() before plan()"
        assert min(q.shape[0], o.shape[0]) >= self.last_plan.bs, \
            f"q/o have {q.shape[0]}/{o.shape[0]} rows, the plan {self.last_plan.bs}"
        cfg = self.launch_cfg
        common = dict(q=q, k_buffer=k_buffer, v_buffer=v_buffer, part_o=self.part_o, part_lse=self.part_lse,
                      sm_scale=sm_scale, logit_cap=logit_cap, block_n=self.block_n, k_row_major=self.k_row_major)

        if self.pool is not None:
            assert logit_cap == 0.0, "prefix_pool: FlashInfer's pool pass is planned without a logit cap"

        def launch_prefix():
            if self.pool is not None:
                self.pool.run(q, k_buffer, v_buffer, q_rows=self.pool_q_rows, num_rows=self.pool_num_rows,
                              sm_scale=sm_scale)
            launch_segment_attention(
                kv_indices=self._prefix_kv_indices, rows=self.member_rows, slot_base=self.prefix_slot_base,
                work=self.prefix_work, num_work=self.num_prefix_work, num_programs=self.prefix_programs,
                num_active=self.num_prefix_active,
                block_m=self.prefix_block_m, num_warps=cfg["num_warps_prefix"],
                num_stages=cfg["num_stages_prefix"], slot_runs=self.prefix_slot_runs, **common,
            )

        if self.external_suffix:
            assert base_lse2 is not None, "external_suffix: pass the suffix state (o, base_lse2)"
            side = self._prefix_stream if suffix_state is not None else None
            if side is not None:
                # Fork: the side stream starts after q exists; join: the merge reads part_o/part_lse.
                # q stays alive on the current stream until after the join, so its memory is
                # not reused while the side stream reads it.
                current = torch.cuda.current_stream(self.device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    launch_prefix()
                suffix_state()
                current.wait_stream(side)
            else:
                launch_prefix()
                if suffix_state is not None:
                    suffix_state()
        else:
            assert base_lse2 is None and suffix_state is None, "base_lse2/suffix_state: external_suffix objects only"
            launch_prefix()
            # Suffix: members are rows themselves (identity table); a row's suffix splits are its
            # first part slots, so its slot base is row_part_indptr[r].
            launch_segment_attention(
                kv_indices=self._suffix_kv_indices, rows=self.row_arange, slot_base=self.row_part_indptr,
                work=self.suffix_work, num_work=self.num_suffix_work, num_programs=self.suffix_programs,
                block_m=self.suffix_block_m, num_warps=cfg["num_warps_suffix"], num_stages=cfg["num_stages_suffix"],
                **common,
            )
        launch_merge_parts(
            part_o=self.part_o, part_lse=self.part_lse, row_part_indptr=self.row_part_indptr,
            num_rows=self.num_rows, o=o, lse_out=self.lse, grid_rows=min(self.max_bs, o.shape[0]),
            base_lse2=base_lse2, target_programs=self.num_sms,
            pool=None if self.pool is None else (self.pool.o, self.pool.lse2, self.pool_entry_indptr,
                                                 self.pool_entry_pos),
        )
        return o


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def relay_decode_triton(
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
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot relay decode (tests, scripts): same arguments and result as
    :func:`relay_radix.reference.relay_decode_attention`.

    Returns ``(o [bs, num_q_heads, head_dim] q.dtype, lse [bs, num_q_heads] fp32 natural log)``.
    The output is NaN-filled before the run (unwritten elements show). Reads the CSR arrays on
    the host (a device sync when they live on the GPU). Extra keyword arguments go to
    :class:`TritonRelayDecode`.
    """
    return run_one_shot(
        lambda *shape, **caps: TritonRelayDecode(*shape, **caps, **kwargs), q, k_buffer, v_buffer,
        sm_scale=sm_scale, logit_cap=logit_cap, prefix_kv_indptr=prefix_kv_indptr,
        prefix_kv_indices=prefix_kv_indices, member_indptr=member_indptr, member_rows=member_rows,
        suffix_kv_indptr=suffix_kv_indptr, suffix_kv_indices=suffix_kv_indices)
