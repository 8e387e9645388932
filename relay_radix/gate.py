"""The promotion gate: a group is worth relaying only if it saves more HBM bytes than it adds.

Per layer and decode step, a group of ``m`` members over a shared segment of ``P`` tokens
lets ``m - 1`` members skip reading ``P`` tokens of KV. It adds one partial attention state
per member and query head (fp32 ``o`` plus ``lse``, written by the prefix pass and read by the
merge) and a fixed tail for the group's extra programs. Both sides are bytes, so the gate
needs no timing model; ``GATE_FIXED_BYTES`` is that tail expressed as bytes (about 0.35 us of
H100 HBM time), which keeps tiny groups out even where partials are cheap.
"""

from __future__ import annotations

import dataclasses

GATE_FIXED_BYTES = 1 << 20


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


def bytes_saved(members: int, segment_tokens: int, dims: AttentionDims) -> int:
    """KV bytes per layer that relaying one group saves against reading it per member."""
    return (members - 1) * segment_tokens * dims.kv_bytes_per_token


def bytes_added(members: int, dims: AttentionDims) -> int:
    """Extra bytes per layer that relaying one group costs (partials + fixed tail)."""
    return members * dims.partial_bytes_per_member + GATE_FIXED_BYTES


def group_pays_off(members: int, segment_tokens: int, dims: AttentionDims | None) -> bool:
    """True if relaying the group saves more bytes than it adds. No dims (model unknown,
    e.g. a bare radix cache in a test) means no byte model: the count thresholds decide."""
    if dims is None:
        return True
    return bytes_saved(members, segment_tokens, dims) > bytes_added(members, dims)
