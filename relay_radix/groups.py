"""Relay groups: which prefixes of SGLang's radix tree are shared by enough *live* requests.

A live request is one in the running decode batch. It is counted under ``req.last_node``,
the deepest tree node whose KV its ``req_to_token`` row is known to share with the tree
(the admission-time match, or the node ``cache_unfinished_req`` moved it to). Every node on
the path from there to the root gets the request in its live count, so for every node the
manager knows how many live requests pass through it.

A node becomes the *head* of a relay group when
  * its live count reaches ``min_group_size`` (a promoted head stays until the count falls
    below ``demote_group_size``: hysteresis, so groups do not flap step to step),
  * no child carries the same count (the deepest node with that member set: a chain of
    nodes split apart by the tree but shared by the same requests is one group),
  * its *segment* (the tokens after the nearest promoted ancestor's end, up to its own end)
    is at least ``min_prefix_tokens`` long, its nesting level is below ``max_levels``,
  * and the gate (``relay_radix.gate``) says relaying it saves time.
Then the gate decides for all groups at once: if together they save less than relaying a step
costs, none is kept and decode steps run vanilla's kernel (the plain graph).
At most ``max_groups`` groups exist at once (the decode kernels' static capacity): past
that, the groups that save the most prefix reads are kept and the warning says so.
Groups nest: a global system prompt (level 0) and, under it, few-shot blocks shared by
subsets (level 1) are separate groups whose segments are disjoint.

A promoted head is pinned with the tree's own ``inc_lock_ref`` (so neither it nor its
ancestors can be evicted while the group lives) and unpinned with ``dec_lock_ref`` when the
group dissolves. Requests leave their groups at once when the tree caches them as finished
(finish, abort and retraction all go through ``cache_finished_req``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Iterable

from relay_radix.config import RelayConfig
from relay_radix.gate import AttentionDims, group_gain_us, step_relays

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class RelayGroup:
    """One promoted shared segment of the radix tree.

    ``head`` is the deepest tree node of the segment; the segment covers token positions
    ``[start, end)`` of every member's sequence (``end`` = depth of ``head``).
    """

    head: "TreeNode"
    level: int  # 0 = outermost; a level-k group's segment starts where its level-(k-1) ancestor ends
    start: int
    end: int
    members: int  # live requests under ``head`` at the last refresh

    @property
    def tokens(self) -> int:
        return self.end - self.start


class RelayGroupManager:
    """Live-request counts over a ``RadixCache`` and the relay groups they promote."""

    def __init__(self, tree: "RadixCache", config: RelayConfig | None = None):
        self.tree = tree
        self.config = config or RelayConfig.from_env()
        self.dims: AttentionDims | None = None  # set by the backend when the model is known
        self._count: dict["TreeNode", int] = {}  # live requests passing through each node
        self._live: dict[str, "TreeNode"] = {}  # rid -> node it is counted under
        self._groups: dict["TreeNode", RelayGroup] = {}  # head -> group (pinned heads)
        self._dirty = False  # live counts changed since the last refresh
        # Bumped whenever a group appears, dissolves or changes its segment: the decode plan's
        # structure depends on the groups only through this (relay_radix.plan).
        self.version = 0
        self.last_plan: tuple | None = None  # (structure key, DecodeRelayPlan): build_decode_plan's cache
        self.groups_over_cap = 0  # qualifying groups left out at the last refresh (max_groups)
        self.groups_gated = 0  # qualifying groups the gate left out at the last refresh (no time saved)

    # ---- queries -------------------------------------------------------------------------
    def live_count(self, node: "TreeNode") -> int:
        return self._count.get(node, 0)

    def is_live(self, req: "Req") -> bool:
        return req.rid in self._live

    @property
    def num_live(self) -> int:
        return len(self._live)

    @property
    def groups(self) -> list[RelayGroup]:
        """Promoted groups, outermost first, in a deterministic order (level, start, end)."""
        return sorted(self._groups.values(), key=lambda g: (g.level, g.start, g.end, g.head.id))

    def group_chain(self, node: "TreeNode | None", memo: dict | None = None) -> tuple[RelayGroup, ...]:
        """Groups whose heads lie on the path root..node, outermost first.

        ``memo`` (node -> chain) lets one plan walk each tree node once: requests have their
        own leaves but share the ancestors."""
        if node is None or node is self.tree.root_node:
            return ()
        if memo is not None and node in memo:
            return memo[node]
        chain = self.group_chain(node.parent, memo)
        g = self._groups.get(node)
        if g is not None:
            chain = chain + (g,)
        if memo is not None:
            memo[node] = chain
        return chain

    # ---- membership ----------------------------------------------------------------------
    def _add_path(self, node: "TreeNode | None", delta: int) -> None:
        root = self.tree.root_node
        while node is not None and node is not root:
            self._dirty = True
            c = self._count.get(node, 0) + delta
            if c > 0:
                self._count[node] = c
            else:
                self._count.pop(node, None)
            node = node.parent

    def join(self, req: "Req") -> None:
        """Count a request that entered the running decode batch."""
        if req.rid in self._live:
            self.repoint(req)
            return
        node = req.last_node or self.tree.root_node
        self._live[req.rid] = node
        self._add_path(node, +1)

    def repoint(self, req: "Req") -> None:
        """Move a live request to its current ``last_node`` (after ``cache_unfinished_req``)."""
        old = self._live.get(req.rid)
        new = req.last_node or self.tree.root_node
        if old is None or old is new:
            return
        self._add_path(old, -1)
        self._add_path(new, +1)
        self._live[req.rid] = new

    def leave(self, req: "Req") -> None:
        """Drop a request from its groups now (finish, abort, retract); dissolve what shrinks."""
        node = self._live.pop(req.rid, None)
        if node is None:
            return
        self._add_path(node, -1)
        self._demote_shrunk()

    def sync(self, reqs: Iterable["Req"]) -> None:
        """Make the live set equal to ``reqs`` (one decode batch); repoint moved requests."""
        reqs = list(reqs)
        current = {r.rid for r in reqs}
        for rid in [rid for rid in self._live if rid not in current]:
            node = self._live.pop(rid)
            self._add_path(node, -1)
        for r in reqs:
            self.join(r)

    def on_split(self, new_parent: "TreeNode", child: "TreeNode") -> None:
        """The tree split ``child``: its new parent carries exactly the child's live requests
        (and its lock, copied by the tree), so it inherits the count."""
        c = self._count.get(child)
        if c:
            self._count[new_parent] = c
            self._dirty = True

    # ---- promotion -----------------------------------------------------------------------
    def token_depth(self, node: "TreeNode", memo: dict) -> int:
        """Token depth of ``node``'s end (sum of key lengths up to the root); ``memo`` caches
        it per node for one caller's walk (the tree may change between walks)."""
        if node is self.tree.root_node or node is None:
            return 0
        d = memo.get(node)
        if d is None:
            d = self.token_depth(node.parent, memo) + len(node.key)
            memo[node] = d
        return d

    def _is_head_candidate(self, node: "TreeNode", count: int) -> bool:
        # Hysteresis: a promoted head keeps its group down to ``demote_group_size``; so does
        # the child that takes over when the head's other members leave (same member set).
        promoted = node in self._groups or (
            node.parent in self._groups and self._count.get(node.parent, 0) == count
        )
        threshold = self.config.demote_group_size if promoted else self.config.min_group_size
        if count < threshold:
            return False
        # A child with the same count has the same members and a longer shared segment.
        return not any(self._count.get(ch, 0) == count for ch in node.children.values())

    def refresh(self) -> None:
        """Recompute promotions from the live counts; pin new heads, unpin dropped ones.
        A no-op when no count changed since the last refresh (the common decode step)."""
        if not self._dirty:
            return
        self._dirty = False
        memo: dict = {}
        candidates = [n for n, c in self._count.items() if self._is_head_candidate(n, c)]
        candidates.sort(key=lambda n: (self.token_depth(n, memo), n.id))  # ancestors first
        chosen, gated = self._nest(candidates, memo)
        cap = self.config.max_groups
        if len(chosen) > cap:
            # The decode kernels' static buffers hold ``max_groups`` groups. Keep those that
            # save the most prefix reads ((members - 1) x segment tokens); a kept group whose
            # ancestor was dropped starts at the nearest kept ancestor instead, so re-nest.
            # Ties break on the head's creation id, which every TP rank shares.
            ranked = sorted(chosen.values(), key=lambda g: (-(g.members - 1) * g.tokens, g.head.id))
            kept = {g.head for g in ranked[:cap]}
            # The first pass's gated count stands: those candidates were never in ``ranked``.
            chosen, regated = self._nest([n for n in candidates if n in kept], memo)
            gated += regated
            # Warn when the cap starts to bite (refresh runs on most steps of a busy server);
            # the decode log line and /metrics show the count while it lasts.
            log = logger.warning if self.groups_over_cap == 0 else logger.debug
            self.groups_over_cap = len(ranked) - len(chosen)
            log("relay-radix: %d prefixes qualify as relay groups, more than RELAY_RADIX_MAX_GROUPS=%d; "
                "the %d that save the most prefix reads are kept, the others decode unshared (raise "
                "RELAY_RADIX_MAX_GROUPS or RELAY_RADIX_MIN_GROUP_SIZE)", len(ranked), cap, len(chosen))
        else:
            self.groups_over_cap = 0
        if self.config.gate and chosen and not step_relays(
                [(g.members, g.tokens) for g in chosen.values()], self.dims, relaying=bool(self._groups)):
            # Too little to share for what a relay step costs: vanilla's kernel alone is faster.
            gated += len(chosen)
            chosen = {}
        self.groups_gated = gated
        self._apply(chosen)

    def _nest(self, candidates: list["TreeNode"], memo: dict) -> tuple[dict["TreeNode", RelayGroup], int]:
        """Groups from head candidates sorted ancestors first: each one's segment starts where
        its nearest chosen ancestor ends; too deep, too short or (gate) unprofitable segments
        are skipped. Returns the groups and how many the gate skipped."""
        chosen: dict["TreeNode", RelayGroup] = {}
        gated = 0
        cfg = self.config
        for node in candidates:
            anc = node.parent
            while anc is not None and anc not in chosen:
                anc = anc.parent
            parent_group = chosen.get(anc) if anc is not None else None
            level = parent_group.level + 1 if parent_group else 0
            start = parent_group.end if parent_group else 0
            end = self.token_depth(node, memo)
            count = self._count[node]
            if level >= cfg.max_levels or end - start < cfg.min_prefix_tokens:
                continue
            if cfg.gate and self.dims is not None and group_gain_us(count, end - start, self.dims) <= 0:
                gated += 1
                continue
            chosen[node] = RelayGroup(head=node, level=level, start=start, end=end, members=count)
        return chosen, gated

    def _apply(self, chosen: dict["TreeNode", RelayGroup]) -> None:
        changed = chosen.keys() != self._groups.keys()
        for node in [n for n in self._groups if n not in chosen]:
            self.tree.dec_lock_ref(node)
        for node in chosen:
            if node not in self._groups:
                self.tree.inc_lock_ref(node)
        if not changed:
            changed = any(
                (g.level, g.start, g.end) != (self._groups[n].level, self._groups[n].start, self._groups[n].end)
                for n, g in chosen.items()
            )
        self._groups = chosen
        if changed:
            self.version += 1
            logger.debug("relay groups now %s", [(g.level, g.start, g.end, g.members) for g in self.groups])

    def _demote_shrunk(self) -> None:
        """Dissolve groups whose live count fell below the demotion size, at once."""
        if any(self._count.get(n, 0) < self.config.demote_group_size for n in self._groups):
            self.refresh()

    def clear(self) -> None:
        """Forget everything without touching locks (the tree was reset under us)."""
        self._count.clear()
        self._live.clear()
        self._groups.clear()
        self._dirty = False
        self.version += 1
        self.last_plan = None
