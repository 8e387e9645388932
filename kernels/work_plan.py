"""Host-side work lists for the Triton relay decode kernels (built once per decode step).

Everything here runs on the CPU with vectorised NumPy ops (no per-token or per-row Python
loops) and produces small int32 tables that :class:`relay_radix.kernels.TritonRelayDecode`
copies into its static device buffers.

Part slots. Every row owns a contiguous range of *part slots*
``[row_part_indptr[r], row_part_indptr[r+1])`` in the fp32 partial buffers: first its suffix
splits (in KV order), then, for each group it belongs to (in ``member_rows`` order), that
group's prefix chunks. Each part slot is written by exactly one program of the segment
kernel, so no part is ever read before it is written and no slot is shared. A row with no
part (empty suffix, no group) merges to the empty state ``(0, -inf)``.

Work items. One work item is one (KV range, member tile) pair:
``[kv_start, kv_len, member_start, member_count, chunk]`` (int32, see ``WORK_FIELDS``):
  * ``kv_start``/``kv_len``: the KV token range inside ``*_kv_indices`` (``kv_len >= 1``),
  * ``member_start``/``member_count``: the member tile inside the rows table (``member_rows``
    for prefix work, the identity ``arange(bs)`` for suffix work),
  * ``chunk``: the chunk number; the part slot of member ``p`` is ``slot_base[p] + chunk``.
Prefix items are ordered chunk-major with the member tiles of one chunk adjacent, so the
tiles that re-read one KV chunk run at the same time and hit L2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["WORK_FIELDS", "RelayWorkPlan", "build_work_plan", "one_shot_args", "prefix_tile_tokens", "run_one_shot"]

WORK_FIELDS = 5  # kv_start, kv_len, member_start, member_count, chunk


@dataclasses.dataclass(slots=True)
class RelayWorkPlan:
    """One decode step's work lists (CPU int32 tensors)."""

    bs: int
    target_programs: int  # programs the chunk sizes were chosen to fill
    prefix_programs_per_head: int  # prefix programs per KV head the items are dealt to
    prefix_chunk: int  # most KV tokens of one prefix work item (a segment's pieces are equal, up to block_n)
    num_parts: int  # part slots used (row_part_indptr[-1])
    row_part_indptr: torch.Tensor  # [bs+1] part slots of row r: [indptr[r], indptr[r+1])
    prefix_slot_base: torch.Tensor  # [total_members] first part slot of membership p
    prefix_work: torch.Tensor  # [num_prefix_work, WORK_FIELDS]
    suffix_work: torch.Tensor  # [num_suffix_work, WORK_FIELDS]


def _cdiv(a: np.ndarray, b: int) -> np.ndarray:
    return (a + (b - 1)) // b


def _round_up(x: int, m: int) -> int:
    return ((x + m - 1) // m) * m


def _segment_items(
    seg_lens: np.ndarray, seg_starts: np.ndarray, chunk: int, tiles: np.ndarray,
    tile_starts: np.ndarray, num_tile_members: np.ndarray, members_per_tile: int, block_n: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Work items for segments split into pieces of at most ``chunk`` tokens x member tiles.

    A segment of ``L`` tokens is cut into ``n = ceil(L / chunk)`` pieces of equal size (rounded up
    to ``block_n``, the last one shorter), not ``n - 1`` full chunks and a short tail: the
    longest item, which sets when its program finishes, is then as short as ``n`` pieces allow.
    seg_lens/seg_starts/tiles/tile_starts/num_tile_members: ``[n]`` int64.
    Returns (work ``[W, WORK_FIELDS]`` int32, chunks per segment ``[n]`` int64).
    """
    live = (seg_lens > 0) & (num_tile_members > 0)
    pieces = np.where(live, _cdiv(seg_lens, chunk), 1)
    piece = _cdiv(_cdiv(seg_lens, pieces), block_n) * block_n  # per segment, <= chunk
    chunks = np.where(live, _cdiv(seg_lens, np.maximum(piece, 1)), 0)
    items = chunks * tiles
    total = int(items.sum())
    if total == 0:
        return np.zeros((0, WORK_FIELDS), dtype=np.int32), chunks
    seg = np.repeat(np.arange(seg_lens.size), items)
    first = np.cumsum(items) - items
    k = np.arange(total) - first[seg]
    t = tiles[seg]
    c = k // t  # chunk-major ...
    tile = k % t  # ... tiles of one chunk adjacent (L2 reuse)
    step = piece[seg]
    work = np.empty((total, WORK_FIELDS), dtype=np.int32)
    work[:, 0] = seg_starts[seg] + c * step  # kv_start
    work[:, 1] = np.minimum(step, seg_lens[seg] - c * step)  # kv_len
    work[:, 2] = tile_starts[seg] + tile * members_per_tile  # member_start
    work[:, 3] = np.minimum(members_per_tile, num_tile_members[seg] - tile * members_per_tile)
    work[:, 4] = c
    return work, chunks


# Costs of a work item in key tokens of one program's time (H100: a 64-row tile walks a key in
# about 10 ns). Its program pays ITEM_COST_TOKENS for loading the query tile and storing its
# partials; the whole step pays PARTIAL_COST_TOKENS per item and KV head for the merge, which
# reads those partials back from HBM (64 rows x head_dim fp32 written and read: ~20 ns of the
# chip's bandwidth each).
ITEM_COST_TOKENS = 128
PARTIAL_COST_TOKENS = 2


def _balanced_prefix_chunk(seg_lens, tiles, live, chunk0: int, programs: int, num_kv_heads: int, block_n: int,
                           min_chunk: int) -> int:
    """The prefix chunk size (from a few candidates near ``chunk0``) that gives the shortest step
    when the items are dealt round robin to ``programs`` programs per KV head, as the persistent
    kernel walks them: the busiest program (its keys plus ``ITEM_COST_TOKENS`` per item) plus
    the merge's ``PARTIAL_COST_TOKENS`` per item and KV head.

    ``chunk0 = total / programs`` alone can leave a few programs with one item more than the
    rest (36 items on 33 programs: the step takes two items' time); the candidates cut the work
    into 1-4 even waves or the longest segment into 1-8 pieces. The busiest program is
    estimated, not simulated (this runs every decode step whose plan changed): with ``w`` waves
    of items of at most ``p`` keys it walks at most ``min(w * p, total / programs + p)`` keys,
    exact for one group.

    seg_lens, tiles: ``[G]`` int64 (member tiles per group); live: ``[G]`` bool.
    """
    lens = seg_lens[live]
    if lens.size == 0 or programs <= 0:
        return chunk0
    t = tiles[live]
    total = int((t * lens).sum())
    longest = int(lens.max())
    cands = [chunk0] + [-(-total // (k * programs)) for k in (1, 2, 3, 4)] + [-(-longest // n) for n in range(1, 9)]
    c = np.unique(_cdiv(np.maximum(np.asarray(cands, dtype=np.int64), min_chunk), block_n) * block_n)[:, None]  # [C, 1]
    piece = _cdiv(_cdiv(lens, _cdiv(lens, c)), block_n) * block_n  # [C, G] equal pieces per segment
    items = (_cdiv(lens, piece) * t).sum(1)  # [C]
    waves = _cdiv(items, programs)
    top = piece.max(1)
    busiest = np.minimum(waves * top, total / programs + top) + ITEM_COST_TOKENS * waves
    cost = busiest + PARTIAL_COST_TOKENS * items * num_kv_heads
    best = np.flatnonzero(cost == cost.min())[-1]  # ties: the larger chunk (fewer partials)
    return int(c[best, 0])


def _np64(t) -> np.ndarray:
    return np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.int64).reshape(-1)


def prefix_tile_tokens(prefix_lens, member_indptr, members_per_tile: int) -> int:
    """KV tokens the prefix launch walks for one KV head: each group's segment once per member
    tile (``ceil(members / members_per_tile)`` tiles), summed over groups with members.

    prefix_lens: ``[num_groups]``, member_indptr: ``[num_groups+1]`` (CPU ints, tensors or arrays).
    Times the KV head count, this is the prefix pass's work in tile-tokens: its arithmetic, and
    its reads from L2.
    """
    prefix_lens, member_indptr = _np64(prefix_lens), _np64(member_indptr)
    num_members = member_indptr[1:] - member_indptr[:-1]
    tiles = _cdiv(num_members, members_per_tile)  # 0 for a group with no member
    return int((tiles * prefix_lens).sum())


def build_work_plan(
    *,
    prefix_lens: torch.Tensor,
    member_indptr: torch.Tensor,
    member_rows: torch.Tensor,
    suffix_lens: torch.Tensor,
    members_per_tile: int,
    num_kv_heads: int,
    target_programs: int,
    block_n: int,
    min_chunk: int,
    max_suffix_splits: int,
    prefix_programs_per_head: int | None = None,
    max_prefix_work: int,
    max_suffix_work: int,
    max_parts: int,
) -> RelayWorkPlan:
    """Build the work lists of one decode step on the CPU.

    Args:
        prefix_lens: ``[num_groups]`` tokens of each group's shared segment.
        member_indptr: ``[num_groups+1]`` CSR over ``member_rows``.
        member_rows: ``[total_members]`` batch rows.
        suffix_lens: ``[bs]`` tokens of each row's own part (may be 0).
        members_per_tile: members stacked into one prefix program (``BLOCK_M // gqa``).
        num_kv_heads: programs per work item (one per KV head).
        target_programs: programs wanted per launch (a few per SM) before chunks stop shrinking.
        prefix_programs_per_head: programs per KV head of the prefix launch that take work; the
            prefix chunks are balanced over them (default ``target_programs // num_kv_heads``).
        block_n: KV tile of the kernels; chunks are multiples of it.
        min_chunk: smallest chunk (keeps the fp32 partial traffic small next to the KV bytes).
        max_suffix_splits: most suffix chunks of one row.
        max_prefix_work, max_suffix_work, max_parts: static capacities; chunks grow until
            the plan fits (raises if even one chunk per segment does not fit).

    Returns:
        :class:`RelayWorkPlan`. Offsets into ``*_kv_indices`` assume ``indptr = [0, cumsum(lens)]``.

    NumPy, not torch: this runs once per decode step on the scheduler's thread, where each
    small torch op costs microseconds of dispatch (the torch version took ~0.4 ms).
    """
    prefix_lens, member_indptr = _np64(prefix_lens), _np64(member_indptr)
    member_rows, suffix_lens = _np64(member_rows), _np64(suffix_lens)
    bs = suffix_lens.size
    num_groups = prefix_lens.size
    assert member_indptr.size == num_groups + 1, "member_indptr must be [num_groups+1]"

    num_members = member_indptr[1:] - member_indptr[:-1]  # [G]
    prefix_starts = np.cumsum(prefix_lens) - prefix_lens
    suffix_starts = np.cumsum(suffix_lens) - suffix_lens
    tiles = np.maximum(_cdiv(num_members, members_per_tile), 1)

    # Chunk sizes from the total work: enough programs to fill the chip, no smaller than
    # min_chunk (each chunk writes rows x head_dim fp32 partials).
    prefix_work_tokens = prefix_tile_tokens(prefix_lens, member_indptr, members_per_tile) * num_kv_heads
    suffix_tokens = int(suffix_lens.sum()) * num_kv_heads
    chunk_p = _round_up(max(min_chunk, -(-prefix_work_tokens // max(target_programs, 1))), block_n)
    # Every KV head runs the same items on its own programs: balance them over one head's share.
    if prefix_programs_per_head is None:
        prefix_programs_per_head = max(1, target_programs // max(num_kv_heads, 1))
    chunk_p = _balanced_prefix_chunk(prefix_lens, tiles, (prefix_lens > 0) & (num_members > 0), chunk_p,
                                     prefix_programs_per_head, num_kv_heads, block_n, min_chunk)
    chunk_s = _round_up(max(min_chunk, -(-suffix_tokens // max(target_programs, 1))), block_n)
    max_suffix = int(suffix_lens.max()) if bs > 0 else 0
    chunk_s = max(chunk_s, _round_up(-(-max_suffix // max_suffix_splits), block_n))
    ones, rows = np.ones(bs, dtype=np.int64), np.arange(bs, dtype=np.int64)
    group_of = np.repeat(np.arange(num_groups), num_members)

    while True:
        pwork, pchunks = _segment_items(
            prefix_lens, prefix_starts, chunk_p, tiles, member_indptr[:-1], num_members, members_per_tile, block_n
        )
        swork, schunks = _segment_items(suffix_lens, suffix_starts, chunk_s, ones, rows, ones, 1, block_n)
        # Parts of each membership = chunks of its group.
        mparts = pchunks[group_of]
        row_prefix_parts = np.bincount(member_rows, weights=mparts, minlength=bs).astype(np.int64)
        row_parts = schunks + row_prefix_parts
        num_parts = int(row_parts.sum())
        fits = (pwork.shape[0] <= max_prefix_work and swork.shape[0] <= max_suffix_work
                and num_parts <= max_parts)
        if fits:
            break
        max_p = int(prefix_lens.max()) if num_groups > 0 else 0
        if chunk_p >= max_p and chunk_s >= max_suffix:
            raise ValueError(
                f"relay plan does not fit the static capacities: prefix_work={pwork.shape[0]}/{max_prefix_work}, "
                f"suffix_work={swork.shape[0]}/{max_suffix_work}, parts={num_parts}/{max_parts}"
            )
        chunk_p, chunk_s = min(chunk_p * 2, _round_up(max(max_p, 1), block_n)), min(
            chunk_s * 2, _round_up(max(max_suffix, 1), block_n))

    row_part_indptr = np.zeros(bs + 1, dtype=np.int64)
    np.cumsum(row_parts, out=row_part_indptr[1:])

    # Slot base of each membership: after the row's suffix splits and the row's earlier
    # memberships (in member_rows order). A stable sort by row keeps that order.
    prefix_slot_base = np.zeros(member_rows.size, dtype=np.int64)
    if member_rows.size > 0:
        order = np.argsort(member_rows, kind="stable")
        rows_sorted = member_rows[order]
        parts_sorted = mparts[order]
        excl = np.cumsum(parts_sorted) - parts_sorted  # global exclusive cumsum
        row_first = np.cumsum(row_prefix_parts) - row_prefix_parts
        within = excl - row_first[rows_sorted]
        prefix_slot_base[order] = row_part_indptr[rows_sorted] + schunks[rows_sorted] + within

    return RelayWorkPlan(
        bs=bs,
        target_programs=target_programs,
        prefix_programs_per_head=prefix_programs_per_head,
        prefix_chunk=chunk_p,
        num_parts=num_parts,
        row_part_indptr=torch.from_numpy(row_part_indptr.astype(np.int32)),
        prefix_slot_base=torch.from_numpy(prefix_slot_base.astype(np.int32)),
        prefix_work=torch.from_numpy(pwork),
        suffix_work=torch.from_numpy(swork),
    )


def one_shot_args(
    *,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    member_indptr: torch.Tensor,
    member_rows: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    bs: int,
) -> tuple[dict, dict]:
    """Capacities and ``plan()`` arguments of a one-shot run from the contract's CSR tensors.

    Used by the one-shot helpers of both relay paths (tests, scripts). Reads the indptr arrays
    on the host (a device sync when they live on the GPU). The contract allows indptr arrays
    that do not start at 0: the index lists are sliced to ``[indptr[0], indptr[-1])``.

    Returns ``(capacities, plan_kwargs)``: keyword arguments of the kernel class constructor
    (``max_*``) and of its ``plan()``.
    """
    p_indptr = prefix_kv_indptr.to(torch.int64).cpu()
    m_indptr = member_indptr.to(torch.int64).cpu()
    s_indptr = suffix_kv_indptr.to(torch.int64).cpu()
    rows = member_rows.to(torch.int64).cpu()
    has_groups = p_indptr.numel() > 1
    p_idx = prefix_kv_indices[int(p_indptr[0]) : int(p_indptr[-1])] if has_groups else prefix_kv_indices[:0]
    s_idx = suffix_kv_indices[int(s_indptr[0]) : int(s_indptr[-1])]
    m_rows = rows[int(m_indptr[0]) : int(m_indptr[-1])] if m_indptr.numel() > 1 else rows[:0]
    caps = dict(max_bs=max(bs, 1), max_groups=max(p_indptr.numel() - 1, 1), max_members=max(m_rows.numel(), 1),
                max_prefix_tokens=max(p_idx.numel(), 1), max_suffix_tokens=max(s_idx.numel(), 1))
    plan_kwargs = dict(
        prefix_kv_indices=p_idx.to(torch.int32), suffix_kv_indices=s_idx.to(torch.int32),
        prefix_lens_cpu=p_indptr[1:] - p_indptr[:-1], member_indptr_cpu=m_indptr - m_indptr[0],
        member_rows_cpu=m_rows, suffix_lens_cpu=s_indptr[1:] - s_indptr[:-1],
    )
    return caps, plan_kwargs


def run_one_shot(make, q, k_buffer, v_buffer, *, sm_scale: float, logit_cap: float = 0.0,
                 plan_extra: dict | None = None, **contract) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan and run one relay decode with a fresh kernel object (the one-shot helpers of both
    relay paths). ``make(num_q_heads, num_kv_heads, head_dim, dtype, device, **capacities)``
    builds the object; ``contract`` holds the six CSR tensors of the reference's contract;
    ``plan_extra`` goes to ``plan()`` besides the slot lists.

    Returns ``(o [bs, num_q_heads, head_dim] q.dtype, lse [bs, num_q_heads] fp32 natural log)``;
    ``o`` is NaN-filled before the run, so an unwritten element shows.
    """
    bs, hq, d = q.shape
    caps, plan_kwargs = one_shot_args(bs=bs, **contract)
    w = make(hq, k_buffer.shape[1], d, q.dtype, q.device, **caps)
    w.plan(**plan_kwargs, **(plan_extra or {}))
    o = torch.full_like(q, float("nan"))
    w.run(q, k_buffer, v_buffer, o, sm_scale=sm_scale, logit_cap=logit_cap)
    return o, w.lse[:bs].clone()
