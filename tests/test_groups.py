"""Relay groups over SGLang's real RadixCache: promotion, nesting, dissolution, invariants."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_radix.config import RelayConfig
from relay_radix.plan import build_decode_plan
from tests.plan_checks import check_no_leak, check_plan
from relay_radix.cpu_sim import MiniScheduler


def words(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


def plan_for(sched):
    batch = sched.decode_batch()
    plan = build_decode_plan(sched.tree.relay, batch.reqs, batch.req_pool_indices_cpu, batch.seq_lens_cpu)
    check_plan(sched, batch, plan)
    sched.after_decode(batch)
    return batch, plan


def group_table(plan):
    """{(level, start, end): member count} of a plan."""
    return {
        (int(plan.group_level[g]), int(plan.group_start[g]), int(plan.group_end[g])):
        int(plan.member_indptr[g + 1] - plan.member_indptr[g])
        for g in range(plan.num_groups)
    }


def test_nested_system_prompts_promote_then_dissolve():
    """A global prompt shared by 8 requests and, under it, a few-shot block shared by 4:
    two nested groups; they dissolve as requests finish and leave nothing pinned."""
    cfg = RelayConfig(min_group_size=3, demote_group_size=2, min_prefix_tokens=64)
    s = MiniScheduler(relay_config=cfg)
    system, fewshot = words(1, 600), words(2, 300)
    with_fewshot = [s.new_req(system + fewshot + words(10 + i, 20)) for i in range(4)]
    plain = [s.new_req(system + words(20 + i, 30)) for i in range(4)]
    alone = [s.new_req(words(30 + i, 200)) for i in range(2)]
    s.prefill(with_fewshot[:1])  # the first request puts the prompts in the tree
    s.prefill(with_fewshot[1:] + plain + alone)
    batch, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 600): 8, (1, 600, 900): 4}
    heads = {(g.level, g.start): g.head for g in s.tree.relay.groups}
    assert s.tree.relay.live_count(heads[(0, 0)]) == 8  # live requests through each node
    assert s.tree.relay.live_count(heads[(1, 600)]) == 4
    rows = {r.rid: i for i, r in enumerate(batch.reqs)}
    for r in alone:
        assert int(plan.suffix_start[rows[r.rid]]) == 0
    for r in plain:
        assert int(plan.suffix_start[rows[r.rid]]) == 600
    for r in with_fewshot:
        assert int(plan.suffix_start[rows[r.rid]]) == 900
    relay, vanilla = plan.kv_tokens_read()
    assert vanilla - relay == 7 * 600 + 3 * 300  # each shared token read once, not per member

    # Two few-shot members finish: the level-1 group keeps 2 >= demote size (hysteresis).
    for r in with_fewshot[:2]:
        s.finish(r)
    _, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 600): 6, (1, 600, 900): 2}
    # One more leaves: below the demote size, the level-1 group dissolves at once.
    s.finish(with_fewshot[2])
    assert [(g.level, g.start, g.end) for g in s.tree.relay.groups] == [(0, 0, 600)]
    _, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 600): 5}
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_group_needs_min_size_and_tokens():
    cfg = RelayConfig(min_group_size=4, demote_group_size=2, min_prefix_tokens=256)
    s = MiniScheduler(relay_config=cfg)
    short = words(3, 100)
    s.prefill([s.new_req(short + words(40 + i, 10)) for i in range(6)])
    _, plan = plan_for(s)
    assert plan.num_groups == 0  # 100 shared tokens < min_prefix_tokens
    long = words(4, 400)
    s.prefill([s.new_req(long + words(50 + i, 10)) for i in range(3)])
    _, plan = plan_for(s)
    assert plan.num_groups == 0  # 3 sharers < min_group_size
    s.prefill([s.new_req(long + words(60, 10))])
    _, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 400): 4}
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_overlap_first_decode_uses_admission_match():
    """Overlap scheduling: requests prefilled together are deduplicated only after their
    first decode step was launched; that step must not group KV they do not share yet."""
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16)
    s = MiniScheduler(relay_config=cfg, overlap=True)
    system = words(5, 300)
    s.prefill([s.new_req(system + words(70 + i, 8)) for i in range(4)])
    _, plan = plan_for(s)  # last_node is still the root for all four
    assert plan.num_groups == 0
    _, plan = plan_for(s)  # cache_unfinished_req has run: they share the tree's copy now
    assert group_table(plan) == {(0, 0, 300): 4}
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_pinned_group_survives_eviction_and_split():
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16)
    s = MiniScheduler(relay_config=cfg)
    system = words(6, 200)
    reqs = [s.new_req(system + words(80 + i, 8)) for i in range(3)]
    s.prefill(reqs)
    _, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 200): 3}
    s.evict_all_unlocked()
    # A newcomer matching only half the prompt splits the group's head node.
    s.prefill([s.new_req(system[:100] + words(90, 8))])
    _, plan = plan_for(s)
    # The head node kept its identity (and pin) under the split: 4 requests now share
    # [0, 100) and 3 of them also [100, 200), which is two nested groups.
    assert group_table(plan) == {(0, 0, 100): 4, (1, 100, 200): 3}
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_retract_and_abort_leave_groups_at_once():
    cfg = RelayConfig(min_group_size=3, demote_group_size=3, min_prefix_tokens=16)
    s = MiniScheduler(relay_config=cfg)
    system = words(7, 128)
    reqs = [s.new_req(system + words(100 + i, 8)) for i in range(3)]
    s.prefill(reqs)
    plan_for(s)
    assert len(s.tree.relay.groups) == 1
    s.retract(reqs[0])
    assert s.tree.relay.groups == []  # 2 < demote size: dissolved without waiting for a step
    s.finish(reqs[1])  # abort takes the same release path as finish
    s.finish(reqs[2])
    check_no_leak(s)


LLAMA2_7B = dict(num_q_heads=32, num_kv_heads=32, head_dim=128, kv_dtype_bytes=2)
LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, kv_dtype_bytes=2)


def expected_step_relays(groups, dims, costs, relaying):
    """The gate's rule written out from its definition (relay_radix.gate docstring), per layer
    in microseconds: each group saves m - 1 passes over its segment (KV bytes at
    ``reread_tbps``, 4 flops per query head, head-dim element and key at ``decode_tflops``)
    and costs m fp32 partial states (o and lse per query head) at ``hbm_tbps`` plus
    ``group_us``; the positive gains together must beat ``step_us`` (a relaying step: 0.9 of it)."""
    kv_tok = 2 * dims["num_kv_heads"] * dims["head_dim"] * dims["kv_dtype_bytes"]
    flops_tok = 4 * dims["num_q_heads"] * dims["head_dim"]
    partial = 2 * dims["num_q_heads"] * (dims["head_dim"] + 1) * 4
    gains = [(m - 1) * p * (kv_tok / (costs.reread_tbps * 1e6) + flops_tok / (costs.decode_tflops * 1e6))
             - m * partial / (costs.hbm_tbps * 1e6) - costs.group_us for m, p in groups]
    return sum(g for g in gains if g > 0) > costs.step_us * (0.9 if relaying else 1.0)


def test_gate_relays_only_steps_that_save_time():
    """With the model's dimensions known, the manager relays a shared prompt only while its
    members save more than a relay step costs (relay_radix.gate), with hysteresis; the
    groups it leaves out are counted (``groups_gated``) for the log line and /metrics."""
    from relay_radix.gate import H100_COSTS, AttentionDims, step_relays
    from relay_radix.metrics import format_stats
    from relay_radix.plan import PlanStats

    # On the H100 fit: GQA-4 8 x 1K is faster unshared (bench/results/gate-h100.md), 128 x 8K is not.
    llama3 = AttentionDims(**LLAMA3_8B)
    assert not step_relays([(8, 1024)], llama3) and step_relays([(128, 8192)], llama3)
    assert not step_relays([], llama3)

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16)
    for dims, tokens in ((LLAMA2_7B, 1024), (LLAMA3_8B, 4096)):
        s = MiniScheduler(relay_config=cfg, kv_size=65536, max_reqs=48, max_context=8192)
        s.tree.relay.dims = AttentionDims(**dims)
        prompt = words(8, tokens)
        s.prefill([s.new_req(prompt + words(100, 5))])
        relaying, decisions = False, []
        for n in range(2, 33):  # members arrive one by one ...
            s.prefill([s.new_req(prompt + words(100 + n, 5))])
            _, plan = plan_for(s)
            want = expected_step_relays([(n, tokens)], dims, H100_COSTS, relaying)
            assert plan.num_groups == int(want), (dims, n)
            assert s.tree.relay.groups_gated == int(not want)
            stats = PlanStats.of(plan, s.tree.relay.dims, 32, groups_gated=s.tree.relay.groups_gated)
            assert ("(+1 gated: faster unshared)" in format_stats(stats)) == (not want)
            decisions.append(want)
            relaying = want
        while s.running:  # ... and leave one by one
            s.finish(s.running[0])
            n = len(s.running)
            if n < 2:
                break
            _, plan = plan_for(s)
            want = expected_step_relays([(n, tokens)], dims, H100_COSTS, relaying)
            assert plan.num_groups == int(want), (dims, n)
            decisions.append(want)
            relaying = want
        # Both ways were exercised: the gate turned relay on, and off again.
        assert True in decisions and decisions[-1] is False and decisions[0] is False
        for r in list(s.running):
            s.finish(r)
        check_no_leak(s)


# ---- property test: random arrivals, finishes, aborts, retractions, evictions ------------
PROMPTS = {"A": words(11, 300), "B": words(12, 200), "F1": words(13, 120), "F2": words(14, 90)}
SHAPES = [("A",), ("A", "F1"), ("A", "F2"), ("B",), ()]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, len(SHAPES) - 1), st.integers(1, 4)),
    st.tuples(st.just("decode"), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("finish"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("retract"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("evict"), st.just(0), st.just(0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=5, max_size=25), overlap=st.booleans(), seed=st.integers(0, 10**6),
       max_groups=st.sampled_from([1, 2, 64]))
def test_random_lifecycles_keep_invariants(ops, overlap, seed, max_groups):
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, max_groups=max_groups)
    s = MiniScheduler(relay_config=cfg, overlap=overlap, kv_size=16384, max_reqs=48)
    rng = random.Random(seed)
    for kind, a, b in ops:
        if kind == "arrive" and len(s.running) + b <= 40:
            shape = SHAPES[a]
            prefix = [t for part in shape for t in PROMPTS[part]]
            s.prefill([s.new_req(prefix + words(rng.randrange(10**9), rng.randrange(1, 40)))
                       for _ in range(b)])
        elif kind == "decode" and s.running:
            for _ in range(a):
                plan_for(s)
        elif kind in ("finish", "retract") and s.running:
            victim = s.running[a % len(s.running)]
            (s.finish if kind == "finish" else s.retract)(victim)
        elif kind == "evict":
            s.evict_all_unlocked()
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_plan_structure_is_reused_only_while_the_batch_is_unchanged():
    """Steady decode steps share one plan structure (same id, new seq_lens); a finish, an
    arrival or a group change makes a new one, equal to a plan built from scratch."""
    cfg = RelayConfig(min_group_size=3, demote_group_size=2, min_prefix_tokens=64)
    s = MiniScheduler(relay_config=cfg)
    system = words(1, 400)
    s.prefill([s.new_req(system + words(10, 20))])
    s.prefill([s.new_req(system + words(11 + i, 20)) for i in range(4)])
    _, p0 = plan_for(s)  # first step: the prefilled requests move to their own leaves after it
    _, p1 = plan_for(s)
    _, p2 = plan_for(s)
    assert p1.num_groups == 1 and p2.structure_id == p1.structure_id
    assert bool((p2.seq_lens == p1.seq_lens + 1).all())  # this step's lengths, not the cached ones
    ids = {p2.structure_id}
    s.finish(s.running[0])
    _, p3 = plan_for(s)
    s.prefill([s.new_req(system + words(30, 20))])
    _, p4 = plan_for(s)
    for r in list(s.running)[:3]:
        s.finish(r)  # 2 left, still >= demote size
    _, p5 = plan_for(s)
    s.finish(s.running[0])  # 1 left: the group dissolves
    _, p6 = plan_for(s)
    assert p6.num_groups == 0
    for p in (p3, p4, p5, p6):
        assert p.structure_id not in ids
        ids.add(p.structure_id)
    # The cached structure equals a fresh build of the same batch.
    _, p7 = plan_for(s)
    assert p7.structure_id == p6.structure_id
    s.tree.relay.last_plan = None
    batch = s.decode_batch()
    fresh = build_decode_plan(s.tree.relay, batch.reqs, batch.req_pool_indices_cpu, batch.seq_lens_cpu)
    cached = p7
    for f in ("group_level", "group_start", "group_end", "member_indptr", "member_rows", "suffix_start",
              "req_pool_indices"):
        assert torch.equal(getattr(fresh, f), getattr(cached, f)), f
    assert fresh.fingerprint() != cached.fingerprint()  # one token longer: seq_lens differ
    s.after_decode(batch)
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_groups_beyond_max_groups_keep_the_largest_savings(caplog):
    """More qualifying prefixes than the kernels' static capacity (``max_groups``): the groups
    that save the most prefix reads stay, a kept nested group whose parent was left out starts
    at the root, and the cap leaves nothing pinned."""
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16, max_groups=2)
    s = MiniScheduler(relay_config=cfg)
    big, small, fewshot = words(1, 400), words(2, 100), words(3, 350)
    reqs = [s.new_req(big + words(10 + i, 8)) for i in range(3)]
    reqs += [s.new_req(small + words(20 + i, 8)) for i in range(2)]
    reqs += [s.new_req(small + fewshot + words(30 + i, 8)) for i in range(2)]
    s.prefill([reqs[0], reqs[3], reqs[5]])  # puts the three prompts in the tree
    s.prefill([reqs[1], reqs[2], reqs[4], reqs[6]])
    with caplog.at_level("WARNING", logger="relay_radix.groups"):
        plan_for(s)
        _, plan = plan_for(s)  # every request now counted under its own leaf
    # Uncapped there are three groups, saving (members - 1) x tokens prefix reads per step:
    # big 2 x 400, small 3 x 100 and, nested under small, the few-shot block 1 x 350.
    # Capped at 2: big and the few-shot group, which now covers small too (0..450, 1 x 450).
    assert group_table(plan) == {(0, 0, 400): 3, (0, 0, 450): 2}
    assert s.tree.relay.groups_over_cap == 1
    assert any("RELAY_RADIX_MAX_GROUPS=2" in r.getMessage() for r in caplog.records)
    s.finish(reqs[0])  # big keeps 2 members: still three candidates, still capped
    assert s.tree.relay.groups_over_cap == 1
    for r in list(s.running):
        s.finish(r)
    assert s.tree.relay.groups == [] and s.tree.relay.groups_over_cap == 0
    check_no_leak(s)


def test_gated_groups_are_counted_when_the_cap_bites():
    """The gate's left-out count (``groups_gated``, log line and /metrics) keeps the groups it
    skipped even when more groups qualify than ``max_groups``: the cap's second pass over the
    kept heads must not reset it. Llama-2-7B shape on the H100 costs: 3 x 10K and 3 x 4K pay
    (gains ~12.9 and ~4.6 us per layer), 2 x 1K does not (gain < 0)."""
    from relay_radix.gate import AttentionDims, group_gain_us

    dims = AttentionDims(**LLAMA2_7B)
    assert group_gain_us(3, 10000, dims) > 12 and group_gain_us(3, 4000, dims) > 0 >= group_gain_us(2, 1000, dims)
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=16, max_groups=1)
    s = MiniScheduler(relay_config=cfg, kv_size=65536, max_reqs=16, max_context=16384)
    s.tree.relay.dims = dims
    big, mid, small = words(1, 10000), words(2, 4000), words(3, 1000)
    reqs = [s.new_req(big + words(10 + i, 8)) for i in range(3)]
    reqs += [s.new_req(mid + words(20 + i, 8)) for i in range(3)]
    reqs += [s.new_req(small + words(30 + i, 8)) for i in range(2)]
    s.prefill([reqs[0], reqs[3], reqs[6]])  # the three prompts enter the tree
    s.prefill([r for i, r in enumerate(reqs) if i not in (0, 3, 6)])
    plan_for(s)
    _, plan = plan_for(s)
    assert group_table(plan) == {(0, 0, 10000): 3}
    assert s.tree.relay.groups_over_cap == 1 and s.tree.relay.groups_gated == 1
    for r in list(s.running):
        s.finish(r)
    check_no_leak(s)


def test_exactness_workload_with_many_blocks_forms_one_group_per_block():
    """The serving exactness workload ``exact_groups`` (``bench/serving/exactness.py``: a global
    prompt, then one of ``blocks`` few-shot blocks, 4 requests each) yields, with the default
    thresholds, the global group plus one nested group per block: what its GPU run compares."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "serving"))
    import exactness

    blocks, per_block = 16, 4
    prompts = exactness.make_prompts(blocks * per_block, 300, 300, 8, vocab=1000, blocks=blocks)
    s = MiniScheduler(relay_config=RelayConfig())  # defaults: groups of >= 4, >= 256 tokens
    reqs = [s.new_req(p, max_new_tokens=4) for p in prompts]
    s.prefill(reqs[:1])  # the global prompt enters the tree
    s.prefill(reqs[1:blocks])  # one request per block: every block enters the tree
    s.prefill(reqs[blocks:])
    plan_for(s)
    _, plan = plan_for(s)
    spans = sorted((int(plan.group_level[g]), int(plan.group_start[g]), int(plan.group_end[g]),
                    int(plan.member_indptr[g + 1] - plan.member_indptr[g])) for g in range(plan.num_groups))
    # group_table() keys by span, and the 16 nested groups share one: list them instead.
    assert spans == [(0, 0, 300, blocks * per_block)] + [(1, 300, 600, per_block)] * blocks
    members = [set(plan.member_rows[int(plan.member_indptr[g]):int(plan.member_indptr[g + 1])].tolist())
               for g in range(plan.num_groups) if int(plan.group_level[g]) == 1]
    assert set().union(*members) == set(range(blocks * per_block))  # each row in exactly one block
    for r in list(s.running):
        s.finish(r)
    assert s.tree.relay.groups == []
    check_no_leak(s)
