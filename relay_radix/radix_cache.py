"""``RelayRadixCache``: SGLang's ``RadixCache`` with a ``RelayGroupManager`` riding along.

A subclass, not a copy: every tree operation is SGLang's own; the overrides only tell the
manager about the three events that change who shares what (a request's KV is cached as
finished, a request's ``last_node`` moves, a node splits). Registered as the radix-cache
backend ``relay`` (``--radix-cache-backend relay``) by ``relay_radix.plugin``.
"""

from __future__ import annotations

import logging
import time

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from relay_radix.config import RelayConfig
from relay_radix.groups import RelayGroupManager

logger = logging.getLogger(__name__)


class _CreationOrderTieBreak:
    """SGLang's eviction priority made total and process-independent: ``(priority, node.id)``.

    SGLang: ``RadixCache.evict`` heapifies ``(get_priority(node), node)`` over
    ``list(self.evictable_leaves)``, a ``set`` of TreeNodes hashed by ``id()`` (memory
    address). On equal priorities the heap falls back to ``TreeNode.__lt__``, which compares
    ``last_access_time`` again, so a tie stays a tie and the pop order is the set's iteration
    order -- which differs between TP ranks (separate processes, different addresses). Ranks
    could then evict different nodes and their trees (prefix matches, relay plans) diverge.
    ``TreeNode.id`` comes from the class counter ``TreeNode.counter`` at construction; ranks
    that perform the same tree operations create this tree's nodes in the same relative order,
    so ordering ties by it is the same everywhere (older node first). Distinct priorities keep
    SGLang's order unchanged; the node itself is never compared.
    """

    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def get_priority(self, node):
        return (self.inner.get_priority(node), node.id)


class RelayRadixCache(RadixCache):
    """Radix cache whose ``relay`` attribute tracks live sharing and relay groups."""

    def __init__(self, params, config: RelayConfig | None = None):
        self.relay = None  # reset() runs inside super().__init__ before the manager exists
        super().__init__(params)
        if self.disable:
            raise ValueError(
                "relay-radix needs the radix cache: remove --disable-radix-cache "
                "(or use another --attention-backend)"
            )
        if self.page_size != 1:
            raise ValueError(
                f"relay-radix supports --page-size 1 only (got {self.page_size})"
            )
        self.relay = RelayGroupManager(self, config)
        self.window_evicted_tokens = 0  # extra tokens evicted for consecutive windows
        self._window_log_at = float("-inf")
        self.eviction_strategy = _CreationOrderTieBreak(self.eviction_strategy)

    def make_room_for_run(self, need: int) -> None:
        """Before an allocation of ``need`` slots (``kv_slots.prefer_consecutive_slots``: a prefill
        chunk of a long prompt) into a pool that is nearly full (fewer than ``(F + 1) x need``
        free slots, ``F`` = ``RELAY_RADIX_EVICT_FOR_RUNS``): evict on, least recently used first,
        until the free slots hold a window of ``need`` with no break
        (``kv_slots.evict_for_consecutive_window``, at most ``F x need`` more tokens). ``need``
        includes the rest of a chunked prompt (``prefer_consecutive_slots``' lookahead).

        Why "nearly full" and not "SGLang just evicted for it" (session 16's rule): a prompt
        longer than ``--chunked-prefill-size`` is allocated chunk by chunk, and only the first
        chunk finds the pool full; the extra eviction for it leaves room for the next chunk, which
        then took the fewest-breaks window of a fragmented free list (session 17, H100, MHA 16K
        prompt after the control, no-sharing and 8K runs: 335 prefix slot breaks, full-batch step
        17.7 ms against 16.3 ms in one run). A pool with more free slots than that holds its free
        slots in long runs or has nothing evictable worth the churn."""
        factor = self.relay.config.evict_for_runs if self.relay is not None else 0
        allocator = self.token_to_kv_pool_allocator
        if not factor or allocator.available_size() >= (factor + 1) * need:
            return
        from relay_radix.kv_slots import evict_for_consecutive_window

        extra, breaks = evict_for_consecutive_window(
            allocator, lambda n: self.evict(EvictParams(num_tokens=n)).num_tokens_evicted, need, factor * need)
        if extra:
            self.window_evicted_tokens += extra
            now = time.monotonic()
            if now - self._window_log_at >= 30.0:  # at most one line per 30 s; the total is kept
                self._window_log_at = now
                logger.info("relay-radix: evicted %d more cached tokens (least recently used) so a %d-slot "
                            "allocation finds a window with %d breaks (%d extra tokens since start; "
                            "RELAY_RADIX_EVICT_FOR_RUNS=0 to turn off)", extra, need, breaks,
                            self.window_evicted_tokens)

    def reset(self):
        super().reset()
        if self.relay is not None:
            self.relay.clear()

    # SGLang: RadixCache.cache_finished_req -- the single exit of a request's KV from the
    # running set (finish, abort, and retraction via release_kv_cache(is_insert=False)).
    # Leave the groups first so a dissolving group unpins before the request's own lock goes.
    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
        if self.relay is not None:
            self.relay.leave(req)
        return super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)

    # SGLang: RadixCache.cache_unfinished_req -- moves req.last_node (and its lock) to the
    # node of the whole prompt after prefill; a live request is re-counted there.
    def cache_unfinished_req(self, req, chunked: bool = False):
        super().cache_unfinished_req(req, chunked=chunked)
        if self.relay is not None and self.relay.is_live(req):
            self.relay.repoint(req)

    # SGLang: RadixCache._split_node -- a new parent appears above `child`; it carries the
    # child's live requests (the tree copies the child's lock_ref to it for the same reason).
    def _split_node(self, key, child, split_len):
        new_node = super()._split_node(key, child, split_len)
        if self.relay is not None:
            self.relay.on_split(new_node, child)
        return new_node


def relay_radix_cache_factory(ctx):
    """``register_radix_cache_backend`` factory: refuse tree variants relay cannot follow."""
    reasons = []
    if ctx.disable_radix_cache:
        reasons.append("--disable-radix-cache is set (relay groups come from the radix tree)")
    if ctx.enable_hierarchical_cache:
        reasons.append("--enable-hierarchical-cache (HiRadixCache) is not supported")
    if ctx.is_hybrid_swa:
        reasons.append("sliding-window (hybrid SWA) models are not supported")
    if ctx.is_hybrid_ssm:
        reasons.append("hybrid SSM/mamba models are not supported")
    if getattr(ctx, "is_dsa", False):
        reasons.append("DSA sparse-attention models are not supported")
    if reasons:
        raise ValueError(
            "relay-radix cannot run here: " + "; ".join(reasons)
            + ". Use the default radix cache with another --attention-backend (e.g. flashinfer)."
        )
    return RelayRadixCache(ctx.params)
