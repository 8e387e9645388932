"""Prefill over cached prompts on the extend pool pass (``relay_radix.kernels.extend_pool``).

The plan layout (NumPy), and the whole path on the CPU over real SGLang objects: requests
admitted into a real radix tree, SGLang's ``ScheduleBatch.prepare_for_extend`` and
``ForwardBatch``, the keys the scheduler hook gives, the backend's plan (with the run table
learned from ``req_to_token``), and the pass (its float32 reference implementation, the same
plan FA3 gets on the GPU) against float64 attention over each request's cached prefix; merged
with the new tokens' own part it equals SGLang's ``torch_native`` extend of the same batch.
"""

from __future__ import annotations

import math
import random
import types

import numpy as np
import pytest
import torch

from relay_radix.config import RelayConfig
from relay_radix.cpu_sim import MiniScheduler, forward_batch
from relay_radix.kernels.extend_pool import ExtendPoolPass, plan_extend_pool
from relay_radix.patches.scheduler_hooks import before_run_batch
from relay_radix.reference import attention_state, merge_states


def words(seed, n, lo=3, hi=999):
    rng = random.Random(seed)
    return [rng.randrange(lo, hi) for _ in range(n)]


# ---- the plan layout ----------------------------------------------------------------------
def test_plan_groups_runs_in_slot_order_with_gaps():
    # Requests: r0 prompt at 500 (P=64), r1 none, r2 prompt at 100 (P=32), r3 prompt at 500,
    # r4 prompt at 100. Groups go in slot order: [100, 132) then a gap to 500, then [500, 564).
    first = [500, -1, 100, 500, 100]
    plen = [64, 0, 32, 64, 32]
    elen = [3, 2, 4, 1, 5]
    pp, why = plan_extend_pool(first, plen, elen, min_pairs=1)
    assert why == "planned" and pp.groups == 2 and pp.num_tokens == 15
    starts = np.cumsum([0] + elen[:-1])
    rows = lambda i: list(range(starts[i], starts[i] + elen[i]))  # noqa: E731
    assert pp.perm.tolist() == rows(2) + rows(4) + rows(0) + rows(3)
    assert pp.qo_indptr.tolist() == [0, 9, 9, 13]  # group at 100, gap, group at 500
    assert pp.kv_indptr.tolist() == [100, 132, 500, 564]
    assert not pp.in_batch_order and pp.rows == 13  # r1's 2 tokens attend no cached prefix


def test_plan_in_batch_order_needs_no_gather():
    pp, _ = plan_extend_pool([7, 7, -1], [10, 10, 0], [2, 3, 4], min_pairs=1)
    assert pp.in_batch_order and pp.rows == 5 and pp.kv_indptr.tolist() == [7, 17]


@pytest.mark.parametrize("first,plen,elen,why", [
    ([-1, -1], [0, 0], [4, 4], "no cached prefix"),
    ([5, -1], [10, 10], [4, 4], "a cached prefix not known to be one run of KV slots"),
    ([5, 5], [10, 16], [4, 4], "cached prefixes that overlap (nested prompts)"),
    ([5, 5], [10, 10], [1, 1], "too little prefix attention"),
])
def test_plan_refuses_what_one_launch_cannot_take(first, plen, elen, why):
    pp, got = plan_extend_pool(first, plen, elen, min_pairs=21)
    assert pp is None and got == why


def test_empty_rows_get_the_empty_state():
    # A batch whose first request has no cached prefix: its tokens keep (0, -inf).
    g = torch.Generator().manual_seed(0)
    k = torch.randn(64, 2, 8, generator=g)
    v = torch.randn(64, 2, 8, generator=g)
    q = torch.randn(5, 4, 8, generator=g)
    p = ExtendPoolPass(4, 2, 8, torch.float32, "cpu", backend="torch")
    pp, _ = plan_extend_pool([-1, 20], [0, 16], [2, 3], min_pairs=1)
    p.plan(pp)
    o, lse2 = p.forward_return_lse(q, (k, v), causal=False, sm_scale=0.3)
    assert torch.all(o[:2] == 0) and torch.all(torch.isneginf(lse2[:2]))
    ref_o, ref_lse = attention_state(q[2:].double(), k[20:36].double().expand(3, -1, -1, -1),
                                     v[20:36].double().expand(3, -1, -1, -1), None, 0.3)
    assert torch.allclose(o[2:].double(), ref_o, atol=1e-5)
    assert torch.allclose(lse2[2:].double() * math.log(2), ref_lse, atol=1e-5)


# ---- the server path over real SGLang objects -----------------------------------------------
def _relay_with_torch_pass(s):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from relay_radix.cpu_sim import cpu_model_runner
    from relay_radix.plugin import create_relay_backend

    runner = cpu_model_runner(s)
    relay = create_relay_backend(runner)
    relay.attach(s.tree.relay)
    assert relay.extend_pool is None  # auto: needs a Hopper GPU and FlashInfer
    relay.extend_pool = ExtendPoolPass(s.num_q_heads, s.num_kv_heads, s.head_dim, s.dtype, "cpu", backend="torch")
    relay.extend_min_pairs = 1  # tiny batches: the plan, not its worth, is under test
    return runner, relay, TorchNativeAttnBackend(cpu_model_runner(s))


def _keys_and_plan(s, runner, relay, batch):
    sched = types.SimpleNamespace(_relay_backend=relay)
    before_run_batch(sched, batch)  # a prefill batch: the hook names each cached prefix
    keys = relay._next_extend
    fb = forward_batch(s, batch, runner)
    return keys, fb


def _prefix_reference(s, fb, q, layer_id, scale):
    """float64 attention of each token over its request's cached prefix; base-2 LSE."""
    k_buf, v_buf = s.kv_pool.get_key_buffer(layer_id), s.kv_pool.get_value_buffer(layer_id)
    o = torch.zeros(q.shape, dtype=torch.float64)
    lse2 = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    t = 0
    for r, p, n in zip(fb.req_pool_indices.tolist(), fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu):
        if p:
            slots = s.req_to_token_pool.req_to_token[r, :p].long()
            kk, vv = k_buf[slots].double(), v_buf[slots].double()
            oi, li = attention_state(q[t:t + n].double(), kk.expand(n, -1, -1, -1), vv.expand(n, -1, -1, -1), None, scale)
            o[t:t + n], lse2[t:t + n] = oi, li / math.log(2)
        t += n
    return o, lse2


def _new_token_state(fb, q, k, v, scale):
    """float64 causal attention of each request's new tokens over themselves (SGLang's ragged part)."""
    o = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[:2], dtype=torch.float64)
    t = 0
    for n in fb.extend_seq_lens_cpu:
        for j in range(n):
            kk, vv = k[t:t + j + 1].double()[None], v[t:t + j + 1].double()[None]
            oi, li = attention_state(q[t + j:t + j + 1].double(), kk, vv, None, scale)
            o[t + j], lse[t + j] = oi[0], li[0]
        t += n
    return o, lse


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_prefill_over_cached_prompts_equals_sglang_extend(hq, hkv):
    s = MiniScheduler(num_q_heads=hq, num_kv_heads=hkv, head_dim=16, relay_config=RelayConfig(min_group_size=2))
    runner, relay, native = _relay_with_torch_pass(s)
    a, b = words(1, 300, 3, 400), words(2, 200, 3, 400)  # two prompts; questions use other words
    s.prefill([s.new_req(a + words(3, 9, 500, 999)), s.new_req(b + words(4, 9, 500, 999))])
    # The first batch over the cached prompts: the pass learns their slot runs and keeps
    # SGLang's path; the second takes the pool: two groups, one request with no cached prefix.
    whys = []

    def first(batch):
        keys, fb = _keys_and_plan(s, runner, relay, batch)
        assert keys[0] == (batch.reqs[0].last_node.id, 0, 300) and keys[2] is None
        whys.append(relay.plan_extend(fb, keys)[1])
    s.prefill([s.new_req(a + words(5, 7, 500, 999)), s.new_req(b + words(6, 4, 500, 999)),
               s.new_req(words(7, 30, 500, 999))], on_batch=first)
    assert whys == ["a prompt seen for the first time (its slot runs are learned for the next batch)"]

    gen = torch.Generator().manual_seed(5)
    worst = {}

    def second(batch):
        keys, fb = _keys_and_plan(s, runner, relay, batch)
        pp, why = relay.plan_extend(fb, keys)
        assert why == "planned" and pp.groups == 2 and not pp.in_batch_order
        relay.extend_pool.plan(pp)
        native.init_forward_metadata(fb)
        n, d = sum(fb.extend_seq_lens_cpu), s.head_dim
        from sglang.srt.layers.radix_attention import RadixAttention
        for layer_id in range(s.num_layers):
            layer = RadixAttention(hq, d, d ** -0.5, hkv, layer_id=layer_id)
            q = torch.randn(n, hq, d, generator=gen)
            k = torch.randn(n, hkv, d, generator=gen)
            v = torch.randn(n, hkv, d, generator=gen)
            o2, lse2 = relay.extend_pool.forward_return_lse(
                q, (s.kv_pool.get_key_buffer(layer_id), s.kv_pool.get_value_buffer(layer_id)),
                causal=False, sm_scale=layer.scaling)
            ref_o, ref_lse2 = _prefix_reference(s, fb, q, layer_id, layer.scaling)
            assert torch.equal(torch.isneginf(lse2), torch.isneginf(ref_lse2))
            fin = ~torch.isneginf(ref_lse2)
            worst["prefix_o"] = max(worst.get("prefix_o", 0), float((o2.double() - ref_o).abs().max()))
            worst["prefix_lse"] = max(worst.get("prefix_lse", 0), float((lse2.double() - ref_lse2)[fin].abs().max()))
            # SGLang's merge of the ragged part with this prefix part, against torch_native's
            # whole extend (it also stores the new K/V, as the FlashInfer path does after it).
            o1, lse1 = _new_token_state(fb, q, k, v, layer.scaling)
            merged, _ = merge_states(torch.stack([o1, o2.double()]), torch.stack([lse1, lse2.double() * math.log(2)]))
            o_native = native.forward(q.reshape(n, hq * d), k, v, layer, fb).reshape(n, hq, d)
            worst["extend"] = max(worst.get("extend", 0), float((merged - o_native.double()).abs().max()))
    s.prefill([s.new_req(b + words(8, 5, 500, 999)), s.new_req(a + words(9, 6, 500, 999)),
               s.new_req(words(10, 12, 500, 999)), s.new_req(a + words(11, 3, 500, 999))], on_batch=second)
    assert worst["prefix_o"] < 1e-5 and worst["prefix_lse"] < 1e-5 and worst["extend"] < 1e-5, worst


def test_scattered_and_nested_prefixes_keep_sglang_path():
    s = MiniScheduler(num_q_heads=4, num_kv_heads=2, head_dim=16, relay_config=RelayConfig(min_group_size=2))
    runner, relay, _ = _relay_with_torch_pass(s)
    seen = []

    def plan(batch):
        keys, fb = _keys_and_plan(s, runner, relay, batch)
        seen.append(relay.plan_extend(fb, keys))

    # Scattered: a prompt extending a cached one, prefilled after another request took the
    # slots behind it, is cached in two runs (the first prompt's and its own extension's).
    base = words(20, 300, 3, 400)
    s.prefill([s.new_req(base + words(21, 5, 500, 999))])
    s.prefill([s.new_req(words(22, 40, 500, 999))])
    ext = base + words(23, 200, 400, 500)
    s.prefill([s.new_req(ext + words(24, 5, 500, 999))])
    for i in range(2):  # learn, then plan
        s.prefill([s.new_req(ext + words(25 + i, 6, 500, 999))], on_batch=plan)
    assert seen[0][1].startswith("a prompt seen for the first time")
    assert seen[1] == (None, "a cached prefix not known to be one run of KV slots")

    # Nested: a prompt's first half and the whole prompt, each one run, in one batch: the two
    # runs start at the same slot, which one ragged launch cannot take twice.
    seen.clear()
    other = words(30, 300, 3, 400)
    s.prefill([s.new_req(other + words(31, 5, 500, 999))])
    for i in range(2):
        s.prefill([s.new_req(other[:150] + words(40 + i, 6, 500, 999)),
                   s.new_req(other + words(50 + i, 6, 500, 999))], on_batch=plan)
    assert seen[0][1].startswith("a prompt seen for the first time")
    assert seen[1] == (None, "cached prefixes that overlap (nested prompts)")


def test_prefill_batch_counts_reach_the_decode_log_line_and_prometheus():
    """``ExtendStats`` as the backend fills it, in the decode log line SGLang's reporter emits and
    in the Prometheus counters (each observe adds the change since the last)."""
    import logging

    from prometheus_client import CollectorRegistry

    from relay_radix.extend_plan import ExtendStats
    from relay_radix.metrics import DecodeLogFilter, RelayPrometheus
    from relay_radix.plan import PlanStats

    st = ExtendStats()
    st.add(True, "planned", 4096)
    st.add(False, "cached prefixes that overlap (nested prompts)")
    rec = logging.LogRecord("x", logging.INFO, "", 0, "Decode batch, #running-req: 3", None, None)
    DecodeLogFilter(lambda: None, extend_source=lambda: st).filter(rec)
    assert rec.msg.endswith("extend pool 1/2 prefill batches (1 cached prefixes that overlap (nested prompts))")
    reg = CollectorRegistry()
    prom = RelayPrometheus({"tp_rank": "0"}, registry=reg)
    stats = PlanStats(groups=0, members=0, shared_tokens=0, kv_bytes_relay=0, kv_bytes_vanilla=0)
    prom.observe(stats, extend=st)
    st.add(True, "planned", 128)
    prom.observe(stats, extend=st)
    get = lambda n: reg.get_sample_value(n, {"tp_rank": "0"})  # noqa: E731
    assert get("sglang:relay_extend_prefix_batches_total") == 3
    assert get("sglang:relay_extend_pool_batches_total") == 2
