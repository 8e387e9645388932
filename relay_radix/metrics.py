"""Relay observability: per-decode-step figures in the decode log line and Prometheus.

* Log: a ``logging.Filter`` on SGLang's metrics-reporter logger appends
  ``relay: groups G, members M, shared T tok, KV read R/V GB (-x%), host H ms/step (hook A,
  metadata B, plan reuse P%), plain decode Q%, prefix slot breaks S, plan digest D`` to every ``Decode batch ...``
  line (SGLang builds that line inside ``report_decode_stats``; the filter extends it without
  touching SGLang's code). Host figures are means over the decode steps since the previous
  line. D is the rolling digest of the rank's decode plans: equal on every TP rank while their trees agree.
  S: breaks in the consecutive-slot runs of the newest prefix plan (0: every prefix chunk can be
  read by TMA; ``relay_radix.kv_slots.PrefixSlotRuns``). With the pool prefix pass on
  (``RELAY_RADIX_PREFIX_POOL``), ``pool pass P groups``: groups of the last relay step attended by
  FlashInfer's FA3 over the pool (the others took the Triton launch). With the extend pool pass on
  (``RELAY_RADIX_EXTEND_POOL``), ``extend pool P/N prefill batches (n why, ...)``: of the prefill
  batches so far with a cached prefix, those whose prefixes FA3 attended over the pool, and why
  the others kept SGLang's path (``relay_radix.extend_plan.ExtendStats``). Two figures appear only when not
  zero, because each means relay is partly off: ``groups G (+N over RELAY_RADIX_MAX_GROUPS)``
  (qualifying groups left out), ``groups G (+N gated: faster unshared)`` (groups the gate left
  out because relaying them would not save time, ``relay_radix.gate``) and ``decode steps without a relay plan N`` (steps that reached
  the backend with no scheduler plan ran with no groups).
* Prometheus: with ``--enable-metrics`` SGLang exports every ``prometheus_client`` metric
  made in a scheduler process (``--enable-metrics`` makes SGLang's ``entrypoints/engine.py:1296``
  set ``PROMETHEUS_MULTIPROC_DIR``, which the spawned schedulers inherit); these gauges and
  counters are made at scheduler init (``make_prometheus``) in a process whose
  ``PROMETHEUS_MULTIPROC_DIR`` is set.
"""

from __future__ import annotations

import logging
import os

from relay_radix.plan import PlanStats

DECODE_LOG_LOGGER = "sglang.srt.managers.scheduler_components.metrics_reporter"


def format_stats(s: PlanStats | None) -> str:
    if s is None:
        return "relay: no decode plan yet"
    saved = 1 - s.kv_bytes_relay / s.kv_bytes_vanilla if s.kv_bytes_vanilla else 0.0
    over = f" (+{s.groups_over_cap} over RELAY_RADIX_MAX_GROUPS)" if s.groups_over_cap else ""
    gated = f" (+{s.groups_gated} gated: faster unshared)" if s.groups_gated else ""
    return (f"relay: groups {s.groups}{over}{gated}, members {s.members}, shared {s.shared_tokens} tok, "
            f"KV read {s.kv_bytes_relay / 1e9:.3f}/{s.kv_bytes_vanilla / 1e9:.3f} GB (-{100 * saved:.0f}%)")


def format_digest(digest: bytes | None) -> str:
    """``plan digest <8 hex>``: the rolling digest of every plan this rank built so far (equal
    on all tensor-parallel ranks when their trees agree; see ``scheduler_hooks``)."""
    return f"plan digest {digest.hex()[:8]}" if digest else "plan digest none"


def format_host(hook_s: float, metadata_s: float, steps: int, reused: int, plain: int = 0) -> str:
    """``host H ms/step (hook A, metadata B, plan reuse P%), plain decode Q%``: relay's mean host
    time per decode step over an interval (``HostTime.since``), and the share of those steps
    that had no group and decoded plainly (vanilla's decode kernel alone)."""
    if steps <= 0:
        return "host: no decode step"
    per = 1e3 / steps
    return (f"host {(hook_s + metadata_s) * per:.3f} ms/step (hook {hook_s * per:.3f}, "
            f"metadata {metadata_s * per:.3f}, plan reuse {100 * reused / steps:.0f}%), "
            f"plain decode {100 * plain / steps:.0f}%")


class DecodeLogFilter(logging.Filter):
    """Appends the last relay plan's figures (given ``host``, a ``HostTime``, relay's host time
    per step since the previous line; given ``digest_source``, the rolling plan digest) to
    SGLang's ``Decode batch`` log line."""

    def __init__(self, stats_source, digest_source=None, host=None, slot_breaks=None, unplanned_source=None,
                 pool_source=None, extend_source=None):
        super().__init__()
        self.stats_source = stats_source  # callable -> PlanStats | None
        self.digest_source = digest_source  # callable -> bytes | None
        self.host = host
        self.slot_breaks = slot_breaks  # PrefixSlotRuns | None
        self.unplanned_source = unplanned_source  # callable -> decode steps run without a plan so far
        self.pool_source = pool_source  # callable -> groups on the pool prefix pass (None: pass off)
        self.extend_source = extend_source  # callable -> ExtendStats (None: extend pool pass off)
        self._host_mark = [0.0, 0.0, 0, 0, 0]

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Decode batch"):
            extra = format_stats(self.stats_source())
            if self.host is not None:
                extra = f"{extra}, {format_host(*self.host.since(self._host_mark))}"
            if self.slot_breaks is not None:
                b = self.slot_breaks.poll()
                extra = f"{extra}, prefix slot breaks {'-' if b is None else b}"
            if self.pool_source is not None and (p := self.pool_source()) is not None:
                extra = f"{extra}, pool pass {p} groups"
            if self.extend_source is not None and (e := self.extend_source()) is not None:
                extra = f"{extra}, {e.summary()}"
            if self.unplanned_source is not None and (n := self.unplanned_source()):
                extra = f"{extra}, decode steps without a relay plan {n}"
            if self.digest_source is not None:
                extra = f"{extra}, {format_digest(self.digest_source())}"
            record.msg = f"{record.msg}, {extra}"
        return True


class RelayPrometheus:
    """Relay gauges (last step) and counters (totals) for ``/metrics``."""

    def __init__(self, labels: dict[str, str], registry=None):
        """``registry``: where the metrics register (default: prometheus_client's global one,
        which SGLang's ``/metrics`` exports; tests pass a private ``CollectorRegistry``)."""
        import functools

        import prometheus_client

        names = list(labels)
        self.labels = labels
        reg = dict(registry=registry) if registry is not None else {}
        Counter = functools.partial(prometheus_client.Counter, **reg)

        def gauge(name, doc):
            return prometheus_client.Gauge(f"sglang:relay_{name}", doc, labelnames=names,
                                           multiprocess_mode="mostrecent", **reg)

        self.groups = gauge("groups", "Relay groups in the last decode step")
        self.members = gauge("members", "Requests in at least one relay group (last decode step)")
        self.shared_tokens = gauge("shared_tokens", "Shared prefix tokens read once per step (last step)")
        self.groups_over_cap = gauge("groups_over_cap", "Qualifying relay groups left out of the last decode "
                                     "step because more than RELAY_RADIX_MAX_GROUPS qualified")
        self.groups_gated = gauge("groups_gated", "Qualifying relay groups the gate left out of the last decode "
                                  "step because relaying them would not save time (relay_radix.gate)")
        self.steps_without_plan = gauge("steps_without_plan", "Decode steps so far that reached the relay "
                                        "backend without a scheduler plan (they ran with no groups)")
        self.prefix_slot_breaks = gauge("prefix_slot_breaks", "Breaks in the consecutive-slot runs of the newest "
                                        "prefix plan (each sends a prefix chunk from TMA to the gather loop)")
        self.pool_groups = gauge("pool_groups", "Groups of the last relay step attended by the pool prefix pass "
                                 "(FlashInfer FA3 over the KV pool; RELAY_RADIX_PREFIX_POOL)")
        self.window_evicted_tokens = gauge("window_evicted_tokens", "Cached tokens evicted so far beyond SGLang's "
                                           "own eviction so that long prompts get one run of KV slots "
                                           "(RELAY_RADIX_EVICT_FOR_RUNS)")
        self.kv_bytes_relay = Counter("sglang:relay_kv_bytes_read", "KV bytes decode attention read with relay",
                                      labelnames=names)
        self.kv_bytes_vanilla = Counter("sglang:relay_kv_bytes_vanilla", "KV bytes vanilla decode would have read",
                                        labelnames=names)
        self.host_seconds = Counter("sglang:relay_host_seconds", "Relay host time of decode steps "
                                    "(part: hook = scheduler plan, metadata = backend)", labelnames=names + ["part"])
        self.decode_steps = Counter("sglang:relay_decode_steps", "Decode steps through the relay backend",
                                    labelnames=names)
        self.plans_reused = Counter("sglang:relay_plans_reused", "Decode steps that reused the last prefix plan",
                                    labelnames=names)
        self.plain_steps = Counter("sglang:relay_plain_decode_steps", "Decode steps with no relay group, run "
                                   "plainly (vanilla's decode kernel, no relay launch)", labelnames=names)
        self.extend_prefix_batches = Counter("sglang:relay_extend_prefix_batches", "Prefill batches with a cached "
                                             "prefix (extend pool pass on)", labelnames=names)
        self.extend_pool_batches = Counter("sglang:relay_extend_pool_batches", "Prefill batches whose cached "
                                           "prefixes FlashInfer's FA3 attended over the pool (RELAY_RADIX_EXTEND_POOL)",
                                           labelnames=names)
        self._host_mark = [0.0, 0.0, 0, 0, 0]
        self._extend_mark = [0, 0]

    def observe(self, s: PlanStats, host=None, slot_breaks: int | None = None, steps_without_plan: int = 0,
                pool_groups: int | None = None, window_evicted_tokens: int | None = None, extend=None) -> None:
        """One decode step's plan figures; ``host`` (a ``HostTime``): add its change since the last
        call; ``slot_breaks``: the newest ``PrefixSlotRuns`` count (None: none finished yet);
        ``steps_without_plan``: the backend's running count of unplanned decode steps;
        ``pool_groups``: groups of the last relay step on the pool prefix pass (None: pass off);
        ``window_evicted_tokens``: the tree's running total of extra evictions for consecutive
        windows (``RelayRadixCache.make_room_for_run``; None: not a relay tree); ``extend``: the
        backend's ``ExtendStats`` (None: extend pool pass off), counters add its change."""
        lb = self.labels
        if extend is not None:
            self.extend_prefix_batches.labels(**lb).inc(extend.prefix_batches - self._extend_mark[0])
            self.extend_pool_batches.labels(**lb).inc(extend.pool_batches - self._extend_mark[1])
            self._extend_mark[:] = [extend.prefix_batches, extend.pool_batches]
        if window_evicted_tokens is not None:
            self.window_evicted_tokens.labels(**lb).set(window_evicted_tokens)
        self.groups_over_cap.labels(**lb).set(s.groups_over_cap)
        self.groups_gated.labels(**lb).set(s.groups_gated)
        self.steps_without_plan.labels(**lb).set(steps_without_plan)
        if slot_breaks is not None:
            self.prefix_slot_breaks.labels(**lb).set(slot_breaks)
        if pool_groups is not None:
            self.pool_groups.labels(**lb).set(pool_groups)
        self.groups.labels(**lb).set(s.groups)
        self.members.labels(**lb).set(s.members)
        self.shared_tokens.labels(**lb).set(s.shared_tokens)
        self.kv_bytes_relay.labels(**lb).inc(s.kv_bytes_relay)
        self.kv_bytes_vanilla.labels(**lb).inc(s.kv_bytes_vanilla)
        if host is not None:
            hook_s, metadata_s, steps, reused, plain = host.since(self._host_mark)
            self.host_seconds.labels(**lb, part="hook").inc(hook_s)
            self.host_seconds.labels(**lb, part="metadata").inc(metadata_s)
            self.decode_steps.labels(**lb).inc(steps)
            self.plans_reused.labels(**lb).inc(reused)
            self.plain_steps.labels(**lb).inc(plain)


def make_prometheus(tp_rank: int) -> RelayPrometheus | None:
    """Prometheus metrics for this scheduler process, or None when metrics are off."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    return RelayPrometheus({"tp_rank": str(tp_rank)})
