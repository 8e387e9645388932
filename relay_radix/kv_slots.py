"""Turn a plan's token ranges into KV slot ids, gathered from ``req_to_token`` on the device.

The plan (CPU) names token ranges ``[start, start + len)`` of ``req_to_token`` rows; the
kernels want flat slot-id lists (``prefix_kv_indices``/``suffix_kv_indices``). The gather runs
on the device from small per-range arrays, so no per-token work happens on the host and no
value ever comes back to it.

Why outside the CUDA graph: SGLang's overlap loop lets the scheduler write ``req_to_token``
for the next step as soon as an event recorded just before ``graph.replay()`` fires (the
write-after-read fast path, map section 11.3). Gathers issued here, in
``init_forward_metadata_out_graph``, are ordered before that event; captured kernels then
read only relay's own static buffers, never ``req_to_token``.
"""

from __future__ import annotations

import torch


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
        starts: ``[n]`` int first token position of each range.
        lens_cpu: ``[n]`` int CPU lengths (>= 0); their sum sizes the output without a sync.

    Returns:
        ``[sum(lens_cpu)]`` int32 slot ids on ``req_to_token``'s device.
    """
    dev = req_to_token.device
    n = int(lens_cpu.numel())
    total = int(lens_cpu.sum()) if n else 0
    if total == 0:
        return torch.empty(0, dtype=torch.int32, device=dev)
    lens = lens_cpu.to(device=dev, dtype=torch.int64, non_blocking=True)
    which = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens  # exclusive prefix sum: output offset of each range
    pos = torch.arange(total, device=dev) - first[which] + starts.to(dev, torch.int64)[which]
    return req_to_token[rows.to(dev, torch.int64)[which], pos].to(torch.int32)
