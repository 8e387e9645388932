"""Turn a plan's token ranges into KV slot ids, gathered from ``req_to_token`` on the device.

The plan (CPU) names token ranges ``[start, start + len)`` of ``req_to_token`` rows; the
kernels want flat slot-id lists (``prefix_kv_indices``/``suffix_kv_indices``). The gather runs
on the device from small per-range arrays, so no per-token work happens on the host and no
value ever comes back to it.

Why outside the CUDA graph: SGLang's overlap loop lets the scheduler write ``req_to_token``
for the next step as soon as an event recorded just before ``graph.replay()`` fires (the
write-after-read fast path: SGLang 0.5.16 ``decode_cuda_graph_runner.py:1222-1261``,
``scheduler.py:1502-1518``). Gathers issued here, in
``init_forward_metadata_out_graph``, are ordered before that event; captured kernels then
read only relay's own static buffers, never ``req_to_token``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def to_device_async(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``t`` (a small host tensor) on ``device`` as ``dtype``, with no host synchronisation.

    Why: ``cpu_tensor.to(cuda_device)`` without ``non_blocking`` is a copy *and a stream
    synchronize* in PyTorch, and a non_blocking copy from pageable memory may still wait for
    the stream (CUDA stages pageable copies). The decode metadata runs while the previous step
    is still on the GPU (SGLang's overlap scheduler), so either would make the host wait for that
    step and leave the GPU idle while the rest of this step is launched. The values are cast on
    the host and staged in pinned memory (PyTorch's caching host allocator keeps the block until
    the copy has run), then copied asynchronously. A tensor already on ``device`` is only cast.
    """
    if t.device == device:
        return t.to(dtype)
    host = t.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def gather_ranges(
    req_to_token: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    lens_cpu: torch.Tensor,
) -> torch.Tensor:
    """Concatenate ``req_to_token[rows[i], starts[i] : starts[i] + lens_cpu[i]]`` over ``i``.

    Args:
        req_to_token: ``[num_req_slots + 1, max_context_len]`` int32 (device).
        rows: ``[n]`` int ``req_to_token`` rows (any device; moved to req_to_token's).
        starts: ``[n]`` int first token position of each range (any device).
        lens_cpu: ``[n]`` int CPU lengths (>= 0); their sum sizes the output without a sync.

    Returns:
        ``[sum(lens_cpu)]`` int32 slot ids on ``req_to_token``'s device. Never synchronises
    the host with the device (host arrays go over in one pinned, asynchronous copy).
    """
    dev = req_to_token.device
    n = int(lens_cpu.numel())
    total = int(lens_cpu.sum()) if n else 0
    if total == 0:
        return torch.empty(0, dtype=torch.int32, device=dev)
    # One staged copy for the host arrays: [lens, starts, rows] (rows only when on the host).
    host = [lens_cpu.reshape(-1), *(t.reshape(-1) for t in (starts, rows) if t.device.type == "cpu")]
    packed = to_device_async(torch.stack([t.to(torch.int64) for t in host]), dev)
    lens = packed[0]
    starts_d = packed[1] if starts.device.type == "cpu" else starts.to(dev, torch.int64)
    rows_d = packed[-1] if rows.device.type == "cpu" else rows.to(dev, torch.int64)
    which = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens  # exclusive prefix sum: output offset of each range
    pos = torch.arange(total, device=dev) - first[which] + starts_d[which]
    return req_to_token[rows_d[which], pos].to(torch.int32)


def segment_runs(prefix_idx: torch.Tensor, prefix_lens_cpu: torch.Tensor) -> torch.Tensor:
    """Breaks and runs of a prefix slot list, on its device with no host sync.

    prefix_idx: ``[sum(lens)]`` int slot ids (groups concatenated, at least one id);
    prefix_lens_cpu: ``[G]`` CPU ints (``G >= 1``). Returns ``[1 + G]`` int64 on ``prefix_idx``'s
    device: the breaks inside groups (adjacent slots that do not follow each other; group
    boundaries are not breaks), then each group's first slot when its segment is one run, else -1.
    """
    lens = prefix_lens_cpu.to(torch.int64).reshape(-1)
    n = int(prefix_idx.numel())
    idx = prefix_idx.to(torch.int64)
    # breaks[i] for adjacency (i, i+1); cum[i] = breaks among adjacencies < i.
    brk = (idx[1:] != idx[:-1] + 1).to(torch.int64)
    cum = torch.cat([brk.new_zeros(1), torch.cumsum(brk, 0)])
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    # A group's internal adjacencies are starts .. ends-2: breaks = cum[end-1] - cum[start].
    se = to_device_async(torch.stack([starts, (ends - 1).clamp(min=0), lens]), idx.device)
    s_d, e_d, len_d = se[0].clamp(max=n - 1), se[1], se[2]
    inside = cum[e_d] - cum[s_d]
    first = torch.where((len_d > 0) & (inside == 0), idx[s_d], torch.full_like(inside, -1))
    return torch.cat([inside.where(len_d > 0, torch.zeros_like(inside)).sum().reshape(1), first])


def slot_run_starts(prefix_idx: torch.Tensor, prefix_lens_cpu: torch.Tensor) -> torch.Tensor:
    """``[G]`` int64 on the host: each group's first slot when its segment is one run, else -1
    (:func:`segment_runs` read back at once: a sync on the GPU; for tests and scripts, the server
    learns the same values asynchronously through :class:`PrefixSlotRuns`)."""
    lens = prefix_lens_cpu.to(torch.int64).reshape(-1).cpu()
    if prefix_idx.numel() == 0 or lens.numel() == 0:
        return torch.full((lens.numel(),), -1, dtype=torch.int64)
    return segment_runs(prefix_idx, lens)[1:].cpu()


class PrefixSlotRuns:
    """Consecutive-slot runs of each step's shared-prefix slot lists, learned without a host sync.

    Two readers:
      * the break count (decode log line ``prefix slot breaks B``, Prometheus
        ``sglang:relay_prefix_slot_breaks``): the Triton prefix kernel reads a chunk by TMA only
        when its slots are one run, and every break sends the chunk(s) around it to the slower
        gather loop; boundaries between groups are not breaks. :attr:`last` is the newest
        finished count (``None`` before the first);
      * the *run table*: for a group's segment that is one run, its first slot, which the pool
        prefix pass (:mod:`relay_radix.kernels.pool_prefix`) needs on the host to plan
        FlashInfer's absolute ``kv_indptr`` (:meth:`run_starts`); the extend pool pass reads it
        for prefill batches' cached prefixes, keyed ``(last node id, 0, prefix length)``
        (:mod:`relay_radix.extend_plan`), learned with ``count(..., breaks=False)``.

    Both are computed on the device when a new prefix slot list is gathered and copied back
    asynchronously (pinned memory, an event per copy); :meth:`poll` takes the copies that have
    finished, so a new group is known a step or two after it first runs (until then it takes
    the Triton launch).

    Why a group's first slot can be reused in later steps: the key is ``(head node id, start,
    end)``. Every member row holds the tree's KV at the positions of its groups (a row is
    counted under the node whose KV it shares, ``relay_radix.groups``); the head is pinned while
    the group lives, so those slots are neither evicted nor moved (a split keeps the KV where
    it is); node ids come from SGLang's global counter and are never reused. A later gather of
    the same key that finds other slots breaks that argument: the table is then switched off
    for the process, with an error in the log, and every group takes the Triton launch.
    """

    MAX_PENDING = 8  # copies in flight; more are skipped (the next new slot list counts again)
    MAX_TABLE = 4096  # run table entries kept (old keys are dropped when it grows past this)

    def __init__(self) -> None:
        self.last: int | None = None
        self.table: dict[tuple, int] = {}  # (head id, start, end) -> first slot, or -1: not one run
        self.disabled = False
        self._pending: list = []  # (event, host int64 [1 + G], keys, breaks)

    def count(self, prefix_idx: torch.Tensor, prefix_lens_cpu: torch.Tensor, keys: list | None = None,
              breaks: bool = True) -> None:
        """Start counting ``prefix_idx`` (``[sum(prefix_lens_cpu)]`` int32, groups concatenated);
        ``keys``: the groups' run-table keys (``None``: the break count only); ``breaks=False``:
        learn the runs only (a prefill batch's cached prefixes, not a decode step's prefix plan,
        whose breaks the log reports)."""
        self.poll()
        lens = prefix_lens_cpu.to(torch.int64).reshape(-1)
        n, ng = int(prefix_idx.numel()), int(lens.numel())
        if n == 0 or ng == 0:
            if breaks:
                self.last = 0
            return
        on_cuda = prefix_idx.device.type == "cuda"
        if on_cuda and len(self._pending) >= self.MAX_PENDING:
            return
        out = segment_runs(prefix_idx, lens)
        if not on_cuda:
            self._take(out, keys, breaks)
            return
        host = torch.empty(1 + ng, dtype=torch.int64, pin_memory=True)
        host.copy_(out, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append((ev, host, keys, breaks))

    def _take(self, host: torch.Tensor, keys: list | None, breaks: bool = True) -> None:
        if breaks:
            self.last = int(host[0])
        if keys is None or self.disabled:
            return
        if len(self.table) > self.MAX_TABLE:
            self.table.clear()
        for key, first in zip(keys, host[1:].tolist()):
            old = self.table.get(key)
            if old is not None and old != first:
                self.disabled = True
                self.table.clear()
                logger.error(
                    "relay-radix: group %s was at first slot %d and is now at %d (run %s); the pool prefix "
                    "pass is switched off for this process (every group takes the Triton prefix launch). "
                    "Please report this.", key, old, first, "ended" if first < 0 else "moved")
                return
            self.table[key] = first

    def poll(self) -> int | None:
        """Take the finished copies (never waits); returns the newest break count."""
        while self._pending and self._pending[0][0].query():
            _, host, keys, breaks = self._pending.pop(0)
            self._take(host, keys, breaks)
        return self.last

    def run_starts(self, keys: list) -> torch.Tensor:
        """``[len(keys)]`` int64 (host): each group's first slot when its segment is known to be
        one run, else -1 (not a run, or not learned yet)."""
        return torch.tensor([-1 if f is None else f for f in self.lookup(keys)], dtype=torch.int64)

    def lookup(self, keys: list) -> list:
        """Per key: the first slot (one run), -1 (not one run) or None (not learned yet)."""
        self.poll()
        if self.disabled:
            return [-1] * len(keys)
        return [self.table.get(k) for k in keys]


def keep_free_slots_sorted(allocator) -> bool:
    """Make SGLang's token allocator hand out free slots in ascending order once its untouched
    range is used up (``RELAY_RADIX_SORT_FREE_SLOTS``).

    SGLang's page-size-1 ``TokenToKVPoolAllocator`` takes new slots from the front of its free
    list and, by default, appends freed slots at its end in the order they were freed. Once the
    never-used range is spent, a new long prompt is then spread over whatever was freed last, so
    its KV slots are not consecutive and the relay prefix kernel gathers them instead of reading
    them with TMA (seen in a serving call: 609 breaks in a 5K-token shared prefix). With
    ``need_sort`` (SGLang's own switch, on in its disaggregation modes) freed slots are parked
    and merged into the free list, sorted, when the list runs short, so a prompt gets the
    lowest free slots and consecutive runs wherever freed regions are adjacent. Cost: one
    ``torch.sort`` of the free list when it runs short.

    Returns True when the switch was set (an allocator without it is left alone).
    """
    if not hasattr(allocator, "need_sort") or not hasattr(allocator, "merge_and_sort_free"):
        return False
    allocator.need_sort = True
    return True


def window_breaks(free_sorted: torch.Tensor, need: int) -> torch.Tensor:
    """Breaks (adjacent slots that do not follow each other) in every window of ``need`` slots of
    ``free_sorted``: ``[L - need + 1]`` int32, entry ``pos`` for ``free_sorted[pos : pos + need]``.

    ``free_sorted``: ``[L]`` ascending, distinct slot ids, ``L >= need >= 1``. A sliding sum over
    the ``L - 1`` adjacencies, all on the tensor's device."""
    n = free_sorted.numel()
    if need <= 1 or n <= 1:
        return torch.zeros(max(n - need + 1, 1), dtype=torch.int32, device=free_sorted.device)
    brk = (free_sorted[1:] != free_sorted[:-1] + 1).to(torch.int32)  # [L-1]
    cum = torch.cat([brk.new_zeros(1), torch.cumsum(brk, 0, dtype=torch.int32)])  # [L]: breaks among the first i adjacencies
    return cum[need - 1:] - cum[: n - need + 1]  # window pos spans adjacencies pos..pos+need-2


def fewest_breaks_window(free_sorted: torch.Tensor, need: int, continue_at: torch.Tensor | None = None) -> torch.Tensor:
    """Index ``pos`` (0-d int64 tensor, on ``free_sorted``'s device) of the first window
    ``free_sorted[pos : pos + need]`` with the fewest breaks (:func:`window_breaks`): a run of
    consecutive slots when one is long enough. No host sync (``argmin`` returns the first
    minimum).

    ``continue_at`` (0-d int64 on the same device, or None): a slot that an earlier allocation
    ended just before (the previous chunk of a chunked prompt). The window starting at that
    slot, if it is free, wins among the windows with the fewest breaks, so a chunked prompt stays
    in one run wherever the free list allows. Only among those: the allocator cannot tell the
    next chunk of that prompt from a new prompt that comes after the last chunk went through
    SGLang's path (a chunk below ``RELAY_RADIX_CONSECUTIVE_ALLOC``), and a new prompt must not
    take a break to sit behind an old one (session 18, H100: a GQA-4 8K prompt after the
    exactness run got 1 break that way, and with it lost the pool prefix pass and the extend
    pool pass). For the real next chunk nothing is lost: any other window leaves a break at the
    seam, as many as the continuation would have."""
    breaks = window_breaks(free_sorted, need)
    if continue_at is None:
        return torch.argmin(breaks)
    c = torch.searchsorted(free_sorted, continue_at.reshape(1)).clamp(max=breaks.numel() - 1)  # [1]
    score = breaks.to(torch.int64) * 2 + 1  # fewest breaks first; the continuation wins ties
    return torch.argmin(score.scatter_add(0, c, -(free_sorted[c] == continue_at).to(torch.int64)))


def prefer_consecutive_slots(allocator, min_tokens: int, make_room=None, lookahead=None) -> bool:
    """Give allocations of ``min_tokens`` or more (prefill chunks of long prompts) the first run
    of consecutive free slots that holds them, or else the window of free slots with the fewest
    breaks (``RELAY_RADIX_CONSECUTIVE_ALLOC``).

    With ``keep_free_slots_sorted`` a prompt gets the *lowest* free slots. On a server that has
    run a while those are holes between prompts still cached in the radix tree, so a long new
    prompt is scattered (a serving call measured 518 breaks in a 16K-token prefix after a
    no-sharing workload), and the relay prefix kernel gathers it instead of reading it by TMA
    (GQA-4 16K x 128: 0.187 against 0.151 ms per layer, ``bench/results/kernels-h100.md``).
    Here a large allocation first merges the freed slots into the sorted free list (SGLang's
    ``merge_and_sort_free``), then takes the window of the sorted free list with the fewest
    breaks (:func:`fewest_breaks_window`, on the device, no sync): the first consecutive run when
    one is long enough. Smaller allocations (decode steps: one slot per running request) keep
    SGLang's path.

    A prompt longer than ``--chunked-prefill-size`` comes in several allocations. ``lookahead()``
    (``patches.scheduler_hooks.chunked_prefill_remainder``) says how many tokens of a chunked
    prompt come after this allocation: the window is then sized for them too (its first slots
    are taken now), and the next allocation prefers the window that continues it. Why: one break
    inside a prefix segment sends the prefix launch's work items around it to the gather loop,
    and the busiest program sets the step (session 17, H100, MHA 16K x 128: 2 breaks, full-batch
    step 17.6 ms against 16.1 ms with none). ``make_room(span)`` (the tree's
    ``RelayRadixCache.make_room_for_run``), if given, runs first: where the pool is nearly full
    it evicts old cache until a run exists (``RELAY_RADIX_EVICT_FOR_RUNS``). Needs the
    page-size-1 ``TokenToKVPoolAllocator`` with sorting on; returns True when installed."""
    if min_tokens <= 0 or not getattr(allocator, "need_sort", False) or getattr(allocator, "page_size", 1) != 1 \
            or not hasattr(allocator, "merge_and_sort_free") or not hasattr(allocator, "free_pages"):
        return False
    sglang_alloc = allocator.alloc  # the bound method: small allocations stay on it
    chunk_end = [None]  # 0-d device tensor: one past the last slot of a chunk whose prompt goes on

    def alloc(need_size: int):
        if need_size < min_tokens:
            return sglang_alloc(need_size)
        ahead = max(0, int(lookahead())) if lookahead is not None else 0
        if make_room is not None:
            make_room(need_size + ahead)
        allocator.merge_and_sort_free()
        free = allocator.free_pages
        total = free.numel()
        if need_size > total:
            return None  # SGLang's answer when the pool cannot hold it (its caller evicts or fails)
        span = need_size + ahead if need_size + ahead <= total else need_size
        pos = fewest_breaks_window(free, span, chunk_end[0])
        select = free[pos + torch.arange(need_size, device=free.device)]
        rest = torch.arange(total - need_size, device=free.device)
        allocator.free_pages = free[rest + (rest >= pos) * need_size]  # the window removed, order kept
        chunk_end[0] = select[-1] + 1 if ahead else None
        return select

    allocator.alloc = alloc
    allocator.relay_consecutive_min = min_tokens
    return True


def evict_for_consecutive_window(allocator, evict, need: int, max_extra: int) -> tuple[int, int]:
    """Evict more of the radix cache (least recently used first) until the free slots hold a
    window of ``need`` slots with no break, so the allocation that follows
    (``prefer_consecutive_slots``) lays a long prompt in one run. No break, not a few: the prefix
    launch deals a segment's work items evenly over its programs, and an item with a break in it
    takes the gather loop, so one break costs the step about what hundreds do (session 17, H100,
    MHA 16K x 128: 1 break 17.5 ms, 335 breaks 17.7 ms, none 16.1 ms).
    ``RELAY_RADIX_EVICT_FOR_RUNS``.

    Why: on a server whose pool is full of cached requests, SGLang evicts just enough least
    recently used leaves for the new prompt, and their slots are scattered (decode tokens of
    many requests interleave, one slot per request per step), so a new long system prompt is
    spread over hundreds of runs: the relay prefix launch then gathers it instead of reading it
    with TMA, and the pool prefix pass (one run per group) cannot take it at all. Measured in
    session 16 (MHA, 8K and 16K prompts after the control and no-sharing runs): 251 and 598
    breaks, decode steps 15.2 / 17.7 ms against 14.6 / 16.3 ms with the prompts in one run.
    Evicting the rest of an old cohort frees its whole slot range at once.

    ``evict(n)``: evicts at least ``n`` tokens from the tree (SGLang's LRU order) and returns how
    many it evicted. Rounds of ``need`` tokens, at most ``max_extra`` tokens in all; stops early
    when the cache has nothing evictable left or a round did not lower the fewest breaks (the
    fragmentation is in live requests' slots, which eviction cannot free). Returns ``(extra
    tokens evicted, fewest breaks of a window afterwards or -1 if fewer than need free)``.
    Syncs with the device once per round (reads the fewest breaks): only allocations large
    enough for ``prefer_consecutive_slots`` into a nearly full pool get here
    (``RelayRadixCache.make_room_for_run``)."""
    extra, best = 0, None
    while True:
        allocator.merge_and_sort_free()
        free = allocator.free_pages
        breaks = int(window_breaks(free, need).min()) if free.numel() >= need else -1
        if breaks == 0 or extra >= max_extra or (best is not None and 0 <= best <= breaks):
            return extra, breaks
        best = breaks
        got = evict(min(need, max_extra - extra))
        if got <= 0:
            return extra, breaks
        extra += got
