"""``RelayAttnBackend``: SGLang attention backend ``relay``.

Extend/prefill (and mixed batches) go to a wrapped base backend (FlashInfer on CUDA,
``torch_native`` on CPU). Decode runs relay attention over the plan the scheduler built for
this step (``set_next_plan``, called by ``relay_radix.patches.scheduler_hooks`` right before
``Scheduler.run_batch`` launches the batch; scheduler, model runner and backend share one
process and one Python thread, so a plain reference carries the plan):

    DecodeRelayPlan (CPU) --init_forward_metadata_out_graph--> slot lists (device gather)
        --kernel.plan()--> static work lists  --forward_decode, per layer--> kernel.run()

Suffixes (each row's unshared KV) are ordinary paged decode. On CUDA they run, by default,
on FlashInfer's decode wrappers of the wrapped backend (``relay_radix.suffix_decode``: the
kernel vanilla decode runs), and the Triton kernel merges the groups' prefix parts into that
state; ``RELAY_RADIX_SUFFIX=triton`` runs them in the Triton kernel instead. On CPU, decode
runs the pure-torch reference (``relay_radix.reference``).

A step with no relay group runs the *plain* path: the FlashInfer suffix decode over whole
sequences writes the output itself, with no prefix launch and no merge, i.e. vanilla's decode.
Eager steps choose it per step; under CUDA graphs the decode runner captures a second, plain
graph per batch size (``relay_radix.patches.cuda_graph``) and replays it for such steps, because
a captured relay graph replays its prefix and merge launches even when they have no work.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from relay_radix.config import RelayConfig
from relay_radix.extend_plan import ExtendStats
from relay_radix.kernels.extend_pool import MIN_PREFIX_PAIRS, plan_extend_pool
from relay_radix.gate import AttentionDims
from relay_radix.kv_slots import PrefixSlotRuns, gather_ranges
from relay_radix.plan import DecodeRelayPlan, PlanStats, empty_plan
from relay_radix.reference import relay_decode_attention

if TYPE_CHECKING:
    from relay_radix.groups import RelayGroupManager

logger = logging.getLogger(__name__)

class RelayAttnBackend(AttentionBackend):
    """Relay decode over a wrapped base backend for everything else."""

    def __init__(self, model_runner, base_backend: AttentionBackend, config: RelayConfig | None = None):
        self.config = config or RelayConfig.from_env()
        self.base = base_backend
        self.device = torch.device(model_runner.device)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.max_context_len = self.req_to_token.shape[1]
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        mc = model_runner.model_config
        tp = getattr(model_runner, "tp_size", 1) or 1
        self.num_layers = mc.num_hidden_layers
        kv_dtype = getattr(self.token_to_kv_pool, "dtype", torch.bfloat16)
        self.dims = AttentionDims(
            num_q_heads=mc.num_attention_heads // tp,
            num_kv_heads=mc.get_num_kv_heads(tp),
            head_dim=mc.head_dim,
            kv_dtype_bytes=torch.empty(0, dtype=kv_dtype).element_size(),
        )
        self.kv_dtype = kv_dtype
        self.suffix = None  # FlashInferSuffixDecode when suffixes run on FlashInfer (CUDA)
        if self.device.type == "cuda" and self.config.suffix_kernel() == "flashinfer":
            from relay_radix.suffix_decode import FlashInferSuffixDecode

            self.suffix = FlashInferSuffixDecode(base_backend)
        self.manager: RelayGroupManager | None = None
        self._next_plan: DecodeRelayPlan | None = None
        self.plan: DecodeRelayPlan | None = None  # the plan of the step being run
        self.last_stats: PlanStats | None = None  # set by the scheduler hook per decode step
        self.plans_without_scheduler = 0  # decode steps that ran with no scheduler plan
        self._graph_kernel = None  # static buffers of the captured decode graphs
        self._fi_graph_kernels: dict = {}  # FlashInfer kernel: captured batch size -> graph object
        # FlashInfer picks its soft-cap kernel at plan time: plan with the model's cap (run checks it).
        hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
        cap = float(getattr(hf, "attn_logit_softcapping", None) or 0.0)
        self._plan_extra = dict(logit_cap=cap) if self.config.kernel == "flashinfer" else {}
        self._model_logit_cap = cap
        self._eager_kernel = None  # larger eager batches
        self._kernel = None  # the object planned for the current step
        self._cpu_slots: dict | None = None  # CPU path: slot lists of the current step
        # Prefix slot runs, learned on the device with no sync: the break count (TMA vs gather loop)
        # and each group's first slot when its segment is one run (the pool prefix pass).
        self.slot_runs = PrefixSlotRuns()
        # Groups the last relay step attended with the pool prefix pass (None: the pass is off).
        self.pool_groups: int | None = None
        # Plain steps (no group: suffix decode only). ``plain_graphs``: the decode runner captured
        # a plain graph per batch size next to the relay one (set by relay_radix.patches.cuda_graph);
        # ``step_is_plain``: the step being run (or captured) takes the plain path.
        self.plain_graphs = False
        self.step_is_plain = False
        self.host = HostTime()  # relay's host time per decode step (scheduler hook + metadata), reuse count
        # Prefill batches over cached one-run prefixes: FA3 over the pool in the place of the base
        # backend's paged prefix wrapper (RELAY_RADIX_EXTEND_POOL; relay_radix.kernels.extend_pool).
        self.extend_pool = None
        self.extend_stats = ExtendStats()
        self._next_extend: list | None = None  # the scheduler's prefix keys for the next prefill batch
        self.extend_min_pairs = MIN_PREFIX_PAIRS  # fewest (new, cached) token pairs of a planned batch
        if self.device.type == "cuda" and self._extend_pool_choice() == "fa3":
            from relay_radix.kernels.extend_pool import ExtendPoolPass

            self.extend_pool = ExtendPoolPass(self.dims.num_q_heads, self.dims.num_kv_heads, self.dims.head_dim,
                                              kv_dtype, self.device)
            logger.info("relay-radix: extend pool pass on (prefill over cached prompts in runs of KV slots: "
                        "FlashInfer FA3 over the pool; RELAY_RADIX_EXTEND_POOL=off to turn off)")

    # ---- wiring ----------------------------------------------------------------------------
    def attach(self, manager: "RelayGroupManager") -> None:
        """Link the scheduler's relay-group manager (the tree exists only after backend
        creation and graph capture: SGLang 0.5.16 ``scheduler.py:431-466``)."""
        self.manager = manager
        manager.dims = self.dims

    def set_next_plan(self, plan: DecodeRelayPlan | None) -> None:
        self._next_plan = plan

    def set_next_extend(self, keys: list | None) -> None:
        """The cached-prefix keys of the prefill batch about to launch
        (``relay_radix.extend_plan.extend_prefix_keys``; None: leave it to SGLang's path)."""
        self._next_extend = keys

    # ---- kernels ---------------------------------------------------------------------------
    def _make_kernel(self, max_bs: int, *, graph: bool = False, shared=None):
        """Kernel object for batches of up to ``max_bs`` rows (FlashInfer: exactly ``max_bs``
        rows when ``graph``; ``shared``: the FlashInfer object whose buffers it uses)."""
        max_members = max_bs * self.config.max_levels
        caps = dict(
            max_bs=max_bs, max_groups=self.config.max_groups, max_members=max_members,
            max_prefix_tokens=self.config.max_groups * self.max_context_len,
            max_suffix_tokens=max_bs * self.max_context_len,
        )
        d = self.dims
        if self.config.kernel == "flashinfer":
            # FlashInfer prefill over each group's members + the same FlashInfer suffix decode;
            # the plugin refuses this choice without FlashInfer suffixes.
            from relay_radix.kernels.flashinfer_relay import FlashInferRelayDecode

            if shared is None:
                logger.info("relay-radix: flashinfer decode kernels, capacity %s, graph %s", caps, graph)
            return FlashInferRelayDecode(d.num_q_heads, d.num_kv_heads, d.head_dim, self.kv_dtype, self.device,
                                         external_suffix=True, use_cuda_graph=graph, shared=shared, **caps)
        from relay_radix.kernels.triton_relay import TritonRelayDecode

        concurrent = self.suffix is not None and self.config.prefix_stream
        launch = self.config.prefix_launch()
        pool = self._prefix_pool()
        logger.info("relay-radix: triton decode kernels, capacity %s, prefix launch %s, prefix on a side stream: %s, "
                    "pool prefix pass (FlashInfer FA3 over one-run segments): %s", caps, launch, concurrent, pool or "off")
        return TritonRelayDecode(d.num_q_heads, d.num_kv_heads, d.head_dim, self.kv_dtype, self.device,
                                 external_suffix=self.suffix is not None, prefix_stream=concurrent,
                                 prefix_pool=pool, pool_min_rows=self.config.prefix_pool_min_rows, **launch, **caps)

    def _prefix_pool(self) -> str | None:
        """``"fa3"`` when the pool prefix pass runs (``RELAY_RADIX_PREFIX_POOL``), else ``None``.

        It needs FlashInfer's SM90 prefill (compute capability 9.x), a bf16/fp16 KV cache, head_dim
        64/128/256, no attention logit cap (planned without one) and FlashInfer suffixes (the
        relay kernel's merge folds its states onto theirs). ``fa3`` refuses a model or GPU that
        lacks one of these; ``auto`` then leaves every group to the Triton launch, and also turns
        it off for models without grouped-query attention: their groups stack one row per member,
        so they reach ``RELAY_RADIX_PREFIX_POOL_MIN_ROWS`` rows only with as many members, and
        on MHA the pass was no faster (session 15, H100: 0.93-1.05x up to 256 members), while
        its launches would run (idle) in every relay step."""
        choice = self.config.prefix_pool
        if choice == "off":
            return None
        if choice == "auto" and self.dims.num_q_heads == self.dims.num_kv_heads:
            logger.info("relay-radix: pool prefix pass off (auto: a model without grouped-query attention)")
            return None
        why = self._fa3_pool_blockers()
        if self.suffix is None:
            why.append("FlashInfer suffixes (RELAY_RADIX_SUFFIX=flashinfer)")
        return self._fa3_choice("RELAY_RADIX_PREFIX_POOL", choice, why, "pool prefix pass",
                                "auto (Triton prefix launch where it cannot run) or off")

    def _extend_pool_choice(self) -> str | None:
        """``"fa3"`` when prefill batches over cached one-run prefixes take the pool pass
        (``RELAY_RADIX_EXTEND_POOL``; ``relay_radix.kernels.extend_pool``), else ``None``. Needs
        what the decode pool pass needs, and SGLang's FlashInfer backend for extend: the pass
        takes the place of that backend's paged prefix wrapper."""
        choice = self.config.extend_pool
        if choice == "off":
            return None
        why = self._fa3_pool_blockers()
        if type(self.base).__name__ != "FlashInferAttnBackend":
            why.append(f"SGLang's FlashInfer backend for prefill (the base is {type(self.base).__name__}; "
                       "RELAY_RADIX_BASE_BACKEND=flashinfer)")
        return self._fa3_choice("RELAY_RADIX_EXTEND_POOL", choice, why, "extend pool pass",
                                "auto (SGLang's prefill where it cannot run) or off")

    def _fa3_pool_blockers(self) -> list[str]:
        """What FlashInfer's FA3 prefill over the pool needs and this GPU/model lacks."""
        why = []
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device)[0] != 9:
            why.append("a Hopper GPU (compute capability 9.x)")
        if self.kv_dtype not in (torch.bfloat16, torch.float16):
            why.append(f"a bf16/fp16 KV cache (this one is {self.kv_dtype})")
        if self.dims.head_dim not in (64, 128, 256):
            why.append(f"head_dim 64, 128 or 256 (this model has {self.dims.head_dim})")
        if self._model_logit_cap > 0:
            why.append("a model without attention logit soft-capping")
        return why

    @staticmethod
    def _fa3_choice(var: str, choice: str, why: list[str], what: str, instead: str) -> str | None:
        """``"fa3"`` when nothing blocks it; ``fa3`` asked for and blocked: refuse to start."""
        if not why:
            return "fa3"
        if choice == "fa3":
            raise ValueError(f"{var}=fa3 needs " + ", ".join(why) + f"; set {var}={instead}")
        logger.info("relay-radix: %s off (it needs %s)", what, ", ".join(why))
        return None

    def _kernel_for(self, bs: int, *, graph: bool, in_capture: bool):
        """The kernel object whose static buffers hold a batch of ``bs`` rows.

        The CUDA-graph kernel is made once in ``init_cuda_graph_state`` (captured graphs keep
        pointers to its buffers, so it is never replaced); batches larger than the largest
        captured one run eagerly on a second object grown on demand. FlashInfer fixes the batch
        size of a graph wrapper, so that kernel has one graph object per captured size, made at
        its capture, all on the largest one's buffers (one graph replays at a time)."""
        if self.device.type != "cuda":
            return None
        if self.config.kernel == "flashinfer" and graph:
            k = self._fi_graph_kernels.get(bs)
            if k is None:
                if not in_capture:
                    raise RuntimeError(f"relay-radix: decode graph replay for batch size {bs}, never captured")
                k = self._fi_graph_kernels[bs] = self._make_kernel(bs, graph=True, shared=self._graph_kernel)
            return k
        if self.config.kernel != "flashinfer" and self._graph_kernel is not None and bs <= self._graph_kernel.max_bs:
            return self._graph_kernel
        if self._eager_kernel is None or bs > self._eager_kernel.max_bs:
            self._eager_kernel = self._make_kernel(max(bs, 2 * (self._eager_kernel.max_bs if self._eager_kernel else 64)))
        return self._eager_kernel

    # ---- metadata --------------------------------------------------------------------------
    @property
    def plans_reused(self) -> int:
        """Decode steps (outside capture) that reused the kernel's prefix plan."""
        return self.host.total[3]

    @property
    def wants_plain_graphs(self) -> bool:
        """Whether the decode runner should capture a plain graph per batch size: plain steps
        need FlashInfer suffixes (the Triton suffix launch lives in the relay kernel), and
        ``RELAY_RADIX_PLAIN_GRAPHS`` asks for them."""
        return self.suffix is not None and self.config.plain_graphs

    @property
    def plain_steps(self) -> int:
        """Decode steps (outside capture) that took the plain path (no group)."""
        return self.host.total[4]

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode():
            self._plan_decode(forward_batch, in_capture=False, graph=False)
        else:
            self.base.init_forward_metadata(forward_batch)
            self._plan_extend(forward_batch)

    # ---- prefill over cached prompts (relay_radix.kernels.extend_pool) ------------------------
    def _plan_extend(self, fb) -> None:
        """Put the pool pass in the place of the base backend's paged prefix wrapper for this
        prefill batch when it can take every cached prefix; otherwise SGLang's path runs as is."""
        keys, self._next_extend = self._next_extend, None
        if self.extend_pool is None or keys is None or not any(fb.extend_prefix_lens_cpu or ()):
            return
        md = getattr(self.base, "forward_metadata", None)
        # SGLang's FlashInfer extend: the ragged path (new tokens, causal) merged with the paged
        # wrapper over the cached prefixes (causal=False) is the one whose paged part this
        # replaces; its other paths (paged only: piecewise CUDA graphs, deterministic mode,
        # multimodal) keep SGLang's wrappers.
        if not getattr(md, "use_ragged", False) or getattr(md, "extend_no_prefix", True):
            self.extend_stats.add(False, "SGLang's paged-only prefill path")
            return
        pp, why = self.plan_extend(fb, keys)
        self.extend_stats.add(pp is not None, why, 0 if pp is None else pp.rows)
        if pp is None:
            return
        self.extend_pool.plan(pp)
        md.prefill_wrappers = [self.extend_pool] * len(md.prefill_wrappers)

    def plan_extend(self, fb, keys: list):
        """``(ExtendPoolPlan | None, why)`` for a prefill batch (host; no sync). Prefixes whose
        run is not known yet are learned on the device for the next batch with the same prompt
        (``relay_radix.extend_plan``)."""
        plens, elens = list(fb.extend_prefix_lens_cpu), list(fb.extend_seq_lens_cpu)
        if len(keys) != len(plens) or any(k is not None and k[2] != p for k, p in zip(keys, plens)):
            # SGLang's path is exact for any batch, so this costs speed, not correctness: say so.
            logger.error("relay-radix: the prefill batch's prefix keys do not match the batch being run "
                         "(%d keys, %d requests); it keeps SGLang's path (a bug: please report it)",
                         len(keys), len(plens))
            return None, "keys for another batch (a bug)"
        named = list(dict.fromkeys(k for k in keys if k is not None))  # each prompt once
        known = dict(zip(named, self.slot_runs.lookup(named)))  # first slot, -1, or None (not learned)
        firsts = [-1 if k is None or known[k] is None else known[k] for k in keys]
        learn = {}  # key -> a batch row holding that prefix
        for i, k in enumerate(keys):
            if k is not None and known[k] is None:
                learn.setdefault(k, i)
        if learn:
            rows = list(learn.values())
            lens = torch.tensor([plens[i] for i in rows], dtype=torch.int64)
            idx = gather_ranges(self.req_to_token, fb.req_pool_indices[torch.tensor(rows)],
                                torch.zeros(len(rows), dtype=torch.int64), lens)
            self.slot_runs.count(idx, lens, list(learn), breaks=False)
            return None, "a prompt seen for the first time (its slot runs are learned for the next batch)"
        return plan_extend_pool(firsts, plens, elens, min_pairs=self.extend_min_pairs)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if self.device.type == "cuda":
            self._graph_kernel = self._make_kernel(max_bs, graph=True)
            if self.config.kernel == "flashinfer":
                self._fi_graph_kernels = {max_bs: self._graph_kernel}
            if self.suffix is not None:
                # The suffix decode runs on the base backend's graph wrappers (index buffers).
                self.base.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        # Padded rows decode one token at req_to_token[0, 0], the reserved sink slot.
        return 1

    def _take_plan(self, fb, in_capture: bool) -> DecodeRelayPlan:
        plan, self._next_plan = self._next_plan, None
        raw_bs = fb.batch_size - int(getattr(fb, "num_padding", 0) or 0)
        seq_lens_cpu = _seq_lens_cpu(fb)
        if plan is None:
            if not in_capture:
                self.plans_without_scheduler += 1
                if self.plans_without_scheduler == 1:
                    logger.warning(
                        "relay-radix: a decode step reached the backend without a scheduler plan; "
                        "it runs with no relay groups (is the relay plugin loaded in the scheduler?)")
            return empty_plan(seq_lens_cpu[:raw_bs], torch.zeros(raw_bs, dtype=torch.int32))
        if plan.batch_size != raw_bs or not torch.equal(
            plan.seq_lens, seq_lens_cpu[:raw_bs].to(torch.int32)
        ):
            what = (f"bs {plan.batch_size} vs {raw_bs}" if plan.batch_size != raw_bs
                    else "same bs, different seq_lens")
            raise RuntimeError(
                f"relay-radix: the decode plan does not match the batch being run ({what}); the plan "
                "must be built for the batch Scheduler.run_batch launches (a bug: please report it)")
        return plan

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        # SGLang calls this outside the graph at capture (in_capture=True) and before each
        # replay; eager steps come through init_forward_metadata.
        if not fb.forward_mode.is_decode():
            return self.base.init_forward_metadata_out_graph(fb, in_capture)
        if in_capture and self.suffix is not None:
            from relay_radix.patches.cuda_graph import capturing_plain_graph

            # The base backend's graph wrappers for this bs. The plain graph of a bs is captured
            # right after its relay graph and decodes on the same wrappers (one plan per step
            # serves whichever graph replays), so they are made once.
            if not (capturing_plain_graph() and fb.batch_size in self.suffix.graph_batch_sizes()):
                self.suffix.prepare_capture(fb)
        self._plan_decode(fb, in_capture=in_capture, graph=True)

    def _plan_decode(self, fb, *, in_capture: bool, graph: bool):
        t0 = time.perf_counter()
        reused = self._decode_metadata(fb, in_capture=in_capture, graph=graph)
        if not in_capture:
            self.host.add_backend(time.perf_counter() - t0, reused, self.step_is_plain)

    def _takes_plain_path(self, plan: DecodeRelayPlan, *, in_capture: bool, graph: bool) -> bool:
        """Whether this step decodes plainly (suffix decode over whole sequences, no relay
        launch). Needs FlashInfer suffixes (the Triton suffix launch lives in the relay kernel).
        Capture: the graph variant being captured decides. Replay: a step with no group, when
        plain graphs were captured. Eager: any step with no group."""
        if self.suffix is None:
            return False
        if in_capture:
            from relay_radix.patches.cuda_graph import capturing_plain_graph

            return capturing_plain_graph()
        return plan.num_groups == 0 and (self.plain_graphs or not graph)

    def _decode_metadata(self, fb, *, in_capture: bool, graph: bool) -> bool:
        """Metadata of one decode step (suffix plan, prefix slot lists, work lists); returns
        True when the kernel's buffers already held this step's prefix plan."""
        plan = self._take_plan(fb, in_capture)
        self.plan = plan
        bs = fb.batch_size  # padded rows (CUDA graph) follow the plan's rows, in no group
        pad = bs - plan.batch_size
        seq_lens = _seq_lens_cpu(fb)[:bs].to(torch.int64)
        suffix_start = torch.cat([plan.suffix_start.to(torch.int64), torch.zeros(pad, dtype=torch.int64)])
        suffix_lens = seq_lens - suffix_start
        if plan.num_groups > self.config.max_groups:  # the group manager caps them: a bug if reached
            raise RuntimeError(f"relay-radix: the plan has {plan.num_groups} groups, more than the kernels' "
                               f"static capacity RELAY_RADIX_MAX_GROUPS={self.config.max_groups}")
        prefix_lens = plan.prefix_lens.to(torch.int64)
        kernel = self._kernel = self._kernel_for(bs, graph=graph, in_capture=in_capture)
        self.step_is_plain = kernel is not None and self._takes_plain_path(plan, in_capture=in_capture, graph=graph)
        key = first_slots = keys = None  # keys: the groups' run-table keys (kv_slots.PrefixSlotRuns)
        if kernel is not None and self.suffix is not None:
            # Decode rows always own >= 1 token (the one being decoded; padded rows: the sink).
            assert int(suffix_lens.min()) >= 1, "relay-radix: a decode row with an empty suffix"
            self.suffix.plan(fb, suffix_start, suffix_lens, graph=graph)
            if self.step_is_plain:
                # No prefix plan: the relay kernel does not run, and its static buffers keep the
                # plan (and ``_relay_plan_key``) of the last relay step, which stay valid.
                if self.pool_groups is not None:
                    self.pool_groups = 0
                return False
            suffix_idx = None  # FlashInfer's wrapper holds the suffix slots
            if getattr(kernel, "pool", None) is not None:
                # Groups whose segment is known to be one run of slots go to the pool pass; a
                # group learned since the last plan changes this, so it is part of the reuse key.
                keys = plan.segment_keys()
                first_slots = self.slot_runs.run_starts(keys)
            if self.config.plan_reuse:
                # RELAY_RADIX_PLAN_REUSE: each kernel object carries the key of the prefix plan its
                # static buffers hold (``_relay_plan_key`` = (padded bs, plan structure id), set
                # below after plan()). Only with FlashInfer suffixes: Triton suffix work changes
                # every step. Equal structure ids mean equal groups, members and source rows,
                # hence equal slot lists: a group's segment is the pinned tree node's KV, which
                # any member row holds at the same slots. Sequence lengths change every step, but
                # only the suffixes (planned by FlashInfer above, every step) depend on them.
                key = (bs, plan.structure_id, None if first_slots is None else first_slots.numpy().tobytes())
                if getattr(kernel, "_relay_plan_key", None) == key:
                    return True  # the static buffers already hold this plan
        else:
            suffix_idx = gather_ranges(self.req_to_token, fb.req_pool_indices[:bs], suffix_start, suffix_lens)
        prefix_idx = gather_ranges(self.req_to_token, plan.group_src_pool_idx, plan.group_start, prefix_lens)
        if not in_capture:
            self.slot_runs.count(prefix_idx, prefix_lens, plan.segment_keys() if keys is None else keys)
        if kernel is None:  # CPU: the reference path reads the lists directly
            self._cpu_slots = dict(
                prefix_kv_indptr=_indptr(prefix_lens), prefix_kv_indices=prefix_idx,
                member_indptr=plan.member_indptr, member_rows=plan.member_rows,
                suffix_kv_indptr=_indptr(suffix_lens), suffix_kv_indices=suffix_idx,
            )
            return False
        kernel._relay_plan_key = None  # stale until plan() has written the buffers
        kernel.plan(
            prefix_kv_indices=prefix_idx, suffix_kv_indices=suffix_idx,
            prefix_lens_cpu=prefix_lens, member_indptr_cpu=plan.member_indptr.to(torch.int64),
            member_rows_cpu=plan.member_rows, suffix_lens_cpu=suffix_lens, **self._plan_extra,
            **({} if first_slots is None else dict(prefix_first_slot_cpu=first_slots)),
        )
        kernel._relay_plan_key = key
        if getattr(kernel, "pool", None) is not None:
            self.pool_groups = int(kernel.last_pool_plan.taken.sum())
        return False

    def init_forward_metadata_in_graph(self, fb):
        if not fb.forward_mode.is_decode():
            return self.base.init_forward_metadata_in_graph(fb)

    # ---- forward ---------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self.base.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        q3 = q.reshape(-1, hq, d)
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        logit_cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if self._kernel is None:
            o, _ = relay_decode_attention(
                q3, k_buf, v_buf, sm_scale=layer.scaling, logit_cap=logit_cap, **self._cpu_slots)
            return o.reshape(-1, hq * dv)
        o = q3.new_empty((q3.shape[0], hq, dv))
        if self.step_is_plain:
            self.suffix.run(q3, layer, o, None)  # whole sequences: vanilla's FlashInfer decode
            return o.reshape(-1, hq * dv)
        lse2 = suffix_state = None
        if self.suffix is not None:
            lse2 = torch.empty((q3.shape[0], hq), dtype=torch.float32, device=q3.device)

            def suffix_state():  # o, lse2 <- each row's suffix state (the kernel orders it)
                self.suffix.run(q3, layer, o, lse2)
        self._kernel.run(q3, k_buf, v_buf, o, sm_scale=layer.scaling, logit_cap=logit_cap,
                         base_lse2=lse2, suffix_state=suffix_state)
        return o.reshape(-1, hq * dv)


class HostTime:
    """Relay's host (CPU) time of decode steps, as running totals.

    Two parts: the scheduler hook (sync with the batch, groups, plan, stats) and the backend's
    metadata (suffix plan, prefix slot gather, work lists, copies). Under the overlap scheduler
    host time is hidden behind the previous step's GPU work only while it is shorter, so it is
    reported next to the step time (decode log line, ``/metrics``). Each reader keeps its own
    mark and gets the change since its last read (:meth:`since`)."""

    def __init__(self) -> None:
        # hook s, metadata s, decode steps, steps that reused the prefix plan, plain steps (no group)
        self.total = [0.0, 0.0, 0, 0, 0]

    def add_hook(self, seconds: float) -> None:
        self.total[0] += seconds

    def add_backend(self, seconds: float, reused: bool, plain: bool = False) -> None:
        t = self.total
        t[1] += seconds
        t[2] += 1
        t[3] += int(reused)
        t[4] += int(plain)

    def since(self, mark: list) -> tuple:
        """Change of the totals since ``mark`` (a reader's list, updated in place)."""
        delta = tuple(a - b for a, b in zip(self.total, mark))
        mark[:] = self.total
        return delta


def _seq_lens_cpu(fb) -> torch.Tensor:
    """Host copy of the batch's seq_lens: SGLang keeps one for decode (eager and replay);
    only a capture-time dummy batch may lack it, and a sync there costs nothing."""
    if getattr(fb, "seq_lens_cpu", None) is not None:
        return fb.seq_lens_cpu
    return fb.seq_lens.cpu()


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(lens.to(torch.int64), 0)
    return out
