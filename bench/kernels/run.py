"""Relay decode kernels on one GPU: correctness table + timing table in one run.

    python bench/kernels/run.py --out DIR            # everything (writes kernels-<device>.json/.md)
    python bench/kernels/run.py --warm-fi            # only JIT-compile the FlashInfer kernels used

Timing: each kernel is captured in a CUDA graph (fallback: eager) and timed with
``triton.testing.do_bench(..., return_mode="median")``, which zeroes a 256 MB buffer before
every repetition, so L2 (50 MB) is cold and cannot fake HBM speed. The bandwidth floor of a
config is the bytes relay must read (each shared prefix's KV once + every suffix's KV + q + o)
over the device-to-device copy bandwidth measured in the same run; every kernel's column is
reported as a fraction of that floor. ``plan()`` host time per step is timed separately.
Each config runs in try/except; the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DEV = os.environ.get("RELAY_BENCH_DEVICE", "cuda")
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- timing helpers
def bench_ms(fn, use_graph: bool = True) -> tuple[float, str]:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    f, mode = fn, "eager"
    if use_graph:
        try:
            from tests._relay_gpu_checks import capture_graph

            g = capture_graph(fn)
            g.replay()
            torch.cuda.synchronize()
            f, mode = g.replay, "graph"
        except Exception as e:  # noqa: BLE001
            log("graph capture failed, eager timing:", repr(e)[:200])
            torch.cuda.synchronize()
    return do_bench(f, warmup=25, rep=100, return_mode="median"), mode


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    from triton.testing import do_bench

    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    del x, y
    return 2 * n / (t * 1e-3)


# ----------------------------------------------------------------------------- workloads
def make_workload(*, hq, hkv, d, bs, groups_spec, suffix_lo=64, suffix_hi=512, seed=0, dtype=torch.bfloat16):
    """groups_spec: list of levels; each level a list of (row_start, row_end, prefix_len) groups
    whose rows are contiguous (so FlashInfer's cascade can run the same batch). Slots are laid
    out contiguously: every segment, then every suffix. Returns a dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    suffix = torch.randint(suffix_lo, suffix_hi + 1, (bs,), generator=g)
    groups = [grp for level in groups_spec for grp in level]
    plens = torch.tensor([p for _, _, p in groups], dtype=torch.int64)
    npre = int(plens.sum())
    total = npre + int(suffix.sum())
    k = torch.randn(total + 16, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn_like(k)
    q = torch.randn(bs, hq, d, dtype=dtype, device=DEV)
    p_indptr = torch.zeros(len(groups) + 1, dtype=torch.int64)
    p_indptr[1:] = torch.cumsum(plens, 0)
    s_indptr = torch.zeros(bs + 1, dtype=torch.int64)
    s_indptr[1:] = torch.cumsum(suffix, 0)
    m_rows = torch.cat([torch.arange(a, b) for a, b, _ in groups]) if groups else torch.zeros(0, dtype=torch.int64)
    m_indptr = torch.zeros(len(groups) + 1, dtype=torch.int64)
    m_indptr[1:] = torch.cumsum(torch.tensor([b - a for a, b, _ in groups], dtype=torch.int64), 0)
    prefix_idx = torch.arange(npre, dtype=torch.int32, device=DEV)
    suffix_idx = torch.arange(npre, total, dtype=torch.int32, device=DEV)
    # Vanilla: each row's full sequence = its groups' segments (level order) + its suffix.
    full_lists = []
    for r in range(bs):
        parts = [prefix_idx[int(p_indptr[i]):int(p_indptr[i + 1])] for i, (a, b, _) in enumerate(groups) if a <= r < b]
        parts.append(suffix_idx[int(s_indptr[r]):int(s_indptr[r + 1])])
        full_lists.append(torch.cat(parts))
    full_lens = torch.tensor([t.numel() for t in full_lists], dtype=torch.int64)
    full_indptr = torch.zeros(bs + 1, dtype=torch.int64)
    full_indptr[1:] = torch.cumsum(full_lens, 0)
    return dict(q=q, k=k, v=v, hq=hq, hkv=hkv, d=d, bs=bs, levels=groups_spec, suffix=suffix, plens=plens,
                p_indptr=p_indptr, s_indptr=s_indptr, m_rows=m_rows, m_indptr=m_indptr, prefix_idx=prefix_idx,
                suffix_idx=suffix_idx, full_idx=torch.cat(full_lists), full_indptr=full_indptr, full_lens=full_lens,
                sm_scale=d ** -0.5)


def relay_plan_kwargs(w):
    return dict(prefix_kv_indices=w["prefix_idx"], suffix_kv_indices=w["suffix_idx"], prefix_lens_cpu=w["plens"],
                member_indptr_cpu=w["m_indptr"], member_rows_cpu=w["m_rows"], suffix_lens_cpu=w["suffix"])


# ----------------------------------------------------------------------------- kernels
def k_sglang_triton(w):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    bs, hq, d = w["bs"], w["hq"], w["d"]
    max_splits = 8  # SGLang's default --triton-attention-num-kv-splits
    logits = torch.empty(bs, hq, max_splits, d, dtype=torch.float32, device=DEV)
    lse = torch.empty(bs, hq, max_splits, dtype=torch.float32, device=DEV)
    num_splits = torch.full((bs,), max_splits, dtype=torch.int32, device=DEV)
    try:  # SGLang's own split heuristic (as TritonAttnBackend.get_num_kv_splits)
        import triton
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

        seq = w["full_lens"].to(torch.int32).to(DEV)
        get_num_kv_splits_triton[(1,)](num_splits, seq, bs, 1, hq, w["hkv"], max_splits,
                                       torch.cuda.get_device_properties(0).multi_processor_count,
                                       MAX_NUM_SEQ=max(256, triton.next_power_of_2(bs)))
    except Exception as e:  # noqa: BLE001
        log("sglang split heuristic unavailable, static splits:", repr(e)[:120])
    indptr = w["full_indptr"].to(torch.int32).to(DEV)
    idx = w["full_idx"]
    o = torch.empty_like(w["q"])

    def fn():
        decode_attention_fwd(w["q"], w["k"], w["v"], o, indptr, idx, logits, lse, num_splits, max_splits,
                             w["sm_scale"], 1.0, 1.0)

    return fn, o, 0.0


_WS = {}


def _ws(name):
    if name not in _WS:
        _WS[name] = torch.zeros(256 << 20, dtype=torch.uint8, device=DEV)
    return _WS[name]


def k_fi_decode(w):
    import flashinfer

    tc = w["hq"] // w["hkv"] >= 4  # as SGLang's should_use_tensor_core for bf16
    dec = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_ws("dec"), "NHD", use_tensor_cores=tc)
    dec.plan(w["full_indptr"].to(torch.int32), w["full_idx"], torch.ones(w["bs"], dtype=torch.int32), w["hq"],
             w["hkv"], w["d"], 1, q_data_type=w["q"].dtype, kv_data_type=w["k"].dtype, sm_scale=w["sm_scale"])
    kv = (w["k"].unsqueeze(1), w["v"].unsqueeze(1))
    o = torch.empty_like(w["q"])
    return (lambda: dec.run(w["q"], kv, out=o)), o, 0.0


def k_fi_cascade(w):
    """MultiLevelCascadeAttentionWrapper: one level per relay level + the per-row suffix level."""
    import flashinfer

    levels = w["levels"]
    bs = w["bs"]
    qo, kvp, kvi, last = [], [], [], []
    for level in levels:
        # rows not in any group of this level get an empty qo range appended in order: cascade
        # needs the level's qo ranges to tile the batch, so fill gaps with zero-KV "groups".
        bounds, lens, idx = [0], [], []
        pos = 0
        gi = {(a, b): i for i, (a, b, _) in enumerate([g for lv in levels for g in lv])}
        for a, b, p in sorted(level):
            if a > pos:
                bounds.append(a)
                lens.append(0)
            bounds.append(b)
            i = gi[(a, b)]
            lens.append(p)
            idx.append(w["prefix_idx"][int(w["p_indptr"][i]):int(w["p_indptr"][i + 1])])
            pos = b
        if pos < bs:
            bounds.append(bs)
            lens.append(0)
        qo.append(torch.tensor(bounds, dtype=torch.int32, device=DEV))
        kp = torch.zeros(len(lens) + 1, dtype=torch.int32)
        kp[1:] = torch.cumsum(torch.tensor(lens), 0)
        kvp.append(kp.to(DEV))
        kvi.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32, device=DEV))
        last.append(torch.tensor([1 if x > 0 else 0 for x in lens], dtype=torch.int32, device=DEV))
    qo.append(torch.arange(bs + 1, dtype=torch.int32, device=DEV))
    kvp.append(w["s_indptr"].to(torch.int32).to(DEV))
    kvi.append(w["suffix_idx"])
    last.append(torch.ones(bs, dtype=torch.int32, device=DEV))
    cas = flashinfer.MultiLevelCascadeAttentionWrapper(len(qo), _ws("cas"), "NHD")
    cas.plan(qo, kvp, kvi, last, w["hq"], w["hkv"], w["d"], 1, causal=False, sm_scale=w["sm_scale"],
             q_data_type=w["q"].dtype, kv_data_type=w["k"].dtype)
    kv = (w["k"].unsqueeze(1), w["v"].unsqueeze(1))
    out = {}

    def fn():
        out["o"] = cas.run(w["q"], kv)

    fn()
    return fn, (lambda: out["o"]), 0.0


def _plan_ms(wrapper, kw, n=10):
    t = time.perf_counter()
    for _ in range(n):
        wrapper.plan(**kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def _planned(wr, w, **plan_extra):
    """Plan a relay wrapper for workload ``w``, time its plan(), return (run fn, output, plan ms)."""
    kw = dict(relay_plan_kwargs(w), **plan_extra)
    wr.plan(**kw)
    plan_ms = _plan_ms(wr, kw)
    o = torch.empty_like(w["q"])
    return (lambda: wr.run(w["q"], w["k"], w["v"], o, sm_scale=w["sm_scale"])), o, plan_ms


def k_relay_triton(w, **opts):
    from relay_radix.kernels import TritonRelayDecode

    bs = w["bs"]
    wr = TritonRelayDecode(w["hq"], w["hkv"], w["d"], w["q"].dtype, DEV, max_bs=max(bs, 256),
                           max_groups=max(8, len(w["plens"])), max_members=max(512, w["m_rows"].numel()),
                           max_prefix_tokens=max(1, w["prefix_idx"].numel()),
                           max_suffix_tokens=max(1, w["suffix_idx"].numel()), **opts)
    return _planned(wr, w)


def k_relay_fi(w, **opts):
    from relay_radix.kernels import FlashInferRelayDecode

    bs = w["bs"]
    wr = FlashInferRelayDecode(w["hq"], w["hkv"], w["d"], w["q"].dtype, DEV, max_bs=bs,
                               max_groups=max(1, len(w["plens"])), max_members=max(1, w["m_rows"].numel()),
                               max_prefix_tokens=max(1, w["prefix_idx"].numel()),
                               max_suffix_tokens=max(1, w["suffix_idx"].numel()), **opts)
    return _planned(wr, w, sm_scale=w["sm_scale"])


def k_relay_fi_fa3(w):
    """relay_fi with FlashInfer's FA3 prefill for the groups (the default is FA2: FA3's paged
    prefill at page size 1 measured twice as slow on the H100 here)."""
    return k_relay_fi(w, prefill_backend="fa3")


def k_relay_hybrid(w, prefix_stream: bool = False, **opts):
    """The server's path: FlashInfer decode over the suffixes + Triton prefix parts merged on top
    (``prefix_stream``: the prefix launch on a side stream, concurrent with the suffix decode)."""
    from tests._relay_gpu_checks import HybridRelay

    bs = w["bs"]
    wr = HybridRelay(w["hq"], w["hkv"], w["d"], w["q"].dtype, prefix_stream=prefix_stream, max_bs=max(bs, 256),
                     max_groups=max(8, len(w["plens"])), max_members=max(512, w["m_rows"].numel()),
                     max_prefix_tokens=max(1, w["prefix_idx"].numel()), max_suffix_tokens=1, **opts)
    extra = {}
    if opts.get("prefix") == "pool":
        # make_workload lays the segments in consecutive slots, back to back: every group is one run.
        extra["prefix_first_slot_cpu"] = torch.cumsum(w["plens"], 0) - w["plens"]
    return _planned(wr, w, sm_scale=w["sm_scale"], **extra)


def k_relay_hybrid_stream(w):
    return k_relay_hybrid(w, prefix_stream=True)


def k_relay_pool(w):
    """H with the pool prefix pass (``RELAY_RADIX_PREFIX_POOL``): the groups, all one run here,
    attended by FlashInfer's FA3 prefill reading the pool in place."""
    from relay_radix.kernels.pool_prefix import POOL_MIN_ROWS

    return k_relay_hybrid(w, prefix_stream=True, prefix="pool", pool_min_rows=POOL_MIN_ROWS)


def without_groups(w):
    """Workload ``w`` as the server decodes it when the gate drops its groups: every row's
    whole sequence is its own suffix, read through the same slots."""
    empty = torch.zeros(0, dtype=torch.int64)
    return dict(w, levels=[], plens=empty, p_indptr=torch.zeros(1, dtype=torch.int64), m_rows=empty,
                m_indptr=torch.zeros(1, dtype=torch.int64), prefix_idx=w["prefix_idx"][:0],
                suffix=w["full_lens"], s_indptr=w["full_indptr"], suffix_idx=w["full_idx"])


def k_relay_plain(w):
    """What the server runs for a step with no group: the plain graph (``RELAY_RADIX_PLAIN_GRAPHS``),
    FlashInfer decode over whole sequences with no relay launch. On a config with groups: the
    step the gate turns plain (``relay_radix.gate``), the same rows decoded unshared."""
    return k_relay_hybrid(without_groups(w), prefix_stream=True, plain=True)


def gate_groups(w):
    """(members, segment tokens) of every group of workload ``w``, as the gate sees them."""
    return [(b - a, p) for level in w["levels"] for a, b, p in level]


def gate_dims(w):
    """Workload ``w``'s attention sizes as the gate prices them (``relay_radix.gate.AttentionDims``)."""
    from relay_radix.gate import AttentionDims

    return AttentionDims(w["hq"], w["hkv"], w["d"], w["k"].element_size())


def gate_relays(w) -> bool:
    """The server's decision for ``w``'s step (``relay_radix.gate.step_relays``)."""
    from relay_radix.gate import step_relays

    return step_relays(gate_groups(w), gate_dims(w))


def k_relay_hybrid_stream_gather(w):
    """The server's path with every prefix chunk gathered (``RELAY_RADIX_SLOT_RUNS=0``): what a
    prefix whose slots are not consecutive costs."""
    return k_relay_hybrid(w, prefix_stream=True, prefix_slot_runs=False)


KERNELS = {
    "sglang_triton": k_sglang_triton,
    "fi_decode": k_fi_decode,
    "fi_cascade": k_fi_cascade,
    "relay_triton": k_relay_triton,
    "relay_fi": k_relay_fi,
    "relay_fi_fa3": k_relay_fi_fa3,
    "relay_hybrid": k_relay_hybrid,
    "relay_hybrid_stream": k_relay_hybrid_stream,
    "relay_hybrid_stream_gather": k_relay_hybrid_stream_gather,
    "relay_plain": k_relay_plain,
    "relay_pool": k_relay_pool,
}


def run_config(name, w, bw, kernels):
    hq, hkv, d, bs = w["hq"], w["hkv"], w["d"], w["bs"]
    tok_bytes = hkv * d * 2 * w["k"].element_size()
    relay_bytes = (int(w["plens"].sum()) + int(w["suffix"].sum())) * tok_bytes + 2 * bs * hq * d * w["q"].element_size()
    full_bytes = int(w["full_lens"].sum()) * tok_bytes + 2 * bs * hq * d * w["q"].element_size()
    floor_ms = relay_bytes / bw * 1e3
    row = dict(config=name, hq=hq, hkv=hkv, d=d, bs=bs, prefix=[int(x) for x in w["plens"].tolist()][:8],
               num_groups=len(w["plens"]), suffix_mean=float(w["suffix"].float().mean()), relay_bytes=relay_bytes,
               full_bytes=full_bytes, floor_ms=floor_ms, gate_relays=gate_relays(w), ms={}, mode={}, frac_floor={},
               plan_ms={}, err_vs_fi_decode={})
    ref_o = None
    for kname, kfn in kernels.items():
        try:
            fn, o, plan_ms = kfn(w)
            ms, mode = bench_ms(fn)
            fn()
            torch.cuda.synchronize()
            out = o() if callable(o) else o
            if ref_o is None and kname == "fi_decode":
                ref_o = out.float().clone()
            row["ms"][kname] = ms
            row["mode"][kname] = mode
            row["frac_floor"][kname] = floor_ms / ms
            if plan_ms:
                row["plan_ms"][kname] = plan_ms
            if ref_o is not None:
                e = ((out.float() - ref_o).norm() / ref_o.norm()).item()
                row["err_vs_fi_decode"][kname] = e if math.isfinite(e) else float("nan")
        except Exception as e:  # noqa: BLE001
            row["ms"][kname] = None
            row.setdefault("errors", {})[kname] = repr(e)[:300]
            log(f"  {kname} FAILED: {e!r}"[:300])
            torch.cuda.synchronize()
    return row


def timing_configs(quick: bool):
    shapes = [("llama2-7b", 32, 32, 128), ("llama3-8b", 32, 8, 128)]
    prefixes = [1024, 4096, 16384]
    batches = [8, 32, 128, 256]
    if quick:
        prefixes, batches = [4096], [32]
    for sname, hq, hkv, d in shapes:
        for p in prefixes:
            for b in batches:
                yield f"{sname} P={p} B={b}", dict(hq=hq, hkv=hkv, d=d, bs=b, groups_spec=[[(0, b, p)]])
        # 4 groups of 32 with 4K each; nested: all 128 share 2K, 4 subgroups of 32 share 2K more.
        yield f"{sname} 4x(P=4096,B=32)", dict(hq=hq, hkv=hkv, d=d, bs=128,
                                              groups_spec=[[(i, i + 32, 4096) for i in range(0, 128, 32)]])
        yield f"{sname} nested 2K+4x2K B=128", dict(hq=hq, hkv=hkv, d=d, bs=128, groups_spec=[
            [(0, 128, 2048)], [(i, i + 32, 2048) for i in range(0, 128, 32)]])
        for b in ([32, 128] if not quick else [32]):
            yield f"{sname} no-sharing 4K B={b}", dict(hq=hq, hkv=hkv, d=d, bs=b, groups_spec=[],
                                                        suffix_lo=4096, suffix_hi=4096)
        # The serving control's decode step: 128 requests, 128-token prompt + up to 256 generated.
        yield f"{sname} no-sharing short B=128", dict(hq=hq, hkv=hkv, d=d, bs=128, groups_spec=[],
                                                       suffix_lo=129, suffix_hi=384)
        # The serving 2K workload's decode step (concurrency 64).
        yield f"{sname} P=2048 B=64 (serving 2K)", dict(hq=hq, hkv=hkv, d=d, bs=64, groups_spec=[[(0, 64, 2048)]],
                                                        suffix_lo=129, suffix_hi=384)
        # The serving 8K workload's decode step.
        yield f"{sname} P=8192 B=128 (serving 8K)", dict(hq=hq, hkv=hkv, d=d, bs=128, groups_spec=[[(0, 128, 8192)]],
                                                         suffix_lo=129, suffix_hi=384)


def ppsm_sweep_configs():
    """Long prefixes x many members, where the prefix pass may outlast the concurrent suffix
    decode: the configs that place ``LONG_PREFIX_TILE_TOKENS_PER_SM``
    (``relay_radix.kernels.triton_relay``) on the server's path."""
    for sname, hq, hkv, plens, batches in (("llama3-8b", 32, 8, (8192, 12288, 16384, 24576), (128, 192, 256)),
                                            ("llama2-7b", 32, 32, (16384, 32768), (128, 256))):
        for p in plens:
            for b in batches:
                yield f"{sname} P={p} B={b}", dict(hq=hq, hkv=hkv, d=128, bs=b, groups_spec=[[(0, b, p)]])


# ----------------------------------------------------------------------------- correctness
def correctness_rows(deadline):
    from tests._relay_gpu_checks import check, check_graph

    rows = []
    jobs = []
    for dtype in (torch.bfloat16, torch.float16):
        for hq, hkv in ((16, 16), (32, 8), (32, 4)):
            for d in (64, 128, 256):
                jobs.append(("triton", "mixed", dict(hq=hq, hkv=hkv, d=d, dtype=dtype, seed=hq * 1000 + d)))
    for kind in ("big_group", "nested", "no_groups"):
        for hq, hkv in ((32, 32), (32, 4)):
            for dtype in (torch.bfloat16, torch.float16):
                jobs.append(("triton", kind, dict(hq=hq, hkv=hkv, d=128, dtype=dtype, seed=7)))
    # The server's default path (FlashInfer suffix decode + Triton prefix parts merged on top),
    # before the FlashInfer-only path: the run has a deadline.
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128, 256):
            jobs.append(("hybrid", "mixed", dict(hq=32, hkv=8, d=d, dtype=dtype, seed=11 + d)))
    for kind in ("nested", "big_group", "no_groups"):
        for hq, hkv in ((32, 32), (32, 4)):
            jobs.append(("hybrid", kind, dict(hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16, seed=13)))
    # Prefixes in consecutive slots (the TMA run loop of the prefix kernel, per chunk).
    # hybrid_pool: those in one run on FlashInfer's FA3 over the pool (RELAY_RADIX_PREFIX_POOL).
    for path in ("triton", "hybrid", "hybrid_pool"):
        for dtype in (torch.bfloat16, torch.float16):
            for hq, hkv in ((32, 32), (32, 8), (32, 4)):
                jobs.append((path, "mixed", dict(hq=hq, hkv=hkv, d=128, dtype=dtype, seed=17, slot_layout="runs")))
    for kind in ("mixed", "nested", "big_group", "no_groups"):
        for hq, hkv in ((32, 32), (32, 8), (32, 4)):
            jobs.append(("flashinfer", kind, dict(hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16, seed=9)))
    for path, kind, kw in jobs:
        if time.time() > deadline:
            log("correctness: deadline reached, skipping the rest")
            break
        try:
            r = check(path, kind, **kw)
        except Exception as e:  # noqa: BLE001
            r = dict(path=path, case=kind, dtype=str(kw["dtype"]), hq=kw["hq"], hkv=kw["hkv"], d=kw["d"],
                     ok=False, error=repr(e)[:300])
            traceback.print_exc()
        log("check", json.dumps(r))
        rows.append(r)
    for path in ("triton", "flashinfer"):
        try:
            for r in check_graph(path, hq=32, hkv=8, d=128, dtype=torch.bfloat16):
                log("check", json.dumps(r))
                rows.append(r)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(path=path + "+graph", case="replan", ok=False, error=repr(e)[:300]))
            traceback.print_exc()
    return rows


# ----------------------------------------------------------------------------- report
def write_reports(res, out_dir, dev_tag):
    jpath = os.path.join(out_dir, f"kernels-{dev_tag}.json")
    with open(jpath, "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Relay decode kernels on {res['device']} ({res['date']})", "",
             f"torch {res['torch']}, triton {res['triton']}, flashinfer {res['flashinfer']}, sglang {res['sglang']}; "
             f"copy bandwidth {res.get('copy_bw_TBps', 0):.2f} TB/s; bf16, page size 1, suffixes U[64,512] unless noted.",
             "", "## Correctness (vs float64 oracle)", "",
             "| path | case | dtype | hq/hkv | d | rel err | max abs | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in res.get("correctness", []):
        lines.append(f"| {r.get('path')} | {r.get('case')} | {r.get('dtype')} | {r.get('hq')}/{r.get('hkv')} | {r.get('d')} | "
                     f"{r.get('rel_err', float('nan')):.2e} | {r.get('max_abs', float('nan')):.2e} | "
                     f"{'yes' if r.get('ok') else 'NO ' + r.get('error', '')[:80]} |")
    ks = [k for k in KERNELS if any(k in r.get("ms", {}) for r in res.get("timing", []))]
    lines += ["", "## Decode attention time per layer (ms, median, CUDA graph, L2 flushed)", "",
              "relay_triton: Triton prefix + Triton suffix + merge. relay_hybrid: FlashInfer batch decode over each "
              "row's suffix + Triton prefix parts merged on top. relay_hybrid_stream (H, the server's default): the "
              "same with the prefix launch on a side stream, concurrent with the suffix decode. Prefix slots are "
              "consecutive (as SGLang allocates a prompt prefilled in one piece), so the Triton prefix launch reads "
              "them with TMA; relay_hybrid_stream_gather: H with every chunk gathered (slots not consecutive). "
              "relay_fi: FlashInfer "
              "prefill per group + FlashInfer decode + merge. relay_plain (rows with no group only): what the server "
              "replays for a step with no group, its plain graph (FlashInfer decode over whole sequences, no relay "
              "launch; RELAY_RADIX_PLAIN_GRAPHS); on a row with groups, the same rows decoded unshared. gate: the "
              "server's decision for the row's groups (relay_radix.gate: relay, or plain where relaying would not "
              "save time). S: the server's path, H where the gate relays, else relay_plain. Ratios: "
              "the other kernel's time over relay's (> 1: relay faster).",
              "", "| config | floor | " + " | ".join(ks) + " | T % floor | H % floor | T vs cascade | H vs cascade | "
              "T vs FI decode | H vs FI decode | gate | S vs FI decode | plan ms (T/FI/H) |",
              "|---|---|" + "---|" * len(ks) + "---|---|---|---|---|---|---|---|---|"]
    for r in res.get("timing", []):
        ms = r["ms"]

        def f(x):
            return f"{x:.3f}" if isinstance(x, (int, float)) and x else "fail"

        def ratio(k, relay):
            return f"{ms[k] / ms[relay]:.2f}x" if ms.get(relay) and ms.get(k) else "-"

        def frac(relay):
            return f"{100 * r['frac_floor'].get(relay, 0):.0f}%"

        # H: the server's default path (side-stream prefix); records without it show relay_hybrid.
        h = "relay_hybrid_stream" if ms.get("relay_hybrid_stream") else "relay_hybrid"
        # Records from before the gate column: relay_plain was measured on rows with no group only.
        relays = r.get("gate_relays", not ms.get("relay_plain"))
        srv = h if relays else "relay_plain"
        plan = "/".join(f"{r['plan_ms'].get(k, 0):.2f}" for k in ("relay_triton", "relay_fi", h))
        lines.append(f"| {r['config']} | {r['floor_ms']:.3f} | " + " | ".join(f(ms[k]) if k in ms else "-" for k in ks) +
                     f" | {frac('relay_triton')} | {frac(h)} | {ratio('fi_cascade', 'relay_triton')} | "
                     f"{ratio('fi_cascade', h)} | {ratio('fi_decode', 'relay_triton')} | "
                     f"{ratio('fi_decode', h)} | {'relay' if relays else 'plain'} | {ratio('fi_decode', srv)} | {plan} |")
    pool_rows = [r for r in res.get("timing", []) if r["ms"].get("relay_pool")]
    if pool_rows:
        lines += ["", "## Pool prefix pass (P: relay_pool) against the server's Triton prefix launch (H)", "",
                  "Same run, same inputs. P: groups in one run of slots on FlashInfer's FA3 prefill over the pool.", "",
                  "| config | floor ms | H ms | P ms | H / P | P % floor | P vs cascade | P vs FI decode |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in pool_rows:
            ms = r["ms"]
            h = ms.get("relay_hybrid_stream") or ms.get("relay_hybrid")
            p = ms["relay_pool"]
            rt = lambda k: f"{ms[k] / p:.2f}x" if ms.get(k) else "-"  # noqa: E731
            lines.append(f"| {r['config']} | {r['floor_ms']:.3f} | {h or 0:.3f} | {p:.3f} | "
                         f"{(h / p if h else 0):.2f}x | {100 * r['floor_ms'] / p:.0f}% | {rt('fi_cascade')} | "
                         f"{rt('fi_decode')} |")
    if res.get("variants"):
        lines += ["", f"## Launch variants ({res.get('variant_path', 'triton')} path)", "", "| config | variant | ms |",
                  "|---|---|---|"]
        for v in res["variants"]:
            lines.append(f"| {v['config']} | {v['variant']} | {v['ms'] if v['ms'] else 'fail'} |")
    with open(os.path.join(out_dir, f"kernels-{dev_tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath


def warm_fi():
    """JIT-compile the FlashInfer modules this benchmark and the GPU tests use (bf16, d=128)."""
    for hq, hkv in ((32, 32), (32, 8), (32, 4)):
        w = make_workload(hq=hq, hkv=hkv, d=128, bs=4, groups_spec=[[(0, 4, 64)]], suffix_lo=8, suffix_hi=16)
        for k in ("fi_decode", "fi_cascade", "relay_fi"):
            t = time.time()
            try:
                fn, _, _ = KERNELS[k](w) if k != "relay_fi" else k_relay_fi(w)
                fn()
                torch.cuda.synchronize()
                log(f"warm {k} {hq}/{hkv}: {time.time() - t:.1f}s")
            except Exception as e:  # noqa: BLE001
                log(f"warm {k} {hq}/{hkv} FAILED: {e!r}"[:400])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--warm-fi", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--configs", default=None, help="regex: only timing configs whose name matches")
    ap.add_argument("--kernels", default=None, help="comma list of timing columns (default all: "
                    + ",".join(KERNELS) + ")")
    ap.add_argument("--no-variants", action="store_true", help="skip the relay-Triton launch variants")
    ap.add_argument("--variants-on-table", action="store_true",
                    help="time the launch variants on the timing table's configs (filtered by --configs) "
                         "instead of their own short list")
    ap.add_argument("--variants-on-ppsm-sweep", action="store_true",
                    help="time the launch variants on ppsm_sweep_configs() (long prefixes, many members; "
                         "with --variants-on-table: both)")
    ap.add_argument("--skip-table", action="store_true", help="no timing table (launch variants only)")
    ap.add_argument("--variant-path", choices=["triton", "server"], default="triton",
                    help="time the launch variants on relay-Triton (Triton suffix launch) or on the server's "
                         "path (FlashInfer suffix decode + the Triton prefix launch on a side stream)")
    ap.add_argument("--variants", default=None,
                    help="comma list: only these launch variants (their configs also filtered by --configs)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new configs after this")
    ap.add_argument("--correctness-s", type=float, default=120.0, help="stop starting new checks after this")
    args = ap.parse_args()
    if args.warm_fi:
        warm_fi()
        return
    deadline = T0 + args.budget_s
    import flashinfer
    import sglang
    import triton

    name = torch.cuda.get_device_name(0)
    dev_tag = "h100" if "H100" in name else ("h200" if "H200" in name else name.replace(" ", "_").lower())
    os.makedirs(args.out, exist_ok=True)
    res = dict(device=name, torch=torch.__version__, triton=triton.__version__, flashinfer=flashinfer.__version__,
               sglang=getattr(sglang, "__version__", "?"), date=datetime.datetime.now().isoformat(timespec="seconds"),
               correctness=[], timing=[], variants=[], variant_path=args.variant_path)
    bw = copy_bandwidth()
    res["copy_bw_TBps"] = bw / 1e12
    log(f"device {name}, copy bandwidth {bw / 1e12:.2f} TB/s")
    if not args.skip_correctness:
        res["correctness"] = correctness_rows(T0 + args.correctness_s)
        write_reports(res, args.out, dev_tag)
        bad = [r for r in res["correctness"] if not r.get("ok")]
        log(f"correctness: {len(res['correctness']) - len(bad)}/{len(res['correctness'])} ok")
    kernels = KERNELS
    if args.kernels:
        unknown = set(args.kernels.split(",")) - set(KERNELS)
        if unknown:
            raise SystemExit(f"unknown kernels {sorted(unknown)}; known: {', '.join(KERNELS)}")
        kernels = {k: KERNELS[k] for k in args.kernels.split(",")}
    res["args"] = vars(args)
    for cname, spec in ([] if args.skip_table else timing_configs(args.quick)):
        if args.configs and not re.search(args.configs, cname):
            continue
        if time.time() > deadline:
            log("timing: deadline reached, skipping", cname)
            continue
        try:
            w = make_workload(**spec)
            row = run_config(cname, w, bw, kernels)
            del w
        except Exception as e:  # noqa: BLE001
            row = dict(config=cname, ms={}, frac_floor={}, plan_ms={}, floor_ms=0.0, error=repr(e)[:300])
            traceback.print_exc()
        res["timing"].append(row)
        log(cname, {k: (round(v, 4) if v else None) for k, v in row["ms"].items()},
            f"floor {row['floor_ms']:.4f}", "plan", {k: round(v, 3) for k, v in row["plan_ms"].items()})
        write_reports(res, args.out, dev_tag)
        torch.cuda.empty_cache()
    # A few launch variants of relay-Triton on two configs (for tuning the defaults).
    variants = {"default": {}, "gather": dict(prefix_slot_runs=False), "bm128": dict(prefix_block_m=128), "bm128_w8": dict(prefix_block_m=128, num_warps_prefix=8),
                "bn32": dict(block_n=32), "stages2": dict(num_stages_prefix=2, num_stages_suffix=2),
                "ppsm1": dict(programs_per_sm=1), "ppsm4": dict(programs_per_sm=4),
                # Two programs per SM, all busy on every step (the default); auto2: a grid of two,
                # a short prefix split for one per SM (planned_programs_per_sm; before the server
                # A/B of session 14, "default" in bench/results/kernels-h100-s14.md meant a grid
                # of one for GQA >= 4 and auto2 otherwise).
                "ppsm2": dict(programs_per_sm=2, concurrent_programs_per_sm=None),
                # Groups in one run of slots on FlashInfer's FA3 over the pool (server path only).
                "pool": dict(prefix="pool", pool_min_rows=512),
                "auto2": dict(programs_per_sm=2, concurrent_programs_per_sm=1),
                "krow": dict(k_row_major=True), "krow_bm128_w8": dict(k_row_major=True, prefix_block_m=128,
                                                                       num_warps_prefix=8),
                # FA3-like prefix tiles (128 x 128, two warpgroups): each KV tile feeds twice the
                # stacked rows, halving the L2 re-reads of a GQA prefix (M = 512 rows per KV head
                # at 128 members); two stages so 128-key K/V tiles fit in shared memory.
                "bm128_bn128_w8_s2": dict(prefix_block_m=128, block_n=128, num_warps_prefix=8,
                                          num_stages_prefix=2, num_stages_suffix=2),
                "bm64_bn128_s2": dict(block_n=128, num_stages_prefix=2, num_stages_suffix=2),
                "bm128_w8_s2_ppsm1": dict(prefix_block_m=128, num_warps_prefix=8, num_stages_prefix=2,
                                          programs_per_sm=1),
                # Suffix programs per SM (default 16).
                "sppsm2": dict(suffix_programs_per_sm=2), "sppsm8": dict(suffix_programs_per_sm=8),
                # Five stages: the slot list makes each K/V load indirect, and Triton 3.6 spends one
                # pipeline stage on the slot load; below five stages its loop waits for every copy
                # at the top of each iteration (``async_wait num=0`` in the TTGIR), so the load
                # latency is exposed once per key tile. 32-key tiles keep five stages small.
                "s5_bn32": dict(block_n=32, num_stages_prefix=5, num_stages_suffix=5),
                "s5_bn32_krow": dict(block_n=32, num_stages_prefix=5, num_stages_suffix=5, k_row_major=True),
                "s5_bn32_ppsm3": dict(block_n=32, num_stages_prefix=5, num_stages_suffix=5, programs_per_sm=3),
                "bm128_bn32_w8_s5": dict(prefix_block_m=128, block_n=32, num_warps_prefix=8, num_stages_prefix=5,
                                         num_stages_suffix=5),
                "bm128_bn32_w8_s5_krow": dict(prefix_block_m=128, block_n=32, num_warps_prefix=8,
                                              num_stages_prefix=5, num_stages_suffix=5, k_row_major=True),
                "s5_krow_ppsm1": dict(num_stages_prefix=5, num_stages_suffix=5, k_row_major=True, programs_per_sm=1),
                "bm128_w8_s5_krow_ppsm1": dict(prefix_block_m=128, num_warps_prefix=8, num_stages_prefix=5,
                                               num_stages_suffix=5, k_row_major=True, programs_per_sm=1)}
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    variant_configs = [] if args.no_variants else [("llama2-7b P=4096 B=128", dict(hq=32, hkv=32, d=128, bs=128, groups_spec=[[(0, 128, 4096)]])),
                        ("llama3-8b P=16384 B=256", dict(hq=32, hkv=8, d=128, bs=256, groups_spec=[[(0, 256, 16384)]])),
                        ("llama3-8b P=8192 B=128 (serving 8K)", dict(hq=32, hkv=8, d=128, bs=128,
                                                                    groups_spec=[[(0, 128, 8192)]],
                                                                    suffix_lo=129, suffix_hi=384)),
                        ("llama2-7b P=8192 B=128 (serving 8K)", dict(hq=32, hkv=32, d=128, bs=128,
                                                                    groups_spec=[[(0, 128, 8192)]],
                                                                    suffix_lo=129, suffix_hi=384)),
                        ("llama2-7b no-sharing 4K B=32", dict(hq=32, hkv=32, d=128, bs=32, groups_spec=[],
                                                              suffix_lo=4096, suffix_hi=4096)),
                        ("llama3-8b no-sharing short B=128", dict(hq=32, hkv=8, d=128, bs=128, groups_spec=[],
                                                                  suffix_lo=129, suffix_hi=384)),
                        # Prefix pass alone (1-token suffixes): the part a launch variant changes.
                        # 17.2 GFLOP per layer on both shapes; the MHA one also reads 4x the bytes.
                        ("llama3-8b P=8192 B=128 prefix only", dict(hq=32, hkv=8, d=128, bs=128,
                                                                   groups_spec=[[(0, 128, 8192)]],
                                                                   suffix_lo=1, suffix_hi=1)),
                        ("llama2-7b P=8192 B=128 prefix only", dict(hq=32, hkv=32, d=128, bs=128,
                                                                   groups_spec=[[(0, 128, 8192)]],
                                                                   suffix_lo=1, suffix_hi=1))]
    if args.variants_on_table or args.variants_on_ppsm_sweep:
        variant_configs = [] if args.no_variants else (
            (list(timing_configs(args.quick)) if args.variants_on_table else [])
            + (list(ppsm_sweep_configs()) if args.variants_on_ppsm_sweep else []))
    for cname, spec in variant_configs:
        if time.time() > deadline:
            break
        if args.configs and not re.search(args.configs, cname):
            continue
        w = make_workload(**spec)
        for vname, opts in variants.items():
            try:
                if args.variant_path == "server":
                    fn, _, _ = k_relay_hybrid(w, prefix_stream=True, **opts)
                else:
                    fn, _, _ = k_relay_triton(w, **opts)
                ms, _ = bench_ms(fn)
            except Exception as e:  # noqa: BLE001
                ms = None
                log("variant failed", vname, repr(e)[:200])
            res["variants"].append(dict(config=cname, variant=vname, ms=ms))
            log("variant", cname, vname, ms)
        del w
        write_reports(res, args.out, dev_tag)
    path = write_reports(res, args.out, dev_tag)
    log("wrote", path)
    with open(os.path.join(args.out, f"kernels-{dev_tag}.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
