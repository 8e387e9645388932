"""Scheduler-side hooks: the decode relay plan is built where the radix tree lives.

Each TP rank runs its own scheduler over its own replicated tree (SGLang 0.5.16 spawns one
scheduler per rank, ``entrypoints/engine.py:598-660``, and broadcasts only requests), so every
rank builds the same plan from the same state; no GPU->CPU copy is involved.

Hooks (``sglang.srt.plugins.HookRegistry``):
  * AFTER ``ServerArgs.__post_init__``: a ``relay`` launch gets ``--radix-cache-backend relay``
    and is checked for unsupported settings before any process is spawned.
  * AFTER ``Scheduler.__init__``: the tree exists only now, after the backend was built and
    the decode graphs captured (``scheduler.py:431-466``): link the tree's group manager to the
    backend, install the decode-log filter and the Prometheus metrics.
  * BEFORE ``Scheduler.run_batch``: build the plan for exactly the batch being launched (a
    prefill batch gets its requests' cached-prefix keys, ``relay_radix.extend_plan``).
    Under the overlap scheduler this is launch time for batch i (its requests' tree state
    includes this iteration's admissions; requests prefilled in batch i-1 are still
    counted under their admission-time ``last_node`` because their ``cache_unfinished_req``
    runs after this launch, in the result processing of batch i-1; the plan only shares KV
    they already share).
"""

from __future__ import annotations

import hashlib
import logging
import time

logger = logging.getLogger(__name__)

_hooks_registered = False


def find_relay_backend(attn_backend):
    """The RelayAttnBackend inside SGLang's possible wrappers (hybrid, TBO, ...), or None."""
    from relay_radix.backend import RelayAttnBackend

    seen, stack = set(), [attn_backend]
    while stack:
        b = stack.pop()
        if b is None or id(b) in seen:
            continue
        seen.add(id(b))
        if isinstance(b, RelayAttnBackend):
            return b
        for name in ("decode_backend", "prefill_backend", "primary", "full_attn_backend", "attn_backend"):
            stack.append(getattr(b, name, None))
    return None


def after_server_args_post_init(result, self, *args, **kwargs):
    # SGLang: ServerArgs.__post_init__ -- relay needs its own radix cache backend and refuses
    # unsupported combinations here, in the launcher, with a message that says what to do.
    backends = {getattr(self, "attention_backend", None), getattr(self, "decode_attention_backend", None)}
    if "relay" not in backends:
        return None
    if not getattr(self, "radix_cache_backend", None):
        self.radix_cache_backend = "relay"
    from relay_radix.support import check_server_args

    check_server_args(self)
    return None


def after_scheduler_init(result, self, *args, **kwargs):
    # SGLang: Scheduler.__init__ -- link tree manager and backend once both exist.
    backend = find_relay_backend(self.tp_worker.model_runner.attn_backend)
    if backend is None:
        return None
    manager = getattr(self.tree_cache, "relay", None)
    if manager is None:
        raise RuntimeError(
            "relay-radix: --attention-backend relay needs --radix-cache-backend relay "
            f"(the tree is {type(self.tree_cache).__name__}); launch through relay_radix.launch_server "
            "or pass --radix-cache-backend relay")
    backend.attach(manager)
    self._relay_backend = backend
    if backend._graph_kernel is not None and backend.wants_plain_graphs and not backend.plain_graphs:
        logger.warning(
            "relay-radix: decode graphs were captured without their plain twins (the hook on SGLang's "
            "DecodeCudaGraphRunner._capture_one_stream did not run: see the plugin log above); decode steps "
            "with no relay group replay the relay graph, whose empty prefix and merge launches cost ~5 us "
            "per layer over vanilla")
    if manager.config.sort_free_slots:
        from relay_radix.kv_slots import keep_free_slots_sorted, prefer_consecutive_slots

        allocator = getattr(self, "token_to_kv_pool_allocator", None)
        if allocator is not None and keep_free_slots_sorted(allocator):
            logger.info("relay-radix: KV free slots kept sorted (consecutive prefix slots -> TMA prefix loads; "
                        "RELAY_RADIX_SORT_FREE_SLOTS=0 to turn off)")
            # A decode step allocates one slot per running request: keep those on SGLang's path.
            min_run = manager.config.consecutive_alloc
            max_running = int(getattr(self, "max_running_requests", 0) or 0)
            if min_run and prefer_consecutive_slots(allocator, max(min_run, max_running + 1),
                                                    make_room=getattr(self.tree_cache, "make_room_for_run", None),
                                                    lookahead=lambda: chunked_prefill_remainder(self)):
                logger.info("relay-radix: allocations of >= %d KV slots take the free-slot window with the fewest "
                            "breaks (RELAY_RADIX_CONSECUTIVE_ALLOC=0 to turn off)", allocator.relay_consecutive_min)
        else:
            logger.warning(
                "relay-radix: the KV allocator (%s) has no sorted-free-list switch; prefixes prefilled after "
                "the pool's first pass may get scattered slots, which the prefix kernel gathers instead of "
                "reading by TMA (the decode log line's 'prefix slot breaks' shows how many)",
                type(allocator).__name__)
    from relay_radix.metrics import DECODE_LOG_LOGGER, DecodeLogFilter, make_prometheus

    logging.getLogger(DECODE_LOG_LOGGER).addFilter(DecodeLogFilter(
        lambda: backend.last_stats, digest_source=lambda: getattr(self, "_relay_plan_digest", None),
        host=backend.host, slot_breaks=backend.slot_runs, unplanned_source=lambda: backend.plans_without_scheduler,
        pool_source=lambda: backend.pool_groups,
        extend_source=lambda: backend.extend_stats if backend.extend_pool is not None else None))
    self._relay_prometheus = make_prometheus(getattr(self, "tp_rank", 0))
    logger.info("relay-radix: attached to %s (%s)", type(self.tree_cache).__name__, manager.config)
    return None


def chunked_prefill_remainder(scheduler) -> int:
    """Tokens of the scheduler's chunked request that later prefill chunks will allocate, as seen
    by the allocation of the current prefill batch (``kv_slots.prefer_consecutive_slots`` sizes
    its window for them, so a long prompt's chunks land in one run of KV slots).

    SGLang 0.5.16 ``Scheduler._get_new_batch_prefill_raw`` sets ``self.chunked_req`` (the request
    whose prompt was cut, ``extend_range.end`` where this chunk ends) before
    ``new_batch.prepare_for_extend()`` allocates the batch's slots (``scheduler.py:3036-3070``),
    and clears it once the last chunk is admitted; the chunk it cut is the batch's last request
    (a new one) or its first (a continued one), so the remainder follows this allocation's slots.
    ``tests/test_backend_cpu.py`` checks that order in SGLang's source."""
    req = getattr(scheduler, "chunked_req", None)
    rng = getattr(req, "extend_range", None)
    fill = getattr(req, "full_untruncated_fill_ids", None)
    if rng is None or fill is None:
        return 0
    return max(0, len(fill) - int(rng.end))


def _record_plan_fingerprint(scheduler, plan) -> None:
    """Per-rank plan trace: every TP rank builds its plan from its own replicated tree (see the
    module docstring), so the ranks' fingerprints must agree step by step. Logs each one at DEBUG
    and folds it into a rolling digest (``_relay_plan_digest``, shown in the decode log line as
    ``plan digest <8 hex>``) so two ranks' logs can be compared line by line. Cheap: the
    fingerprint hashes a few small int32 arrays."""
    fp = plan.fingerprint()
    step = getattr(scheduler, "_relay_plan_step", 0) + 1
    prev = getattr(scheduler, "_relay_plan_digest", b"")
    scheduler._relay_plan_step = step
    scheduler._relay_plan_digest = hashlib.blake2b(prev + bytes.fromhex(fp), digest_size=8).digest()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("relay-radix plan step=%d tp_rank=%d fp=%s groups=%d",
                     step, getattr(scheduler, "tp_rank", 0), fp, plan.num_groups)


def before_run_batch(self, batch, *args, **kwargs):
    # SGLang: Scheduler.run_batch -- plan the decode batch about to launch.
    backend = getattr(self, "_relay_backend", None)
    if backend is None:
        return None
    if batch is not None and batch.forward_mode.is_decode() and batch.reqs:
        from relay_radix.plan import PlanStats, build_decode_plan

        t0 = time.perf_counter()
        pool = batch.req_pool_indices_cpu
        if pool is None:
            pool = [r.req_pool_idx for r in batch.reqs]
        plan = build_decode_plan(backend.manager, batch.reqs, pool, batch.seq_lens_cpu)
        _record_plan_fingerprint(self, plan)
        backend.set_next_plan(plan)
        backend.set_next_extend(None)
        backend.last_stats = stats = PlanStats.of(plan, backend.dims, backend.num_layers,
                                                  groups_over_cap=backend.manager.groups_over_cap,
                                                  groups_gated=backend.manager.groups_gated)
        backend.host.add_hook(time.perf_counter() - t0)
        prom = getattr(self, "_relay_prometheus", None)
        if prom is not None:
            prom.observe(stats, backend.host, backend.slot_runs.poll(), backend.plans_without_scheduler,
                         pool_groups=backend.pool_groups,
                         window_evicted_tokens=getattr(getattr(self, "tree_cache", None), "window_evicted_tokens", None),
                         extend=backend.extend_stats if backend.extend_pool is not None else None)
    else:
        backend.set_next_plan(None)
        if batch is not None and backend.extend_pool is not None and batch.forward_mode.name == "EXTEND":
            # A prefill batch: name each request's cached prefix for the extend pool pass
            # (relay_radix.extend_plan; mixed batches keep SGLang's path).
            from relay_radix.extend_plan import extend_prefix_keys

            backend.set_next_extend(extend_prefix_keys(batch.reqs, backend.manager))
        else:
            backend.set_next_extend(None)
    return None


def register_hooks() -> None:
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__",
                          after_server_args_post_init, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__",
                          after_scheduler_init, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.run_batch",
                          before_run_batch, HookType.BEFORE)
    from relay_radix.patches import cuda_graph

    cuda_graph.register(HookRegistry, HookType)
