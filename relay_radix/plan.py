"""The decode relay plan: who reads which shared segment in one decode batch.

Built on the CPU by the scheduler (which owns the radix tree and the requests) from the
relay groups, with no GPU->CPU copy; consumed by the backend, which turns token ranges into
KV slot ids by gathering from ``req_to_token`` on the device. All tensors are int32 on the
CPU; rows are SGLang's batch order.

For row ``r``: its groups' segments ``[group_start[g], group_end[g])`` (one per level) and
its own part ``[suffix_start[r], seq_lens[r])`` are disjoint and cover ``[0, seq_lens[r])``.
A row in no group has ``suffix_start = 0`` (plain paged decode over its whole sequence).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

if TYPE_CHECKING:
    from relay_radix.gate import AttentionDims
    from relay_radix.groups import RelayGroup, RelayGroupManager
    from sglang.srt.managers.schedule_batch import Req

# Structure ids are unique in the process: equal ids mean equal plans up to ``seq_lens``.
_structure_ids = itertools.count(1)


class PlanTotals(NamedTuple):
    """Sums over a plan's structure, computed once per structure (not per step)."""

    members: int  # rows in at least one group
    shared_tokens: int  # sum of the shared segment lengths
    suffix_start_tokens: int  # sum of suffix_start: tokens the rows do not read themselves


@dataclasses.dataclass(slots=True)
class DecodeRelayPlan:
    """One decode batch's relay plan (CPU int32 tensors; ``G`` groups, ``M`` memberships).

    Everything but ``seq_lens`` is the plan's *structure*: it changes only when the batch's
    requests, their tree nodes or the groups change, not when a step appends a token.
    ``structure_id`` names it (equal ids, equal structure), so per-step consumers (the
    backend's prefix slot lists and work lists) rebuild only what a new structure changes.
    """

    batch_size: int
    seq_lens: torch.Tensor  # [bs] tokens per row, including the token being decoded
    req_pool_indices: torch.Tensor  # [bs] row of req_to_token per batch row
    group_level: torch.Tensor  # [G] 0 = outermost
    group_start: torch.Tensor  # [G] first token position of the shared segment
    group_end: torch.Tensor  # [G] one past its last token position
    group_src_pool_idx: torch.Tensor  # [G] req_to_token row of one member (all hold the same slots there)
    group_head_id: torch.Tensor  # [G] int64 id of the group's head tree node (SGLang's TreeNode.id)
    member_indptr: torch.Tensor  # [G+1] group g's members: member_rows[member_indptr[g]:member_indptr[g+1]]
    member_rows: torch.Tensor  # [M] batch rows, ascending within a group
    suffix_start: torch.Tensor  # [bs] first token position of the row's own part
    # Filled in by __post_init__ for a new structure (structure_id 0); dataclasses.replace
    # copies them, so a plan that reuses a structure keeps its id, totals and digest.
    structure_id: int = 0
    totals: PlanTotals = PlanTotals(0, 0, 0)
    structure_digest: bytes = b""  # hash of the structure arrays (fingerprint's first part)

    def __post_init__(self):
        if self.structure_id:
            return
        self.structure_id = next(_structure_ids)
        self.totals = PlanTotals(
            members=int((self.suffix_start > 0).sum()),
            shared_tokens=int(self.prefix_lens.sum()),
            suffix_start_tokens=int(self.suffix_start.sum()),
        )
        h = hashlib.blake2b(digest_size=16)
        for t in (self.req_pool_indices, self.group_level, self.group_start, self.group_end,
                  self.member_indptr, self.member_rows, self.suffix_start):
            h.update(t.numpy().tobytes())
        self.structure_digest = h.digest()

    @property
    def num_groups(self) -> int:
        return int(self.group_level.numel())

    def segment_keys(self) -> list[tuple[int, int, int]]:
        """``(head node id, start, end)`` per group: names a segment's KV slots while the group
        lives (``relay_radix.kv_slots.PrefixSlotRuns``)."""
        return list(zip(self.group_head_id.tolist(), self.group_start.tolist(), self.group_end.tolist()))

    @property
    def prefix_lens(self) -> torch.Tensor:
        """[G] tokens per shared segment."""
        return self.group_end - self.group_start

    @property
    def suffix_lens(self) -> torch.Tensor:
        """[bs] tokens of each row's own part (>= 1: the decoded token is never shared)."""
        return self.seq_lens - self.suffix_start

    def kv_tokens_read(self) -> tuple[int, int]:
        """(relay, vanilla): KV tokens read per layer with relay and without it."""
        vanilla = int(self.seq_lens.sum())
        return self.totals.shared_tokens + vanilla - self.totals.suffix_start_tokens, vanilla

    def fingerprint(self) -> str:
        """Short hash of the whole plan (equal plans on every tensor-parallel rank): the
        structure's digest (hashed once per structure) and this step's ``seq_lens``."""
        h = hashlib.blake2b(self.structure_digest, digest_size=8)
        h.update(self.seq_lens.numpy().tobytes())
        return h.hexdigest()


def empty_plan(seq_lens: torch.Tensor, req_pool_indices: torch.Tensor) -> DecodeRelayPlan:
    """A plan with no groups: every row decodes its whole sequence as its own part."""
    bs = int(seq_lens.numel())
    z = torch.zeros(0, dtype=torch.int32)
    return DecodeRelayPlan(
        batch_size=bs,
        seq_lens=seq_lens.to(torch.int32).cpu(),
        req_pool_indices=req_pool_indices.to(torch.int32).cpu(),
        group_level=z, group_start=z, group_end=z, group_src_pool_idx=z,
        group_head_id=torch.zeros(0, dtype=torch.int64),
        member_indptr=torch.zeros(1, dtype=torch.int32),
        member_rows=z,
        suffix_start=torch.zeros(bs, dtype=torch.int32),
    )


def build_decode_plan(
    manager: "RelayGroupManager",
    reqs: Sequence["Req"],
    req_pool_indices: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
) -> DecodeRelayPlan:
    """Sync the manager with one decode batch, refresh its groups, and emit the plan.

    Args:
        manager: the tree's ``RelayGroupManager``.
        reqs: the batch's requests in batch order (``ScheduleBatch.reqs``).
        req_pool_indices: ``[bs]`` their ``req_to_token`` rows (CPU).
        seq_lens: ``[bs]`` their lengths including the token being decoded (CPU).

    Work is per request and per group (a short walk to the root per distinct tree node),
    never per token. A batch whose structure equals the last one built from this manager
    (same groups version, same rows in the same order with the same tree nodes and
    ``req_to_token`` rows: every decode step between two batch changes) reuses it, with
    this step's ``seq_lens``.
    """
    manager.sync(reqs)
    manager.refresh()
    pool = torch.as_tensor(req_pool_indices, dtype=torch.int32).cpu()
    lens = torch.as_tensor(seq_lens, dtype=torch.int32).cpu()
    # The structure is a function of exactly these: the groups (version), each row's node
    # (its group chain) and its req_to_token row (the groups' source rows).
    key = (manager.version, tuple(_node_id(r.last_node) for r in reqs), pool.numpy().tobytes())
    last = manager.last_plan
    if last is not None and last[0] == key:
        return dataclasses.replace(last[1], seq_lens=lens)
    plan = _build_structure(manager, reqs, pool, lens)
    manager.last_plan = (key, plan)
    return plan


def _node_id(node) -> int:
    return -1 if node is None else node.id


def _build_structure(manager: "RelayGroupManager", reqs: Sequence["Req"], pool: torch.Tensor,
                     lens: torch.Tensor) -> DecodeRelayPlan:
    if not manager._groups:
        return empty_plan(lens, pool)

    chains: dict = {}
    rows_of: dict[int, list[int]] = {}  # id(group) -> member rows
    group_of: dict[int, "RelayGroup"] = {}
    suffix_start = [0] * len(reqs)
    for r, req in enumerate(reqs):
        node = req.last_node
        chain = manager.group_chain(node, chains)
        for g in chain:
            rows_of.setdefault(id(g), []).append(r)
            group_of[id(g)] = g
        if chain:
            suffix_start[r] = chain[-1].end

    # Deterministic order for the same batch: outermost level first, then first member row.
    order = sorted(rows_of, key=lambda k: (group_of[k].level, rows_of[k][0]))
    groups = [group_of[k] for k in order]
    counts = [len(rows_of[k]) for k in order]
    member_rows = torch.tensor([r for k in order for r in rows_of[k]], dtype=torch.int32)
    member_indptr = torch.zeros(len(order) + 1, dtype=torch.int32)
    member_indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0)
    first_rows = member_indptr[:-1].long()
    return DecodeRelayPlan(
        batch_size=len(reqs),
        seq_lens=lens,
        req_pool_indices=pool,
        group_level=torch.tensor([g.level for g in groups], dtype=torch.int32),
        group_start=torch.tensor([g.start for g in groups], dtype=torch.int32),
        group_end=torch.tensor([g.end for g in groups], dtype=torch.int32),
        group_src_pool_idx=pool[member_rows[first_rows].long()],
        group_head_id=torch.tensor([g.head.id for g in groups], dtype=torch.int64),
        member_indptr=member_indptr,
        member_rows=member_rows,
        suffix_start=torch.tensor(suffix_start, dtype=torch.int32),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PlanStats:
    """What one decode step's plan does, for logs and metrics."""

    groups: int
    members: int  # rows in at least one group
    shared_tokens: int  # sum of shared segment lengths
    kv_bytes_relay: int  # KV bytes read per step, all layers, with relay
    kv_bytes_vanilla: int  # the same without relay
    groups_over_cap: int = 0  # qualifying groups left out for RELAY_RADIX_MAX_GROUPS
    groups_gated: int = 0  # qualifying groups the gate left out (relaying them would not save time)

    @classmethod
    def of(cls, plan: DecodeRelayPlan, dims: "AttentionDims", num_layers: int,
           groups_over_cap: int = 0, groups_gated: int = 0) -> "PlanStats":
        relay, vanilla = plan.kv_tokens_read()
        per_tok = dims.kv_bytes_per_token * num_layers
        return cls(
            groups=plan.num_groups,
            members=plan.totals.members,
            shared_tokens=plan.totals.shared_tokens,
            kv_bytes_relay=relay * per_tok,
            kv_bytes_vanilla=vanilla * per_tok,
            groups_over_cap=groups_over_cap,
            groups_gated=groups_gated,
        )
