"""The relay gate: relay a decode step's groups only where that is faster than vanilla decode.

Everything here is per layer and per decode step, in microseconds.

What relaying a group of ``m`` members over a shared segment of ``P`` tokens saves is the
``m - 1`` extra passes over the segment that vanilla decode makes. Those passes are cheaper
than HBM reads: members read the same segment at about the same time, so most of them hit
L2. Measured on the H100, their cost has two parts:
  * bytes at ``reread_tbps`` (an effective L2 bandwidth, not a hardware figure);
  * attention arithmetic at ``decode_tflops``, the rate of vanilla's decode kernel
    (4 flops per query head, head-dim element and key: q.k and p.v).

What it costs:
  * one partial state per member and query head, written by the prefix pass and read by the
    merge, at HBM speed;
  * ``group_us`` per group (its extra programs and merge slots);
  * ``step_us`` once per step. This is the merge launch and the side-stream join. A step with
    no group pays none of it: it replays the plain decode graph, which is vanilla's kernel
    (``relay_radix.patches.cuda_graph``).

A group is kept if its own gain is positive. The step relays only if the kept groups together
gain more than ``step_us``; otherwise every group is dropped and the step decodes plainly.
A step that already relays keeps relaying down to ``KEEP_FRACTION`` of that bar, so a step at
the bar does not flip between the two graphs every time a member arrives or finishes.

The constants are an H100 SXM fit: ``bench/kernels/gate_sweep.py`` measures relay against
the plain graph on 68 configurations, and ``bench/results/gate-h100.md`` has the result. The
fit is biased against relay: near the bar, a win is missed rather than a step made slower.
They are constants, not measured at server start, because the gate must decide the same on
every tensor-parallel rank. A run-time timing would differ between ranks and split their plans.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

KEEP_FRACTION = 0.9  # hysteresis: a relaying step keeps relaying while its gains exceed this x step_us


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionDims:
    """Per-layer attention sizes of the served model (one tensor-parallel rank)."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def partial_bytes_per_member(self) -> int:
        """fp32 partial state (o and lse) of one member, written once and read once."""
        return 2 * self.num_q_heads * (self.head_dim + 1) * 4


@dataclasses.dataclass(frozen=True, slots=True)
class GateCosts:
    """Per-layer prices of the relay decision (H100 SXM fit, ``bench/results/gate-h100.md``).

    Bytes over TB/s and flops over TFLOP/s give microseconds directly: ``x / (rate * 1e6)``.
    """

    reread_tbps: float = 32.0  # bytes of a member's repeated pass over a shared segment (L2 hits)
    decode_tflops: float = 88.0  # arithmetic of that pass in vanilla's decode kernel
    hbm_tbps: float = 3.0  # partial states: written and read once, from HBM
    group_us: float = 1.0  # a group's extra programs and merge slots
    step_us: float = 12.0  # merge launch + side-stream join, paid once by a step that relays


H100_COSTS = GateCosts()


def bytes_saved(members: int, segment_tokens: int, dims: AttentionDims) -> int:
    """KV bytes per layer that relaying one group keeps vanilla decode from re-reading."""
    return (members - 1) * segment_tokens * dims.kv_bytes_per_token


def group_gain_us(members: int, segment_tokens: int, dims: AttentionDims, costs: GateCosts = H100_COSTS) -> float:
    """Time per layer that relaying one group saves (negative: it costs), before the step's
    fixed cost: vanilla's repeated passes over the segment minus partial states and the
    group's programs."""
    repeats = (members - 1) * segment_tokens
    reread = bytes_saved(members, segment_tokens, dims) / (costs.reread_tbps * 1e6)
    arithmetic = repeats * 4 * dims.num_q_heads * dims.head_dim / (costs.decode_tflops * 1e6)
    partials = members * dims.partial_bytes_per_member / (costs.hbm_tbps * 1e6)
    return reread + arithmetic - partials - costs.group_us


def step_gain_us(groups: Iterable[tuple[int, int]], dims: AttentionDims, costs: GateCosts = H100_COSTS) -> float:
    """Time per layer that relaying a step's groups (``(members, segment_tokens)`` pairs) saves
    against vanilla decode: the kept groups' gains minus the fixed cost of relaying at all."""
    return sum(max(0.0, group_gain_us(m, p, dims, costs)) for m, p in groups) - costs.step_us


def step_relays(groups: Iterable[tuple[int, int]], dims: AttentionDims | None, *, relaying: bool = False,
                costs: GateCosts = H100_COSTS) -> bool:
    """True if the step should relay ``groups``. ``relaying``: the previous decision was yes
    (hysteresis). No dims (model unknown, e.g. a bare radix cache in a test) means no cost
    model: the count thresholds decide."""
    if dims is None:
        return True
    groups = list(groups)
    if not groups:
        return False
    bar = costs.step_us * (1 - KEEP_FRACTION) if relaying else 0.0
    return step_gain_us(groups, dims, costs) > -bar
