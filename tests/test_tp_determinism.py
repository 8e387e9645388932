"""Tensor-parallel determinism: two ranks fed the same requests build the same relay plans.

Every TP rank runs its own scheduler over its own radix tree; only requests are broadcast
(SGLang 0.5.16: one scheduler process per rank, ``entrypoints/engine.py:598-660``; requests
broadcast in ``managers/scheduler_components/request_receiver.py:143-205``). Two independent ``MiniScheduler`` instances play two ranks: separate real
``RelayRadixCache`` trees, pools and allocators, fed the same operations. Rank 1 allocates
extra objects (and extra ``TreeNode``s) between operations, so its nodes live at other
addresses and carry other absolute ids, as in another process.

SGLang's LRU priorities are ``time.monotonic()`` stamps; here the tree module's clock is
frozen, so every evictable leaf ties. ``RadixCache.evict`` then pops leaves in the order of
``list(self.evictable_leaves)`` (a set hashed by address) unless the heap key is total;
``RelayRadixCache`` makes it ``(priority, node.id)``.
"""

from __future__ import annotations

import contextlib
import random
import time
import types
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sglang.srt.mem_cache.radix_cache as sglang_radix_cache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import TreeNode

from relay_radix.config import RelayConfig
from relay_radix.cpu_sim import MiniScheduler
from relay_radix.patches.scheduler_hooks import _record_plan_fingerprint
from relay_radix.plan import build_decode_plan
from tests.plan_checks import check_no_leak, check_plan


def words(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


@contextlib.contextmanager
def tied_clock():
    """Freeze the radix tree's ``time.monotonic`` (only in SGLang's radix_cache module):
    every node gets the same access and creation time, so every eviction priority ties."""
    frozen = types.SimpleNamespace(monotonic=lambda: 1000.0, perf_counter=time.perf_counter)
    with mock.patch.object(sglang_radix_cache, "time", frozen):
        yield


def tree_shape(tree):
    """Canonical structure of a tree: (key tokens, lock_ref, children) recursively.
    KV slot ids are left out: they may legitimately differ between ranks."""
    def walk(node):
        kids = sorted(walk(c) for c in node.children.values())
        return (tuple(node.key.token_ids), node.lock_ref, tuple(kids))
    return walk(tree.root_node), tree.evictable_size(), tree.protected_size()


class TwoRanks:
    """Two ranks stepped in lockstep; rank 1 perturbs object addresses and node ids first."""

    def __init__(self, perturb_seed: int, **kw):
        self.ranks = [MiniScheduler(**kw), MiniScheduler(**kw)]
        self.hooks = [types.SimpleNamespace(tp_rank=k) for k in range(2)]  # what the hook reads
        self._junk: list = []
        self._rng = random.Random(perturb_seed)

    def _perturb(self) -> None:
        n = self._rng.randrange(1, 40)
        self._junk.append([types.SimpleNamespace(a=i, b=None, c=()) for i in range(n)])
        self._junk.append([TreeNode() for _ in range(self._rng.randrange(0, 3))])
        if len(self._junk) > 200:
            del self._junk[: self._rng.randrange(1, 100)]  # free some: reuse of old addresses

    def each(self, fn):
        out = []
        for k, s in enumerate(self.ranks):
            if k == 1:
                self._perturb()
            out.append(fn(s))
        return out

    def same(self, fn, what: str):
        a, b = self.each(fn)
        assert a == b, f"ranks diverged: {what}"
        return a

    # ---- operations (identical on both ranks) --------------------------------------------
    def arrive(self, token_lists, max_new_tokens: int = 64):
        def admit(s):
            reqs = [s.new_req(list(t), max_new_tokens=max_new_tokens) for t in token_lists]
            s.prefill(reqs)
            return [r.extend_range.start for r in reqs]  # matched prefix: shapes the prefill
        self.same(admit, "prefix matches at admission")

    def decode(self):
        def step(s, hook):
            batch = s.decode_batch()
            plan = build_decode_plan(s.tree.relay, batch.reqs, batch.req_pool_indices_cpu,
                                     batch.seq_lens_cpu)
            check_plan(s, batch, plan)
            _record_plan_fingerprint(hook, plan)
            s.after_decode(batch)
            return plan.fingerprint()
        fps = []
        for k, s in enumerate(self.ranks):
            if k == 1:
                self._perturb()
            fps.append(step(s, self.hooks[k]))
        assert fps[0] == fps[1], "ranks diverged: decode plan fingerprint"
        assert self.hooks[0]._relay_plan_digest == self.hooks[1]._relay_plan_digest
        return fps[0]

    def finish(self, i: int, retract: bool = False):
        def act(s):
            victim = s.running[i % len(s.running)]
            (s.retract if retract else s.finish)(victim)
            return victim.rid
        self.same(act, "finished request")

    def evict(self, num_tokens: int):
        self.same(lambda s: s.tree.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted,
                  "tokens evicted")

    def check_trees(self, what: str):
        self.same(lambda s: tree_shape(s.tree), f"tree after {what}")


def test_tied_lru_eviction_picks_the_same_leaves_on_both_ranks():
    """Regression: 16 cached prompts with equal LRU stamps, half of them evicted; the next
    requests (overlap scheduling: their first decode step groups what admission matched)
    must see the same survivors on both ranks."""
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16)
    # Distinct lengths: plan_checks.check_plan finds a group's head by its (start, end).
    prompts = [words(300 + i, 48 + 2 * i) for i in range(16)]
    with tied_clock():
        two = TwoRanks(perturb_seed=1, relay_config=cfg, overlap=True, kv_size=4096)
        # Cache every prompt (one finished request each): 16 unlocked leaves, all tied.
        two.arrive([p + words(400 + i, 4) for i, p in enumerate(prompts)], max_new_tokens=8)
        two.decode()
        two.decode()
        for _ in range(len(prompts)):
            two.finish(0)
        two.check_trees("caching the prompts")
        leaf = sum(len(p) for p in prompts) // len(prompts) + 4 + 2
        two.evict(8 * leaf - 1)  # about half of the leaves go; which ones is the question
        two.check_trees("tied eviction")
        # Three newcomers per prompt: a prompt that survived is a relay group at once.
        two.arrive([p + words(500 + 3 * i + j, 4) for i, p in enumerate(prompts) for j in range(3)])
        fp = two.decode()
        assert fp
        plan_groups = two.ranks[0].tree.relay.groups
        assert 0 < len(plan_groups) < len(prompts)  # the eviction really decided something
        two.decode()
        for _ in range(3 * len(prompts)):
            two.finish(0)
        two.check_trees("the end")
        for s in two.ranks:
            check_no_leak(s)


# ---- property test: random arrivals, finishes, aborts, retractions, evictions ------------
PROMPTS = {"A": words(11, 300), "B": words(12, 200), "F1": words(13, 120), "F2": words(14, 90),
           "C": words(15, 150)}
SHAPES = [("A",), ("A", "F1"), ("A", "F2"), ("B",), ("C",), ("B", "F2"), ()]
MAX_RUNNING = 16

arrive = st.tuples(st.just("arrive"), st.integers(0, len(SHAPES) - 1), st.integers(1, 4))
decode = st.tuples(st.just("decode"), st.integers(1, 3), st.just(0))
op = st.one_of(
    arrive, arrive, decode, decode,
    st.tuples(st.just("finish"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("retract"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("evict"), st.integers(1, 600), st.just(0)),
    st.tuples(st.just("evict_all"), st.just(0), st.just(0)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=10, max_size=40), overlap=st.booleans(),
       seed=st.integers(0, 10**6), max_groups=st.sampled_from([1, 2, 64]))
def test_two_ranks_build_identical_plans_under_tied_evictions(ops, overlap, seed, max_groups):
    # max_groups 1 / 2: the cap's choice (savings, then creation order) must agree across ranks too.
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, max_groups=max_groups)
    # A small KV pool: admissions and decode steps also evict on their own (SGLang's
    # evict_from_tree_cache inside alloc_token_slots), with tied priorities.
    kv_size = 3072
    rng = random.Random(seed)
    with tied_clock():
        two = TwoRanks(perturb_seed=seed + 1, relay_config=cfg, overlap=overlap,
                       kv_size=kv_size, max_reqs=MAX_RUNNING + 8)
        a = two.ranks[0]

        def headroom():
            return a.allocator.available_size() + a.tree.evictable_size()

        for kind, x, y in ops:
            if kind == "arrive":
                shape = SHAPES[x]
                prefix = [t for part in shape for t in PROMPTS[part]]
                toks = [prefix + words(rng.randrange(10**9), rng.randrange(1, 40)) for _ in range(y)]
                need = sum(len(t) for t in toks) + 8 * (len(a.running) + y)
                if len(a.running) + y <= MAX_RUNNING and need < headroom():
                    two.arrive(toks)
            elif kind == "decode" and a.running:
                for _ in range(x):
                    # SGLang retracts when a decode step cannot get its slots.
                    while a.running and headroom() < 2 * len(a.running):
                        two.finish(len(a.running) - 1, retract=True)
                    if not a.running:
                        break
                    two.decode()
            elif kind in ("finish", "abort", "retract") and a.running:
                two.finish(x, retract=(kind == "retract"))  # abort takes finish's release path
            elif kind == "evict":
                two.evict(x)
            elif kind == "evict_all":
                two.evict(kv_size)
            two.check_trees(kind)
        while a.running:
            two.finish(0)
        two.check_trees("the end")
        for s in two.ranks:
            check_no_leak(s)


def test_plan_digest_in_debug_log_and_decode_line(caplog):
    """The hook's per-rank trace: a DEBUG line per plan and ``plan digest <8 hex>`` appended
    to SGLang's ``Decode batch`` line, equal on both ranks."""
    import logging

    from relay_radix.metrics import DecodeLogFilter

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16)
    two = TwoRanks(perturb_seed=3, relay_config=cfg)
    two.arrive([words(7, 64) + words(700 + i, 4) for i in range(3)])
    with caplog.at_level(logging.DEBUG, logger="relay_radix.patches.scheduler_hooks"):
        fp = two.decode()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay-radix plan")]
    assert lines == [f"relay-radix plan step=1 tp_rank={k} fp={fp} groups=1" for k in range(2)]
    shown = []
    for hook in two.hooks:
        f = DecodeLogFilter(lambda: None, digest_source=lambda h=hook: h._relay_plan_digest)
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, "Decode batch, #running-req: 3", None, None)
        f.filter(rec)
        shown.append(rec.msg.rsplit(", ", 1)[1])
    assert shown[0] == shown[1] == f"plan digest {two.hooks[0]._relay_plan_digest.hex()[:8]}"
    for _ in range(3):
        two.finish(0)
