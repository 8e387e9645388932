"""relay-radix settings: one frozen dataclass, read from documented environment variables.

Environment variables are the configuration channel because SGLang spawns one scheduler
process per rank and each inherits the launcher's environment (server arguments of a
plugin would need SGLang's argparse to know them). ``relay_radix.launch_server`` turns its
``--relay-*`` flags into these variables.

| variable | default | meaning |
|---|---|---|
| ``RELAY_RADIX_MIN_GROUP_SIZE`` | 4 | live requests that must share a prefix before it is promoted |
| ``RELAY_RADIX_DEMOTE_GROUP_SIZE`` | max(2, min/2) | a promoted group is demoted below this (hysteresis) |
| ``RELAY_RADIX_MIN_PREFIX_TOKENS`` | 256 | shortest shared segment worth a group |
| ``RELAY_RADIX_MAX_LEVELS`` | 4 | deepest nesting of groups (level 0 = outermost) |
| ``RELAY_RADIX_MAX_GROUPS`` | 64 | most groups at once (the decode kernels' static buffers hold this many); past it the groups saving the most prefix reads are kept, with a warning |
| ``RELAY_RADIX_KERNEL`` | triton | decode kernels: ``triton`` or ``flashinfer`` |
| ``RELAY_RADIX_SUFFIX`` | flashinfer (CUDA with the FlashInfer base) | each request's own suffix: ``flashinfer`` (SGLang's FlashInfer decode wrappers, vanilla's kernel) or ``triton`` (the relay kernel's suffix launch) |
| ``RELAY_RADIX_BASE_BACKEND`` | flashinfer (CUDA), torch_native (CPU) | backend for prefill/extend |
| ``RELAY_RADIX_GATE`` | 1 | relay a step's groups only where that is faster than vanilla decode (``relay_radix.gate``); 0 relays every qualifying group |
| ``RELAY_RADIX_PLAN_REUSE`` | 1 | a decode step whose plan structure (groups, members, source rows) equals the last step's skips the prefix slot gather and the work-list build (FlashInfer suffixes only); 0 rebuilds every step |
| ``RELAY_RADIX_PREFIX_TILE`` | 64x64x4x3 | Triton prefix launch: stacked query rows x keys per tile x warps x pipeline stages (``128x128x8x2`` and the others measured by ``bench/kernels/run.py --variants`` were slower on the serving shapes; ``bench/results/kernels-h100-s6-variants.md``) |
| ``RELAY_RADIX_PREFIX_PROGRAMS`` | auto | Triton prefix launch beside the suffix decode: ``G`` or ``G/S``, a persistent grid of ``G`` programs per SM whose steps with a short prefix pass (``relay_radix.kernels.triton_relay.LONG_PREFIX_TILE_TOKENS_PER_SM``) use only ``S`` per SM (``G`` alone: always all ``G``); ``auto``: the kernel's default, ``2`` (one per SM measured slower inside the server, session 14) |
| ``RELAY_RADIX_SLOT_RUNS`` | 1 | Triton prefix launch: a chunk of a shared prefix whose KV slots are one consecutive run (a prompt prefilled in one piece from SGLang's sorted free list) is read by TMA instead of per-row gathers (Hopper and newer; other chunks are gathered); 0 gathers every chunk |
| ``RELAY_RADIX_SORT_FREE_SLOTS`` | 1 | SGLang's token allocator re-sorts its free slots when its free list runs short (its own ``need_sort``), so prompts prefilled after the pool's first pass still get consecutive slots (``relay_radix.kv_slots.keep_free_slots_sorted``); 0 leaves the allocator as SGLang made it |
| ``RELAY_RADIX_PLAIN_GRAPHS`` | 1 | decode CUDA graphs are captured twice per batch size: the relay graph, and a plain one (FlashInfer decode over whole sequences, vanilla's kernel) replayed for steps with no relay group (``relay_radix.patches.cuda_graph``; FlashInfer suffixes only); 0 captures the relay graph only |
| ``RELAY_RADIX_CONSECUTIVE_ALLOC`` | 1024 | allocations of at least this many KV slots (prefill chunks of long prompts; never a decode step, whose allocation is one slot per running request: the bound is raised above ``--max-running-requests``) take the window of free slots with the fewest breaks (a consecutive run when one is long enough), so a long prompt prefilled into a fragmented pool is still read by TMA (``relay_radix.kv_slots.prefer_consecutive_slots``; needs ``RELAY_RADIX_SORT_FREE_SLOTS``); 0 turns it off |
| ``RELAY_RADIX_EVICT_FOR_RUNS`` | 4 | such an allocation into a nearly full pool (fewer than (N + 1) x its size free slots) may evict up to N times its size more of the radix cache (least recently used first, in rounds, stopping when a round does not help) until the free slots hold a window with no break (one break inside a prefix segment slows the prefix launch about as much as hundreds): on a long-running server SGLang's minimal eviction frees scattered slots, and a new long prompt then misses TMA and the pool pass; a prompt cut into prefill chunks gets one window for all of it (``patches.scheduler_hooks.chunked_prefill_remainder``) (``relay_radix.kv_slots.evict_for_consecutive_window`` through ``RelayRadixCache.make_room_for_run``; only allocations, never a retraction's or decode-memory reservation; a log line at most every 30 s says how much); 0 turns it off |
| ``RELAY_RADIX_PREFIX_POOL`` | auto | groups whose shared segment is one run of consecutive KV slots, with at least ``RELAY_RADIX_PREFIX_POOL_MIN_ROWS`` stacked rows, are attended by FlashInfer's FA3 prefill reading the KV pool in place (``relay_radix.kernels.pool_prefix``), the others by the Triton prefix launch: ``auto`` (GQA models where the GPU and model allow it: Hopper, bf16/fp16 KV, head_dim 64/128/256, no logit cap; session 15, H100, GQA-4 TPOT 8K 11.23 -> 10.81 ms, 16K 13.17 -> 12.10 ms), ``fa3`` (any model; refuse to start where it cannot run) or ``off`` |
| ``RELAY_RADIX_PREFIX_POOL_MIN_ROWS`` | 512 | fewest stacked query rows (members x query heads per KV head) of a group the pool pass takes; smaller groups were slower there (GQA-4 with 8-64 members 0.60-0.84x the Triton launch's speed) |
| ``RELAY_RADIX_EXTEND_POOL`` | auto | prefill batches whose requests' cached prefixes are runs of consecutive KV slots (a burst behind a long prompt) attend those prefixes with FlashInfer's FA3 prefill reading the pool in place, each run's requests stacked into one request, instead of SGLang's per-request paged FA2 prefill (``relay_radix.kernels.extend_pool``; H100, per layer, 32 x 128 tokens over a 16K prompt: 1.67 against 3.08 ms, MHA and GQA-4): ``auto`` (where the GPU and model allow it: Hopper, bf16/fp16 KV, head_dim 64/128/256, no logit cap, the FlashInfer base backend), ``fa3`` (refuse to start where it cannot run) or ``off``; batches with nested or unknown prefixes keep SGLang's path |
| ``RELAY_RADIX_PREFIX_STREAM`` | 1 | the prefix pass (tensor-core bound) runs on a side stream, concurrent with the suffix decode (bandwidth bound), joined before the merge (FlashInfer suffixes only); 0 runs them one after the other |
"""

from __future__ import annotations

import dataclasses
import os

KERNEL_CHOICES = ("triton", "flashinfer")
SUFFIX_CHOICES = ("flashinfer", "triton")
PREFIX_POOL_CHOICES = ("auto", "fa3", "off")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer: set an integer or unset it") from None


@dataclasses.dataclass(frozen=True, slots=True)
class RelayConfig:
    """Thresholds and choices of relay-radix (see the module docstring for the variables)."""

    min_group_size: int = 4
    demote_group_size: int = 2
    min_prefix_tokens: int = 256
    max_levels: int = 4
    max_groups: int = 64
    kernel: str = "triton"
    base_backend: str | None = None  # None: chosen by device (flashinfer on CUDA)
    gate: bool = True
    suffix: str | None = None  # None: flashinfer when the base backend is flashinfer
    plan_reuse: bool = True
    prefix_stream: bool = True
    plain_graphs: bool = True
    slot_runs: bool = True
    sort_free_slots: bool = True
    consecutive_alloc: int = 1024  # min slots of an allocation that looks for a consecutive run (0: off)
    evict_for_runs: int = 4  # such an allocation may evict up to this many times its size more (0: off)
    prefix_tile: str = "64x64x4x3"  # BLOCK_M x BLOCK_N x num_warps x num_stages of the prefix launch
    prefix_programs: str = "auto"  # programs per SM of the prefix grid, "G" or "G/S" (short steps: S)
    prefix_pool: str = "auto"  # one-run segments on FlashInfer's FA3 over the pool: auto, fa3 or off
    prefix_pool_min_rows: int = 512  # fewest members x GQA heads of a group the pool pass takes
    extend_pool: str = "auto"  # prefill over cached one-run prefixes on FlashInfer's FA3 over the pool

    def __post_init__(self):
        if self.min_group_size < 2:
            raise ValueError(
                f"min_group_size={self.min_group_size}: a relay group needs at least 2 requests "
                "(set RELAY_RADIX_MIN_GROUP_SIZE >= 2)"
            )
        if not 1 <= self.demote_group_size <= self.min_group_size:
            raise ValueError(
                f"demote_group_size={self.demote_group_size} must lie in [1, min_group_size="
                f"{self.min_group_size}] (set RELAY_RADIX_DEMOTE_GROUP_SIZE)"
            )
        if self.min_prefix_tokens < 1:
            raise ValueError("min_prefix_tokens must be >= 1 (RELAY_RADIX_MIN_PREFIX_TOKENS)")
        if self.max_levels < 1:
            raise ValueError("max_levels must be >= 1 (RELAY_RADIX_MAX_LEVELS)")
        if self.consecutive_alloc < 0:
            raise ValueError("RELAY_RADIX_CONSECUTIVE_ALLOC must be >= 0 (0 turns it off)")
        if self.evict_for_runs < 0:
            raise ValueError("RELAY_RADIX_EVICT_FOR_RUNS must be >= 0 (0 turns it off)")
        if self.max_groups < 1:
            raise ValueError("max_groups must be >= 1 (RELAY_RADIX_MAX_GROUPS)")
        if self.suffix is not None and self.suffix not in SUFFIX_CHOICES:
            raise ValueError(
                f"RELAY_RADIX_SUFFIX={self.suffix!r}: choose one of {', '.join(SUFFIX_CHOICES)}"
            )
        self.prefix_launch()  # validates prefix_tile and prefix_programs
        if self.prefix_pool_min_rows < 1:
            raise ValueError("RELAY_RADIX_PREFIX_POOL_MIN_ROWS must be >= 1")
        if self.prefix_pool not in PREFIX_POOL_CHOICES:
            raise ValueError(
                f"RELAY_RADIX_PREFIX_POOL={self.prefix_pool!r}: choose one of {', '.join(PREFIX_POOL_CHOICES)}")
        if self.extend_pool not in PREFIX_POOL_CHOICES:
            raise ValueError(
                f"RELAY_RADIX_EXTEND_POOL={self.extend_pool!r}: choose one of {', '.join(PREFIX_POOL_CHOICES)}")
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(
                f"RELAY_RADIX_KERNEL={self.kernel!r}: choose one of {', '.join(KERNEL_CHOICES)}"
            )

    def prefix_launch(self) -> dict:
        """``prefix_tile`` and ``slot_runs`` as ``TritonRelayDecode`` launch arguments (block_n
        also sets the Triton suffix launch, which the server runs only with
        ``RELAY_RADIX_SUFFIX=triton``; slot runs on means "where the GPU and pools allow")."""
        parts = self.prefix_tile.lower().split("x")
        ok = len(parts) == 4 and all(p.isdigit() for p in parts)
        if ok:
            block_m, block_n, warps, stages = map(int, parts)
            ok = block_m in (16, 32, 64, 128) and block_n in (16, 32, 64, 128) and warps in (4, 8) \
                and 1 <= stages <= 4
        if not ok:
            raise ValueError(
                f"RELAY_RADIX_PREFIX_TILE={self.prefix_tile!r}: write BLOCK_MxBLOCK_NxWARPSxSTAGES with "
                "BLOCK_M, BLOCK_N in 16/32/64/128, WARPS 4 or 8, STAGES 1-4 (default 64x64x4x3)")
        launch = dict(prefix_block_m=block_m, block_n=block_n, num_warps_prefix=warps, num_stages_prefix=stages,
                      prefix_slot_runs=None if self.slot_runs else False)
        if self.prefix_programs != "auto":
            grid, sep, short = self.prefix_programs.partition("/")
            ok = grid.isdigit() and int(grid) >= 1 and (not sep or (short.isdigit() and 1 <= int(short) <= int(grid)))
            if not ok:
                raise ValueError(f"RELAY_RADIX_PREFIX_PROGRAMS={self.prefix_programs!r}: write auto, G or G/S "
                                 "(programs per SM of the prefix grid, and of a short step's split; 1 <= S <= G)")
            launch.update(programs_per_sm=int(grid), concurrent_programs_per_sm=int(short) if short else None)
        return launch

    def suffix_kernel(self) -> str:
        """Where suffixes run on CUDA: FlashInfer decode unless asked otherwise or the base
        backend is not FlashInfer."""
        if self.suffix is not None:
            return self.suffix
        return "flashinfer" if self.base_backend in (None, "flashinfer") else "triton"

    @classmethod
    def from_env(cls) -> "RelayConfig":
        min_group = _env_int("RELAY_RADIX_MIN_GROUP_SIZE", 4)
        return cls(
            min_group_size=min_group,
            demote_group_size=_env_int("RELAY_RADIX_DEMOTE_GROUP_SIZE", max(2, min_group // 2)),
            min_prefix_tokens=_env_int("RELAY_RADIX_MIN_PREFIX_TOKENS", 256),
            max_levels=_env_int("RELAY_RADIX_MAX_LEVELS", 4),
            max_groups=_env_int("RELAY_RADIX_MAX_GROUPS", 64),
            kernel=os.environ.get("RELAY_RADIX_KERNEL", "triton") or "triton",
            base_backend=os.environ.get("RELAY_RADIX_BASE_BACKEND") or None,
            gate=_env_int("RELAY_RADIX_GATE", 1) != 0,
            suffix=os.environ.get("RELAY_RADIX_SUFFIX") or None,
            plan_reuse=_env_int("RELAY_RADIX_PLAN_REUSE", 1) != 0,
            prefix_stream=_env_int("RELAY_RADIX_PREFIX_STREAM", 1) != 0,
            plain_graphs=_env_int("RELAY_RADIX_PLAIN_GRAPHS", 1) != 0,
            slot_runs=_env_int("RELAY_RADIX_SLOT_RUNS", 1) != 0,
            sort_free_slots=_env_int("RELAY_RADIX_SORT_FREE_SLOTS", 1) != 0,
            consecutive_alloc=_env_int("RELAY_RADIX_CONSECUTIVE_ALLOC", 1024),
            evict_for_runs=_env_int("RELAY_RADIX_EVICT_FOR_RUNS", 4),
            prefix_tile=os.environ.get("RELAY_RADIX_PREFIX_TILE") or "64x64x4x3",
            prefix_programs=os.environ.get("RELAY_RADIX_PREFIX_PROGRAMS") or "auto",
            prefix_pool=(os.environ.get("RELAY_RADIX_PREFIX_POOL") or "auto").lower(),
            prefix_pool_min_rows=_env_int("RELAY_RADIX_PREFIX_POOL_MIN_ROWS", 512),
            extend_pool=(os.environ.get("RELAY_RADIX_EXTEND_POOL") or "auto").lower(),
        )
