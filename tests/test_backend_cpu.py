"""The ``relay`` backend's decode equals SGLang's ``torch_native`` backend on the same batch.

Real objects end to end on the CPU: requests admitted into a real radix tree, a real running
``ScheduleBatch`` prepared for decode, the plan built by the scheduler hook
(``before_run_batch``), SGLang's ``ForwardBatch.init_new``, and both backends' ``forward``
over the same ``RadixAttention`` layers and KV pool. Requests finish, abort and retract
between steps; the overlap ordering (deferred ``cache_unfinished_req``) is covered too.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from relay_radix.config import RelayConfig
from relay_radix.patches.scheduler_hooks import before_run_batch
from relay_radix.cpu_sim import MiniScheduler, cpu_model_runner, forward_batch


def words(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


def make_backends(sched):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from relay_radix.plugin import create_relay_backend

    runner = cpu_model_runner(sched)
    relay = create_relay_backend(runner)
    relay.attach(sched.tree.relay)
    native = TorchNativeAttnBackend(cpu_model_runner(sched))
    return runner, relay, native


def layers(sched, logit_cap=0.0):
    from sglang.srt.layers.radix_attention import RadixAttention

    return [RadixAttention(sched.num_q_heads, sched.head_dim, sched.head_dim ** -0.5,
                           sched.num_kv_heads, layer_id=i, logit_cap=logit_cap)
            for i in range(sched.num_layers)]


def decode_and_compare(sched, runner, relay, native, attn_layers, gen, scheduler=None) -> float:
    """One decode step through both backends; returns the max relative error over layers.
    ``scheduler``: what the hook reads off SGLang's Scheduler (default: just the backend)."""
    batch = sched.decode_batch()
    scheduler = scheduler or types.SimpleNamespace(_relay_backend=relay)
    before_run_batch(scheduler, batch)
    fb = forward_batch(sched, batch, runner)
    relay.init_forward_metadata(fb)
    native.init_forward_metadata(fb)
    bs, hq, hkv, d = len(batch.reqs), sched.num_q_heads, sched.num_kv_heads, sched.head_dim
    worst = 0.0
    for layer in attn_layers:
        q = torch.randn(bs, hq * d, generator=gen)
        k = torch.randn(bs, hkv, d, generator=gen)
        v = torch.randn(bs, hkv, d, generator=gen)
        o_relay = relay.forward(q, k, v, layer, fb)
        o_native = native.forward(q, k, v, layer, fb)
        assert not torch.isnan(o_relay).any()
        err = ((o_relay - o_native).norm() / o_native.norm()).item()
        worst = max(worst, err)
    sched.after_decode(batch)
    return worst


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_relay_decode_equals_torch_native(overlap, hq, hkv):
    # The byte gate is off: on this tiny model a 150-token few-shot block saves less than a
    # group costs, and the point here is exactness with nested groups.
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, gate=False)
    s = MiniScheduler(num_q_heads=hq, num_kv_heads=hkv, head_dim=32, relay_config=cfg, overlap=overlap)
    runner, relay, native = make_backends(s)
    attn_layers = layers(s)
    gen = torch.Generator().manual_seed(0)
    system, fewshot = words(1, 400), words(2, 150)
    first = s.new_req(system + fewshot + words(3, 9))
    s.prefill([first])
    s.prefill([s.new_req(system + fewshot + words(10 + i, 7)) for i in range(3)]
              + [s.new_req(system + words(20 + i, 11)) for i in range(3)]
              + [s.new_req(words(30, 50))])
    grouped_steps = nested_steps = 0
    for step in range(6):
        err = decode_and_compare(s, runner, relay, native, attn_layers, gen)
        assert err < 1e-5, (step, err)
        grouped_steps += relay.plan.num_groups > 0
        nested_steps += relay.plan.num_groups > 1
        if step == 1:
            s.finish(s.running[2])  # a finish
            s.retract(s.running[0])  # a retraction under memory pressure
        if step == 3:
            s.finish(s.running[-1])  # an abort (same release path)
            s.prefill([s.new_req(system + words(40, 5))])  # a late arrival joins the group
    # The comparison really exercised relay groups, nested ones included (overlap mode
    # groups one step later: the first decode precedes the tree's dedup).
    assert grouped_steps >= 5 - overlap and nested_steps >= 3
    assert relay.last_stats.kv_bytes_relay < relay.last_stats.kv_bytes_vanilla
    for r in list(s.running):
        s.finish(r)
    assert s.tree.protected_size() == 0


def test_no_groups_then_one_group():
    # (logit capping is checked against the float64 oracle in test_reference: SGLang's
    # torch_native backend ignores layer.logit_cap, so it cannot be the reference there.)
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, gate=False)
    s = MiniScheduler(num_q_heads=4, num_kv_heads=1, head_dim=32, relay_config=cfg)
    runner, relay, native = make_backends(s)
    gen = torch.Generator().manual_seed(1)
    s.prefill([s.new_req(words(50 + i, 60)) for i in range(3)])  # nothing shared
    err = decode_and_compare(s, runner, relay, native, layers(s), gen)
    assert relay.plan.num_groups == 0 and err < 1e-5
    s.prefill([s.new_req(words(60, 200) + words(70 + i, 5)) for i in range(3)])
    err = decode_and_compare(s, runner, relay, native, layers(s), gen)
    assert relay.plan.num_groups == 1 and err < 1e-5


def test_plan_for_another_batch_is_refused():
    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32)
    s = MiniScheduler(relay_config=cfg)
    runner, relay, _ = make_backends(s)
    s.prefill([s.new_req(words(80, 100) + [i + 5]) for i in range(3)])
    batch = s.decode_batch()
    before_run_batch(types.SimpleNamespace(_relay_backend=relay), batch)
    s.finish(s.running[0])  # the batch changes after planning
    s.after_decode(batch)
    batch2 = s.decode_batch()
    fb = forward_batch(s, batch2, runner)
    with pytest.raises(RuntimeError, match="does not match the batch"):
        relay.init_forward_metadata(fb)


class ReferenceSuffixDecode:
    """CPU stand-in for ``relay_radix.suffix_decode.FlashInferSuffixDecode`` (FlashInfer needs
    CUDA): the same plan/run contract, each row's suffix state computed by the float64-checked
    reference (``o`` in q's dtype, LSE in base 2 as FlashInfer returns it)."""

    def __init__(self, backend):
        self.backend = backend

    def plan(self, fb, suffix_start_cpu, suffix_lens_cpu, *, graph):
        from relay_radix.kv_slots import gather_ranges

        bs = int(suffix_lens_cpu.numel())
        self.idx = gather_ranges(self.backend.req_to_token, fb.req_pool_indices[:bs], suffix_start_cpu,
                                 suffix_lens_cpu)
        self.indptr = torch.zeros(bs + 1, dtype=torch.int64)
        self.indptr[1:] = torch.cumsum(suffix_lens_cpu.to(torch.int64), 0)

    def run(self, q, layer, out, lse2):
        import math

        from relay_radix.reference import relay_decode_attention

        pool = self.backend.token_to_kv_pool
        empty = torch.zeros(1, dtype=torch.int64)
        o, lse = relay_decode_attention(
            q, pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id),
            prefix_kv_indptr=empty, prefix_kv_indices=self.idx[:0], member_indptr=empty,
            member_rows=empty[:0], suffix_kv_indptr=self.indptr, suffix_kv_indices=self.idx,
            sm_scale=layer.scaling)
        out.copy_(o)
        lse2.copy_(lse / math.log(2.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; the GPU runs the real kernels")
@pytest.mark.parametrize("reuse,tile", [(False, "64x64x4x3"), (True, "64x64x4x3"), (True, "128x128x8x2")])
def test_plan_reuse_with_the_triton_kernel_and_external_suffix(reuse, tile):
    """The server's CUDA path on the CPU: Triton relay kernel (interpreter) merging prefix parts
    onto an external suffix state. With RELAY_RADIX_PLAN_REUSE a step whose groups, members and
    source rows are unchanged skips the gather and the work-list build; outputs must still
    equal torch_native every step, through finishes, arrivals and group changes."""
    from relay_radix.kernels.triton_relay import TritonRelayDecode

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, gate=False,
                      plan_reuse=reuse, prefix_tile=tile)
    s = MiniScheduler(num_q_heads=4, num_kv_heads=2, head_dim=32, relay_config=cfg)
    runner, relay, native = make_backends(s)
    relay.config = cfg
    relay.suffix = ReferenceSuffixDecode(relay)
    kernel = relay._make_kernel(16)  # the server's construction: external suffix, RELAY_RADIX_PREFIX_TILE
    assert isinstance(kernel, TritonRelayDecode) and kernel.external_suffix
    assert (kernel.prefix_block_m, kernel.block_n) == tuple(int(x) for x in tile.split("x")[:2])
    relay._kernel_for = lambda bs, **_: kernel
    attn_layers = layers(s)[:2]
    gen = torch.Generator().manual_seed(3)
    system, fewshot = words(1, 300), words(2, 100)
    s.prefill([s.new_req(system + fewshot + words(3, 9))])
    s.prefill([s.new_req(system + fewshot + words(10 + i, 7)) for i in range(2)]
              + [s.new_req(system + words(20 + i, 11)) for i in range(2)])
    groups_seen = set()
    for step in range(8):
        err = decode_and_compare(s, runner, relay, native, attn_layers, gen)
        assert err < 1e-4, (step, err)
        groups_seen.add(relay.plan.num_groups)
        if step == 2:
            s.finish(s.running[-1])  # membership changes: the next step must re-plan
        if step == 3:
            s.prefill([s.new_req(system + fewshot + words(40, 5))])  # an arrival joins both groups
        if step == 5:
            # Same batch size, other members: a few-shot member leaves as a request with the
            # system prompt only arrives (a stale prefix plan would give it the few-shot block).
            s.finish(next(r for r in s.running if list(r.origin_input_ids[300:400]) == fewshot))
            s.prefill([s.new_req(system + words(50, 13))])
    assert max(groups_seen) >= 2  # nested groups were relayed
    if reuse:
        # Steps 1-2 repeat step 0's groups; steps 4, 5 and 6 differ (a finish, an arrival,
        # a swap at the same batch size), step 7 repeats step 6.
        assert relay.plans_reused >= 3
    else:
        assert relay.plans_reused == 0
    for r in list(s.running):
        s.finish(r)


def metered_backends(cfg):
    """A MiniScheduler, both backends, and what the scheduler hook reads: the relay backend and
    Prometheus metrics in a private registry. Returns (sched, runner, relay, native, registry,
    scheduler)."""
    from prometheus_client import CollectorRegistry

    from relay_radix.metrics import RelayPrometheus

    s = MiniScheduler(relay_config=cfg)
    runner, relay, native = make_backends(s)
    relay.config = cfg
    registry = CollectorRegistry()
    prom = RelayPrometheus({"tp_rank": "0"}, registry=registry)
    return s, runner, relay, native, registry, types.SimpleNamespace(_relay_backend=relay, _relay_prometheus=prom)


def test_decode_log_line_and_prometheus_after_real_steps():
    """Observability after real decode steps: the decode log line gets the plan's figures and
    relay's host time per step; the Prometheus metrics (a private registry) count the same."""
    import logging

    from relay_radix.metrics import DecodeLogFilter

    cfg = RelayConfig(min_group_size=3, min_prefix_tokens=64, gate=False)
    s, runner, relay, native, registry, scheduler = metered_backends(cfg)
    system = words(1, 300)
    s.prefill([s.new_req(system + words(2, 10))])
    s.prefill([s.new_req(system + words(3 + i, 10)) for i in range(3)] + [s.new_req(words(9, 40))])
    gen = torch.Generator().manual_seed(0)
    log_filter = DecodeLogFilter(lambda: relay.last_stats, host=relay.host, slot_breaks=relay.slot_breaks)
    for _ in range(3):
        assert decode_and_compare(s, runner, relay, native, layers(s), gen, scheduler) < 1e-5

    record = logging.LogRecord("x", logging.INFO, __file__, 0, "Decode batch, #running-req: 5", None, None)
    assert log_filter.filter(record)
    line = record.getMessage()
    assert "relay: groups 1, members 4, shared 300 tok" in line, line
    host_ms = float(line.split("host ")[1].split(" ms/step")[0])
    assert host_ms > 0 and "plan reuse 0%" in line  # the CPU path gathers every step
    # SGLang's allocator handed the prompt prefilled in one piece consecutive slots: no break.
    assert "prefix slot breaks 0" in line, line
    again = logging.LogRecord("x", logging.INFO, __file__, 0, "Decode batch, #running-req: 5", None, None)
    log_filter.filter(again)
    assert "host: no decode step" in again.getMessage()  # a reader sees each step once

    def value(name, **labels):
        return registry.get_sample_value(name, {"tp_rank": "0", **labels})

    assert (value("sglang:relay_groups"), value("sglang:relay_members")) == (1.0, 4.0)
    assert value("sglang:relay_shared_tokens") == 300.0
    assert value("sglang:relay_prefix_slot_breaks") == 0.0
    read, vanilla = value("sglang:relay_kv_bytes_read_total"), value("sglang:relay_kv_bytes_vanilla_total")
    assert 0 < read < vanilla
    # Each hook adds the backend steps finished before it: steps 1 and 2 by the end of step 3.
    assert value("sglang:relay_decode_steps_total") == 2.0
    assert value("sglang:relay_plans_reused_total") == 0.0
    assert value("sglang:relay_host_seconds_total", part="hook") > 0
    assert value("sglang:relay_host_seconds_total", part="metadata") > 0
    for r in list(s.running):
        s.finish(r)


def test_log_line_and_metrics_say_when_relay_is_partly_off():
    """Groups left out for RELAY_RADIX_MAX_GROUPS and decode steps that reached the backend with
    no scheduler plan show in the decode log line and /metrics (and only when they happen);
    both steps still equal torch_native."""
    import logging

    from relay_radix.metrics import DecodeLogFilter

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=64, gate=False, max_groups=1)
    s, runner, relay, native, registry, scheduler = metered_backends(cfg)
    a, b = words(1, 300), words(2, 200)  # a: 3 members (saves 2 x 300), b: 2 members (1 x 200)
    s.prefill([s.new_req(a + words(3, 10)), s.new_req(b + words(4, 10))])
    s.prefill([s.new_req(a + words(5 + i, 10)) for i in range(2)] + [s.new_req(b + words(8, 10))])
    gen = torch.Generator().manual_seed(0)
    log_filter = DecodeLogFilter(lambda: relay.last_stats, unplanned_source=lambda: relay.plans_without_scheduler)

    def line():
        record = logging.LogRecord("x", logging.INFO, __file__, 0, "Decode batch, #running-req: 5", None, None)
        log_filter.filter(record)
        return record.getMessage()

    def value(name):
        return registry.get_sample_value(name, {"tp_rank": "0"})

    for _ in range(2):
        assert decode_and_compare(s, runner, relay, native, layers(s), gen, scheduler) < 1e-5
    assert "relay: groups 1 (+1 over RELAY_RADIX_MAX_GROUPS), members 3, shared 300 tok" in line()
    assert "without a relay plan" not in line()
    assert (value("sglang:relay_groups_over_cap"), value("sglang:relay_steps_without_plan")) == (1.0, 0.0)

    # A step whose plan never arrived (no scheduler hook) runs with no groups and is counted.
    batch = s.decode_batch()
    fb = forward_batch(s, batch, runner)
    relay.init_forward_metadata(fb)
    native.init_forward_metadata(fb)
    assert relay.plan.num_groups == 0
    for layer in layers(s):
        q, k, v = (torch.randn(len(batch.reqs), *shape, generator=gen) for shape in (
            (s.num_q_heads * s.head_dim,), (s.num_kv_heads, s.head_dim), (s.num_kv_heads, s.head_dim)))
        o_relay, o_native = relay.forward(q, k, v, layer, fb), native.forward(q, k, v, layer, fb)
        assert ((o_relay - o_native).norm() / o_native.norm()).item() < 1e-5
    s.after_decode(batch)
    assert "decode steps without a relay plan 1" in line()
    assert decode_and_compare(s, runner, relay, native, layers(s), gen, scheduler) < 1e-5
    assert value("sglang:relay_steps_without_plan") == 1.0
    for r in list(s.running):
        s.finish(r)


def test_slot_break_counter_counts_breaks_inside_groups_only():
    """Breaks in consecutive-slot runs (what sends a prefix chunk from the TMA loop to the gather
    loop): a jump inside a group counts, a group boundary does not."""
    from relay_radix.kv_slots import SlotBreakCounter

    c = SlotBreakCounter()
    assert c.poll() is None
    groups = [list(range(100, 105)), list(range(10, 13)) + list(range(20, 22)), [7], [8, 9, 3]]
    idx = torch.tensor([t for g in groups for t in g], dtype=torch.int32)
    c.count(idx, torch.tensor([len(g) for g in groups]))
    assert c.poll() == 2  # 12 -> 20 and 9 -> 3; 104 -> 10, 21 -> 7 and 7 -> 8 are boundaries
    c.count(torch.arange(5, 50, dtype=torch.int32), torch.tensor([45]))
    assert c.poll() == 0
    c.count(torch.empty(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64))
    assert c.poll() == 0


def test_sorted_free_slots_give_a_late_prompt_consecutive_slots():
    """SGLang's own token allocator: once its untouched range is spent, a new prompt gets the
    slots freed last, in free order (scattered); with ``keep_free_slots_sorted`` (SGLang's
    ``need_sort``) it gets the lowest free slots in order, so its prefix is one run again."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from relay_radix.kv_slots import SlotBreakCounter, keep_free_slots_sorted

    breaks = {}
    for sort in (False, True):
        alloc = TokenToKVPoolAllocator(size=64, dtype=torch.float16, device="cpu", kvcache=None, need_sort=False)
        if sort:
            assert keep_free_slots_sorted(alloc)
        used = alloc.alloc(64)  # the never-used range is spent
        # Decode tokens of two requests were interleaved; they finish one after the other.
        alloc.free(used[1::2])
        alloc.free(used[0::2])
        prompt = alloc.alloc(24)
        assert prompt is not None and prompt.unique().numel() == 24
        c = SlotBreakCounter()
        c.count(prompt.to(torch.int32), torch.tensor([24]))
        breaks[sort] = c.poll()
    assert breaks == {False: 23, True: 0}, breaks
