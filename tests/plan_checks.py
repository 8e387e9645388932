"""Invariants every decode relay plan must satisfy, checked against SGLang's real state."""

from __future__ import annotations

import torch

from relay_radix.plan import DecodeRelayPlan


def path_nodes(tree, node):
    """Tree nodes from the root's child down to ``node``."""
    out = []
    while node is not None and node is not tree.root_node:
        out.append(node)
        node = node.parent
    return out[::-1]


def row_slots(sched, pool_idx: int, start: int, end: int) -> torch.Tensor:
    return sched.req_to_token_pool.req_to_token[pool_idx, start:end].to(torch.int64)


def check_plan(sched, batch, plan: DecodeRelayPlan) -> None:
    """Assert the plan is exact for ``batch`` given the real tree and pools.

    * each row's group segments (one per level, levels strictly increasing) and its own
      part tile ``[0, seq_len)`` exactly once;
    * the shared slots a group reads (from its source row) are, for every member, the
      member's own ``req_to_token`` slots over the segment, and the tree's node values;
    * membership equals the live rows whose ``last_node`` lies under the group's head;
    * every group head is pinned (``lock_ref > 0``), and there are at most ``max_groups``.
    """
    tree, manager = sched.tree, sched.tree.relay
    bs = len(batch.reqs)
    assert plan.batch_size == bs
    assert plan.seq_lens.tolist() == batch.seq_lens_cpu.tolist()
    assert plan.req_pool_indices.tolist() == [r.req_pool_idx for r in batch.reqs]
    groups_of_row = [[] for _ in range(bs)]
    for g in range(plan.num_groups):
        rows = plan.member_rows[plan.member_indptr[g]:plan.member_indptr[g + 1]].tolist()
        assert rows == sorted(rows) and len(rows) == len(set(rows)) and rows
        for r in rows:
            groups_of_row[r].append(g)
        start, end = int(plan.group_start[g]), int(plan.group_end[g])
        assert 0 <= start < end
        shared = row_slots(sched, int(plan.group_src_pool_idx[g]), start, end)
        for r in rows:
            own = row_slots(sched, batch.reqs[r].req_pool_idx, start, end)
            assert torch.equal(own, shared), f"row {r} does not hold group {g}'s slots"
    for r, req in enumerate(batch.reqs):
        gs = sorted(groups_of_row[r], key=lambda g: int(plan.group_level[g]))
        levels = [int(plan.group_level[g]) for g in gs]
        assert levels == list(range(len(levels))), f"row {r} levels {levels}"
        pos = 0
        for g in gs:
            assert int(plan.group_start[g]) == pos
            pos = int(plan.group_end[g])
        assert int(plan.suffix_start[r]) == pos
        assert pos < int(plan.seq_lens[r]), "the decoded token must be in the row's own part"
        # The shared span is tree KV: the node values along the request's matched path.
        if pos:
            tree_vals = torch.cat([n.value for n in path_nodes(tree, req.last_node)])[:pos]
            assert torch.equal(row_slots(sched, req.req_pool_idx, 0, pos), tree_vals.to(torch.int64))
    # Membership equals the live requests sharing each head's KV.
    heads = {id(g.head): g for g in manager.groups}
    for g in manager.groups:
        assert g.head.lock_ref > 0, "a live group's head must be pinned"
    for g in range(plan.num_groups):
        rows = set(plan.member_rows[plan.member_indptr[g]:plan.member_indptr[g + 1]].tolist())
        end = int(plan.group_end[g])
        # The group's head lies on its first member's path (same-length prompts in other
        # subtrees have groups with the same token range).
        first_path = path_nodes(tree, batch.reqs[min(rows)].last_node)
        head = next(h for h in manager.groups
                    if h.end == end and h.start == int(plan.group_start[g]) and h.head in first_path)
        under = {r for r, req in enumerate(batch.reqs) if head.head in path_nodes(tree, req.last_node)}
        assert rows == under
    assert len(heads) >= plan.num_groups
    assert plan.num_groups <= manager.config.max_groups  # the kernels' static capacity


def check_no_leak(sched) -> None:
    """After every request finished: nothing pinned, nothing counted, sizes consistent."""
    tree = sched.tree
    assert tree.relay.groups == []
    assert tree.relay.num_live == 0
    assert tree.protected_size() == 0
    stack = [tree.root_node]
    while stack:
        n = stack.pop()
        if n is not tree.root_node:
            assert n.lock_ref == 0, "a node is still locked after all requests finished"
        stack.extend(n.children.values())
    # Every KV slot is either free or owned by the tree.
    assert sched.allocator.available_size() + tree.evictable_size() == sched.allocator.size
