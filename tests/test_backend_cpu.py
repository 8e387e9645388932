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
        self.captured_sizes = set()  # batch sizes whose "graph wrappers" prepare_capture made
        self.prepared = 0

    def prepare_capture(self, fb):
        self.captured_sizes.add(fb.batch_size)
        self.prepared += 1

    def graph_batch_sizes(self):
        return self.captured_sizes

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
        if lse2 is not None:
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


def _external_suffix_backends(cfg, **sched_kw):
    """MiniScheduler + backends with the server's CUDA structure on the CPU: the Triton relay
    kernel (interpreter) merging onto an external suffix state (``ReferenceSuffixDecode``)."""
    s = MiniScheduler(relay_config=cfg, **sched_kw)
    runner, relay, native = make_backends(s)
    relay.config = cfg
    relay.suffix = ReferenceSuffixDecode(relay)
    kernel = relay._make_kernel(16)
    relay._kernel_for = lambda bs, **_: kernel
    return s, runner, relay, native


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; the GPU runs the real kernels")
def test_plain_steps_and_the_graph_variant_they_replay():
    """Steps with no relay group decode plainly (the suffix decode over whole sequences writes
    the output; no relay launch), eagerly and, when plain graphs were captured, at replay, where
    SGLang's decode runner asks ``_resolve_lora_variant`` (relay's hook) which graph to replay.
    Outputs equal torch_native on every path; steps with groups keep the relay graph."""
    from relay_radix.patches.cuda_graph import PLAIN_GRAPH, RELAY_GRAPH, around_resolve_lora_variant

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, gate=False)
    s, runner, relay, native = _external_suffix_backends(cfg, num_q_heads=4, num_kv_heads=2, head_dim=32)
    attn_layers = layers(s)[:2]
    gen = torch.Generator().manual_seed(5)
    graph_runner = types.SimpleNamespace(_relay_plain_backend=relay)
    sglang_labels = lambda _runner, _fb: "sglang's own"  # noqa: E731  (the wrapped original)

    def step(mode):
        batch = s.decode_batch()
        before_run_batch(types.SimpleNamespace(_relay_backend=relay), batch)
        fb = forward_batch(s, batch, runner)
        if mode == "eager":
            relay.init_forward_metadata(fb)
        else:  # what DecodeCudaGraphRunner.load_batch calls before it picks the graph
            relay.init_forward_metadata_out_graph(fb)
        native.init_forward_metadata(fb)
        label = around_resolve_lora_variant(sglang_labels, graph_runner, fb)
        bs, hq, hkv, d = len(batch.reqs), s.num_q_heads, s.num_kv_heads, s.head_dim
        for layer in attn_layers:
            q, k, v = (torch.randn(bs, hq * d, generator=gen), torch.randn(bs, hkv, d, generator=gen),
                       torch.randn(bs, hkv, d, generator=gen))
            o_relay, o_native = relay.forward(q, k, v, layer, fb), native.forward(q, k, v, layer, fb)
            assert ((o_relay - o_native).norm() / o_native.norm()).item() < 1e-4, (mode, relay.plan.num_groups)
        s.after_decode(batch)
        return relay.plan.num_groups, relay.step_is_plain, label

    s.prefill([s.new_req(words(90 + i, 120)) for i in range(3)])  # nothing shared
    assert step("eager")[:2] == (0, True) and relay.plain_steps == 1  # eager: no graph to choose
    assert step("replay") == (0, False, RELAY_GRAPH)  # no plain graphs captured: the relay graph
    relay.plain_graphs = True
    assert step("replay") == (0, True, PLAIN_GRAPH) and relay.plain_steps == 2
    s.prefill([s.new_req(words(95, 300) + words(96 + i, 6)) for i in range(3)])  # a shared prompt
    assert step("replay") == (1, False, RELAY_GRAPH)
    assert step("eager")[:2] == (1, False) and relay.plain_steps == 2
    # Without the hook's backend the runner keeps SGLang's own choice.
    assert around_resolve_lora_variant(sglang_labels, types.SimpleNamespace(), None) == "sglang's own"
    for r in list(s.running):
        s.finish(r)


def test_capture_records_the_variant_sglang_is_capturing():
    """At capture the backend reads the label SGLang's decode runner publishes
    (``get_capture_lora_variant``): the plain variant records the plain path and reuses the graph
    wrappers its batch size's relay capture made; the relay variant records the relay path."""
    from sglang.srt.model_executor.runner_utils.capture_mode import _set_capture_lora_variant

    from relay_radix.patches.cuda_graph import PLAIN_GRAPH, RELAY_GRAPH, capturing_plain_graph

    cfg = RelayConfig(min_group_size=2, demote_group_size=2, min_prefix_tokens=32, gate=False)
    s, runner, relay, _ = _external_suffix_backends(cfg)
    s.prefill([s.new_req(words(100 + i, 40)) for i in range(2)])
    fb = forward_batch(s, s.decode_batch(), runner)
    try:
        for label, plain, prepared in [(RELAY_GRAPH, False, 1), (PLAIN_GRAPH, True, 1), (RELAY_GRAPH, False, 2)]:
            _set_capture_lora_variant(label)
            assert capturing_plain_graph() == plain
            relay.set_next_plan(None)  # capture runs on a dummy batch, with no scheduler plan
            relay.init_forward_metadata_out_graph(fb, in_capture=True)
            assert relay.step_is_plain == plain and relay.suffix.prepared == prepared, label
    finally:
        _set_capture_lora_variant(None)
    assert relay.plain_steps == 0 and relay.plans_without_scheduler == 0  # capture is not counted
    for r in list(s.running):
        s.finish(r)


def test_sglang_decode_runner_still_has_the_two_graph_seam():
    """The plain-graph hooks rely on three facts of SGLang 0.5.16's ``DecodeCudaGraphRunner``:
    ``_capture_one_stream`` captures the ``lora``/``nolora`` pair when ``record_nolora_graph`` is
    set and publishes the label; graphs are keyed by ``_resolve_lora_variant``; and ``load_batch``
    asks for the label only after the backend's ``init_forward_metadata_out_graph`` planned the step."""
    import inspect

    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    from relay_radix.patches.cuda_graph import PLAIN_GRAPH, RELAY_GRAPH

    capture = inspect.getsource(DecodeCudaGraphRunner._capture_one_stream)
    assert "record_nolora_graph" in capture and "_set_capture_lora_variant(variant_label)" in capture
    assert f'[("{RELAY_GRAPH}", True), ("{PLAIN_GRAPH}", False)]' in capture
    load = inspect.getsource(DecodeCudaGraphRunner.load_batch)
    planned = load.index("attn_backend.init_forward_metadata_out_graph(fb_view)")
    assert load.index("self._resolve_lora_variant(forward_batch)", planned) > planned
    assert "variant_label=self._resolve_lora_variant(forward_batch)" in inspect.getsource(
        DecodeCudaGraphRunner.can_run_graph)


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
    return s, runner, relay, native, registry, types.SimpleNamespace(_relay_backend=relay, _relay_prometheus=prom,
                                                                     tree_cache=s.tree)


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
    log_filter = DecodeLogFilter(lambda: relay.last_stats, host=relay.host, slot_breaks=relay.slot_runs)
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
    assert "pool pass" not in line  # the pool prefix pass is off (a CUDA kernel): no figure
    # The run table learned the group's segment as one run, at the slots its members hold.
    plan = relay.plan
    (key,) = plan.segment_keys()
    src, start, end = int(plan.group_src_pool_idx[0]), int(plan.group_start[0]), int(plan.group_end[0])
    slots = runner.req_to_token_pool.req_to_token[src, start:end]
    assert torch.equal(slots, slots[0] + torch.arange(end - start, dtype=slots.dtype))
    assert relay.slot_runs.run_starts([key]).tolist() == [int(slots[0])]
    pooled = DecodeLogFilter(lambda: relay.last_stats, pool_source=lambda: 2)
    rec = logging.LogRecord("x", logging.INFO, __file__, 0, "Decode batch, #running-req: 5", None, None)
    pooled.filter(rec)
    assert rec.getMessage().endswith("pool pass 2 groups")
    again = logging.LogRecord("x", logging.INFO, __file__, 0, "Decode batch, #running-req: 5", None, None)
    log_filter.filter(again)
    assert "host: no decode step" in again.getMessage()  # a reader sees each step once

    def value(name, **labels):
        return registry.get_sample_value(name, {"tp_rank": "0", **labels})

    assert (value("sglang:relay_groups"), value("sglang:relay_members")) == (1.0, 4.0)
    assert value("sglang:relay_shared_tokens") == 300.0
    assert value("sglang:relay_prefix_slot_breaks") == 0.0
    assert value("sglang:relay_window_evicted_tokens") == 0.0  # the pool never filled
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


def test_gather_ranges_concatenates_token_ranges():
    """Slot lists of a plan's token ranges, against slicing ``req_to_token`` row by row: ranges of
    any length (0 included), repeated rows, int32 or int64 inputs."""
    from relay_radix.kv_slots import gather_ranges, to_device_async

    gen = torch.Generator().manual_seed(3)
    req_to_token = torch.randint(0, 1 << 20, (6, 300), generator=gen, dtype=torch.int32)
    rows, starts, lens = [4, 0, 4, 2, 5], [10, 0, 250, 7, 299], [120, 0, 50, 1, 1]
    expected = torch.cat([req_to_token[r, s : s + n] for r, s, n in zip(rows, starts, lens)])
    for dtype in (torch.int32, torch.int64):
        got = gather_ranges(req_to_token, torch.tensor(rows, dtype=dtype), torch.tensor(starts, dtype=dtype),
                            torch.tensor(lens))
        assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert gather_ranges(req_to_token, torch.tensor([1]), torch.tensor([3]), torch.tensor([0])).numel() == 0
    t = torch.tensor([1, 2], dtype=torch.int32)
    assert to_device_async(t, torch.device("cpu")).dtype == torch.int64


def test_slot_break_counter_counts_breaks_inside_groups_only():
    """Breaks in consecutive-slot runs (what sends a prefix chunk from the TMA loop to the gather
    loop): a jump inside a group counts, a group boundary does not."""
    from relay_radix.kv_slots import PrefixSlotRuns

    c = PrefixSlotRuns()
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

    from relay_radix.kv_slots import PrefixSlotRuns, keep_free_slots_sorted

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
        c = PrefixSlotRuns()
        c.count(prompt.to(torch.int32), torch.tensor([24]))
        breaks[sort] = c.poll()
    assert breaks == {False: 23, True: 0}, breaks


def test_large_allocations_take_the_first_consecutive_run():
    """``prefer_consecutive_slots`` on SGLang's own allocator: a long prompt prefilled into a
    fragmented pool (holes between cached prompts, the never-used range spent) gets the first
    run of consecutive free slots that holds it, instead of the lowest holes; with no such run,
    the free slots with the fewest breaks; small allocations (decode steps) take SGLang's path. Allocations stay distinct and free, and the free list keeps exactly the rest."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from relay_radix.kv_slots import fewest_breaks_window, keep_free_slots_sorted, prefer_consecutive_slots

    size = 8 + 12 * 8 + 40

    def fragmented(prefer: bool):
        a = TokenToKVPoolAllocator(size=size, dtype=torch.float16, device="cpu", kvcache=None, need_sort=False)
        assert keep_free_slots_sorted(a)
        if prefer:
            assert prefer_consecutive_slots(a, 16)
        cached = a.alloc(8)
        runs = [a.alloc(8) for _ in range(12)]  # slots 9..104, runs of 8
        recent = a.alloc(40)  # the never-used range is spent
        freed = [0, 2, 4, 8, 9, 10]  # holes of 8 low in the pool, one hole of 24 (slots 73..96)
        for i in freed:
            a.free(runs[i])
        busy = {int(x) for t in [cached, recent] + [r for i, r in enumerate(runs) if i not in freed] for x in t}
        return a, busy

    for prefer in (False, True):
        a, busy = fragmented(prefer)
        slots = a.alloc(24).tolist()
        assert len(set(slots)) == 24 and not set(slots) & busy
        if prefer:
            assert slots == list(range(73, 97))  # the first run that holds 24 slots
        else:
            assert slots == list(range(9, 17)) + list(range(25, 33)) + list(range(41, 49))  # the lowest holes
        a.merge_and_sort_free()
        free = a.free_pages.tolist()
        assert free == sorted(set(range(1, size + 1)) - busy - set(slots))
        assert a.alloc(4).tolist() == free[:4]  # a decode step: SGLang's lowest free slots

    a, busy = fragmented(True)
    a.alloc(24)  # takes the 24-slot run: only holes of 8 are left
    rest = sorted(set(range(1, size + 1)) - busy - set(range(73, 97)))
    assert a.alloc(16).tolist() == rest[:16]  # no run holds 16: one break at best, the lowest such
    assert a.alloc(16) is None  # 8 slots left
    f = torch.tensor([1, 2, 4, 5, 6, 9])
    assert [int(fewest_breaks_window(f, n)) for n in (1, 2, 3, 4, 6)] == [0, 0, 2, 0, 0]
    # No run of 16: the window with one break (two runs of 8), not the lowest slots (five breaks).
    f = torch.tensor([1, 3, 5, 7] + list(range(20, 28)) + list(range(40, 48)))
    assert int(fewest_breaks_window(f, 16)) == 4


def _full_pool(evict_for_runs: int, size: int = 3584, min_run: int = 64, lookahead=None):
    """SGLang's allocator (sorted, ``prefer_consecutive_slots``) under a ``RelayRadixCache``,
    filled as a serving benchmark leaves it: cohorts of requests whose prompts were prefilled in
    one allocation and whose decode steps took one slot per request per step, every finished
    request cached in the tree. Returns ``(tree, allocator, cohort)``; ``cohort(r, p, d)`` runs
    one more cohort through SGLang's own ``alloc_token_slots`` (which evicts when the pool is
    full) and caches it."""
    from array import array

    from sglang.srt.mem_cache.allocation import alloc_token_slots
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from relay_radix.kv_slots import keep_free_slots_sorted, prefer_consecutive_slots
    from relay_radix.radix_cache import RelayRadixCache

    alloc = TokenToKVPoolAllocator(size=size, dtype=torch.float16, device="cpu", kvcache=None, need_sort=False)
    tree = RelayRadixCache(
        CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(size=8, max_context_len=64, device="cpu",
                                                                         enable_memory_saver=False),
                        token_to_kv_pool_allocator=alloc, page_size=1),
        config=RelayConfig(evict_for_runs=evict_for_runs))
    # As relay_radix.patches.scheduler_hooks.after_scheduler_init installs them.
    assert keep_free_slots_sorted(alloc) and prefer_consecutive_slots(alloc, min_run, make_room=tree.make_room_for_run,
                                                                      lookahead=lookahead)
    serial = iter(range(1, 10**9))

    def cohort(r: int, p: int, d: int):
        prompts = alloc_token_slots(tree, r * p).view(r, p)
        steps = [alloc_token_slots(tree, r) for _ in range(d)]  # a decode step: one slot per request
        values = torch.cat([prompts, torch.stack(steps, 1)], 1) if d else prompts
        for v in values:
            key = RadixKey(array("q", [next(serial) for _ in range(v.numel())]))
            tree.insert(InsertParams(key=key, value=v.to(torch.int64)))
        return values

    return tree, alloc, cohort


def _breaks(slots: torch.Tensor) -> int:
    s = slots.sort().values
    return int((s[1:] != s[:-1] + 1).sum())


def test_a_long_prompt_into_a_full_pool_evicts_an_old_cohort_for_one_run():
    """``RELAY_RADIX_EVICT_FOR_RUNS`` over SGLang's real allocator and eviction: a pool full of
    cached requests (cohort A, then B, which already evicted part of A) takes a long prompt.
    SGLang's minimal eviction frees the least recently used leaves, A's, whose slots interleave
    (one per request per decode step): the prompt lands in many runs. Evicting more of A, in
    rounds, frees a whole range: one run. The extra eviction stays within its bound, and every
    slot is either free, cached in the tree or the prompt's."""
    from sglang.srt.mem_cache.allocation import alloc_token_slots

    need, size = 768, 3584
    got = {}
    for factor in (0, 4):
        tree, alloc, cohort = _full_pool(factor, size)
        cohort(32, 16, 48)  # A: 2048 slots
        cohort(32, 32, 32)  # B: 2048 slots, evicts ~512 of A
        evicted_before = tree.window_evicted_tokens
        prompt = alloc_token_slots(tree, need)
        assert prompt.unique().numel() == need
        assert alloc.available_size() + tree.total_size() + need == size
        got[factor] = (_breaks(prompt), tree.window_evicted_tokens - evicted_before)
    (off_breaks, off_extra), (on_breaks, on_extra) = got[0], got[4]
    assert off_extra == 0 and off_breaks > 20, got  # 48 here
    assert on_breaks == 0 and 0 < on_extra <= 4 * need, got

    # A pool with room (at least (F + 1) x need free slots) is left alone: its free slots are in
    # long runs, and evicting would only churn the cache.
    tree, alloc, cohort = _full_pool(4, size)
    cohort(32, 16, 48)  # A only: 1536 free slots, one run
    prompt = alloc_token_slots(tree, 256)
    assert tree.window_evicted_tokens == 0 and _breaks(prompt) == 0


def test_a_chunked_long_prompt_is_laid_in_one_run():
    """A prompt longer than ``--chunked-prefill-size`` is allocated chunk by chunk, into a pool
    full of cached requests. With the scheduler's remainder (``lookahead``, what
    ``chunked_prefill_remainder`` reads from SGLang's ``chunked_req``) the first chunk's window
    is sized for the whole prompt and the second chunk continues it: one run, no seam. Without
    it, each chunk gets a run of its own and the prompt has a break at the seam, which costs the
    prefix launch about what hundreds of breaks do. SGLang's real allocator and eviction."""
    from sglang.srt.mem_cache.allocation import alloc_token_slots

    need, size = 768, 3584
    got = {}
    for use_lookahead in (False, True):
        ahead = [0]
        tree, alloc, cohort = _full_pool(4, size, lookahead=(lambda: ahead[0]) if use_lookahead else None)
        cohort(32, 16, 48)  # A: prompts in runs, decode slots interleaved
        cohort(32, 32, 32)  # B: fills the pool (evicts part of A)
        assert alloc.available_size() == 0
        ahead[0] = need  # the scheduler cut the prompt: one more chunk of ``need`` follows
        first = alloc_token_slots(tree, need)
        ahead[0] = 0  # the last chunk: nothing follows
        second = alloc_token_slots(tree, need)
        assert alloc.available_size() + tree.total_size() + 2 * need == size
        got[use_lookahead] = (_breaks(first), _breaks(second), _breaks(torch.cat([first, second])),
                              int(second[0]) - int(first[-1]), tree.window_evicted_tokens)
    assert got[False][:2] == (0, 0) and got[False][2] >= 1, got  # two runs, a break at the seam
    assert got[True][:4] == (0, 0, 0, 1), got  # one run: the second chunk starts where the first ended
    assert 0 < got[True][4] <= 4 * 2 * need, got  # the eviction for a window of the whole prompt


def test_a_new_prompt_never_takes_a_break_to_continue_an_old_chunk():
    """``continue_at`` left by a chunked prompt whose last chunk went through SGLang's path (too
    small for the window search) must not pull the next, unrelated prompt into a window with a
    break: the continuation wins only among the windows with the fewest breaks (session 18: a
    GQA-4 8K prompt got 1 break that way after the exactness run)."""
    from relay_radix.kv_slots import fewest_breaks_window

    # Free slots: 10..13 (a hole, then) 20..29 (one run) 40..49 (one run).
    free = torch.cat([torch.arange(10, 14), torch.arange(20, 30), torch.arange(40, 50)])
    stale = torch.tensor(12)  # an old chunk ended at slot 11: the window from 12 has a break
    assert int(fewest_breaks_window(free, 5, stale)) == 4  # slots 20..24, no break
    # The real next chunk: its continuation has no break and wins over an earlier run.
    assert int(fewest_breaks_window(free, 5, torch.tensor(40))) == 14
    assert int(fewest_breaks_window(free, 5)) == 4  # without a continuation: the first run


def test_chunked_prefill_remainder_reads_sglang_chunked_request():
    """``chunked_prefill_remainder`` over SGLang's own ``Req``: the tokens after the chunk the
    scheduler cut (``extend_range.end``), 0 with no chunked request; and SGLang's scheduler still
    sets ``chunked_req`` before the batch allocates its slots (the order the remainder relies on)."""
    import inspect

    from sglang.srt.managers.scheduler import Scheduler

    from relay_radix.patches.scheduler_hooks import chunked_prefill_remainder

    sched = MiniScheduler()
    req = sched.new_req(list(range(3, 3 + 1000)))
    req.init_next_round_input(sched.tree)
    req.set_extend_range(0, 384)  # PrefillAdder's cut: the first 384 tokens now
    assert chunked_prefill_remainder(types.SimpleNamespace(chunked_req=req)) == 1000 - 384
    req.set_extend_range(384, 1000)  # the last chunk
    assert chunked_prefill_remainder(types.SimpleNamespace(chunked_req=req)) == 0
    assert chunked_prefill_remainder(types.SimpleNamespace(chunked_req=None)) == 0
    src = inspect.getsource(Scheduler._get_new_batch_prefill_raw)
    assert src.index("self.chunked_req = adder.new_chunked_req") < src.index("new_batch.prepare_for_extend()")


def test_window_eviction_stops_when_live_requests_fragment_the_pool():
    """When the scattered slots belong to live requests (never evictable), evicting more cannot
    make a run: the window eviction stops after one round that did not lower the breaks, so a
    busy server does not drain its cache for nothing."""
    from array import array

    from sglang.srt.mem_cache.allocation import alloc_token_slots
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    need, size = 256, 2048
    tree, alloc, _ = _full_pool(4, size)
    # Every decode step took a slot for a cached request and one for a live request: the pool is
    # full, and the cached half is every other slot.
    steps = torch.stack([alloc_token_slots(tree, 2) for _ in range(size // 2)])
    for i, chunk in enumerate(steps[:, 0].to(torch.int64).split(64)):
        tree.insert(InsertParams(key=RadixKey(array("q", range(i * 1000, i * 1000 + chunk.numel()))), value=chunk))
    prompt = alloc_token_slots(tree, need)
    assert prompt.unique().numel() == need and _breaks(prompt) == need - 1  # no run can exist
    assert 0 < tree.window_evicted_tokens <= need  # one extra round, then it stopped
    assert alloc.available_size() + tree.total_size() + size // 2 + need == size


def test_pool_prefix_pass_choice_is_refused_loudly_where_it_cannot_run():
    """``RELAY_RADIX_PREFIX_POOL=fa3`` on a machine without Hopper refuses with what it needs and
    what to set instead; ``auto`` turns the pass off (MHA models always; here also no GPU), ``off``
    leaves it off. The backend's real config path over SGLang's classes on the CPU."""
    choices = {}
    for choice, hkv in (("fa3", 1), ("auto", 1), ("auto", 4), ("off", 1)):
        cfg = RelayConfig(min_group_size=2, prefix_pool=choice)
        s = MiniScheduler(num_q_heads=4, num_kv_heads=hkv, head_dim=32, relay_config=cfg)
        _, relay, _ = make_backends(s)
        relay.config = cfg  # the backend reads RELAY_RADIX_* at creation; this test sets it directly
        if choice == "fa3":
            with pytest.raises(ValueError, match="RELAY_RADIX_PREFIX_POOL=fa3 needs a Hopper GPU.*auto"):
                relay._prefix_pool()
            continue
        choices[(choice, hkv)] = relay._prefix_pool()
    assert choices == {("auto", 1): None, ("auto", 4): None, ("off", 1): None}
