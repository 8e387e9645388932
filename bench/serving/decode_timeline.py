"""Where a burst's TPOT goes: decode at full batch against the prefill ramp, from client timings.

``sglang.benchmark.serving`` reports TPOT per request as ``(e2e - ttft) / (output_len - 1)``.
In a burst (all requests sent at once) the first requests start decoding while the scheduler
is still prefilling the later ones, and each prefill batch stalls the running decode batch.
So a request's TPOT is its share of those prefill stalls plus the decode steps it ran.
This module splits it, from the per-token latencies that ``--output-details`` records
(``ttfts`` in s and ``itls`` in s per request, all requests sent at t = 0):

  * ``ramp``: from the first to the last first token (the last request's prefill ends);
  * per request, its decode time before the ramp's end (``in_ramp``) and after it (``steady``);
  * the median gap between tokens after the ramp (``steady_step_ms``), which tracks the server's
    decode step at the full batch (the step relay changes).

A request's TPOT = (its in-ramp time + its steady time) / tokens. Tokens reach the client in
bursts (gaps well below and above the step), so single gaps are not stalls; the server's own
full-batch step (``server_log.py``) is the step to compare TPOT with.
"""

from __future__ import annotations

import statistics


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def decode_timeline(ttfts_s: list[float], itls_s: list[list[float]], bin_ms: float = 100.0) -> dict:
    """Summary of one burst (see the module docstring). Times in ms in the result.

    ttfts_s: ``[num_requests]`` time to first token (s) of each request.
    itls_s: ``[num_requests][output_len - 1]`` per-token latencies (s) after the first token.
    bin_ms: width of the token-count histogram bins (``tokens_per_bin``) over the whole burst.
    """
    reqs = [(t, itl) for t, itl in zip(ttfts_s, itls_s) if t and itl]
    if not reqs:
        return {}
    ramp_start = min(t for t, _ in reqs) * 1e3
    ramp_end = max(t for t, _ in reqs) * 1e3
    tpot, steady, in_ramp_ms, in_ramp_tok = [], [], [], []
    all_gaps_after = []
    events = []
    for t, itl in reqs:
        now = t * 1e3
        before_t, before_n, after_t, after_n = 0.0, 0, 0.0, 0
        for gap in itl:
            gap_ms = gap * 1e3
            now += gap_ms
            events.append(now)
            if now <= ramp_end:
                before_t, before_n = before_t + gap_ms, before_n + 1
            else:
                after_t, after_n = after_t + gap_ms, after_n + 1
                all_gaps_after.append(gap_ms)
        tpot.append((before_t + after_t) / len(itl))
        if after_n:
            steady.append(after_t / after_n)
        in_ramp_ms.append(before_t)
        in_ramp_tok.append(before_n)
    step = statistics.median(all_gaps_after) if all_gaps_after else statistics.median(tpot)
    end = max(events) if events else ramp_end
    bins = [0] * (int(end // bin_ms) + 1)
    for e in events:
        bins[int(e // bin_ms)] += 1
    return {
        "requests": len(reqs),
        "ramp_ms": [round(ramp_start, 1), round(ramp_end, 1)],
        "end_ms": round(end, 1),
        "median_tpot_ms": _median(tpot),
        "median_steady_tpot_ms": _median(steady),
        "steady_step_ms": round(step, 3),
        "median_in_ramp_ms": _median(in_ramp_ms),
        "median_in_ramp_tokens": _median(in_ramp_tok),
        "bin_ms": bin_ms,
        "tokens_per_bin": bins,
    }
