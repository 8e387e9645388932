"""Prefill batches over cached prompts: which KV slots each request's cached prefix is in.

The relay backend attends a prefill batch's cached prefixes with one FA3 launch over the pool
(``relay_radix.kernels.extend_pool``) when each prefix is one run of consecutive KV slots. It
must know the runs' first slots on the host (FlashInfer plans absolute ``kv_indptr`` there)
without a GPU->CPU sync, so it names each prefix by a key the scheduler can give:

    (id of the request's ``last_node``, 0, prefix length)

the same ``(head node id, start, end)`` form as a decode group's segment
(``DecodeRelayPlan.segment_keys``), so both share ``kv_slots.PrefixSlotRuns``'s run table. Why
the key names fixed slots: ``last_node`` is where SGLang's ``match_prefix`` ended, so the
prefix is the KV of the tree path root..``last_node``, which the request's lock keeps from
eviction, a split leaves where it is, and node ids are never reused. A key seen for the first
time is learned on the device and read back asynchronously: that batch keeps SGLang's path and
the next one with the same prompt takes the pool.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ExtendStats", "extend_prefix_keys"]


def extend_prefix_keys(reqs, manager) -> list:
    """Per request of a prefill batch, the run-table key of its cached prefix, or ``None`` when
    it has none or its ``last_node`` does not end where its prefix does (then the batch keeps
    SGLang's path). Reads ``req.prefix_indices`` and ``req.last_node`` as
    ``ScheduleBatch.prepare_for_extend`` left them (the scheduler hook runs right before the
    batch launches); ``manager``: the tree's ``RelayGroupManager`` (its ``token_depth`` walks
    the path, shared by the batch's requests)."""
    keys, memo = [], {}
    for r in reqs:
        plen = len(r.prefix_indices) if r.prefix_indices is not None else 0
        node = getattr(r, "last_node", None)
        if plen == 0 or node is None or manager.token_depth(node, memo) != plen:
            keys.append(None)
        else:
            keys.append((node.id, 0, plen))
    return keys


@dataclasses.dataclass
class ExtendStats:
    """Running totals of prefill batches with a cached prefix (decode log line and /metrics)."""

    prefix_batches: int = 0  # prefill batches with at least one cached prefix
    pool_batches: int = 0  # ... whose prefixes the pool pass attended
    pool_tokens: int = 0  # new tokens of those batches that attended a cached prefix there
    why_not: dict = dataclasses.field(default_factory=dict)  # reason -> batches left on SGLang's path

    def add(self, planned: bool, why: str, tokens: int = 0) -> None:
        self.prefix_batches += 1
        if planned:
            self.pool_batches += 1
            self.pool_tokens += tokens
        else:
            self.why_not[why] = self.why_not.get(why, 0) + 1

    def summary(self) -> str:
        """``extend pool P/N prefill batches`` (+ why the others were not)."""
        s = f"extend pool {self.pool_batches}/{self.prefix_batches} prefill batches"
        if self.why_not:
            s += " (" + ", ".join(f"{n} {why}" for why, n in sorted(self.why_not.items())) + ")"
        return s
