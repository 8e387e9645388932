"""Prefix-pass probe: the segment kernel's gather loop vs its TMA run loop vs FlashInfer dense.

For the serving shapes whose relay step is bound by the prefix pass (members x heads stacked
against one long shared KV, slots consecutive as SGLang allocates a prompt prefilled in one
piece), times on the GPU, side by side in one run:
  * ``gather``: kernels/triton_segment.py with ``slot_runs=False`` (per-row pointer gathers);
  * ``runs``: the same kernel and work items with ``slot_runs=True`` (each chunk checked to be
    one run of slots, then loaded by TMA), BLOCK_M / BLOCK_N / stages / warps variants;
  * ``fi-ragged-fa2`` / ``fi-ragged-fa3``: FlashInfer's ragged prefill with k/v = the run's slice
    of the pool, ``k[first:first+P]`` (a view, not a copy: a consecutive run of slots is already a
    dense ``[P, hkv, d]`` region), kv_indptr from 0 (fa3 = its Hopper TMA + warp-specialised
    kernel); fa3 is fed the prefix split into chunks as separate requests (queries repeated) so
    the grid fills the chip.
  * ``fi-pool-fa3 xN`` / ``fi-pool-fa2 x1``: the same, but k/v = the whole pool ``[num_slots, hkv, d]``
    and request i's keys the absolute indptr range ``[first + i*P/N, first + (i+1)*P/N)``: what one
    launch over several groups' runs needs. ``+gap`` adds a qo_len-0 request over slots
    ``[0, first)`` and one over ``[first+P, num_slots)`` (how far-apart runs would be bridged;
    kv_indptr must not decrease, so runs go in slot order); ``graph`` captures the run in a CUDA
    graph (``use_cuda_graph=True``), re-plans with uneven splits, then replays.
Each run-loop variant's partials are checked against the gather loop's on the same plan; each
FlashInfer row's N split outputs are merged by their base-2 LSE and checked against a float32
reference on the first and last KV heads.

Why kv_indptr may start at ``first`` (read in FlashInfer's source, 0.6/0.7-era files in
flashinfer-ai/flashinfer; the GPU run is the judge): ``BatchPrefillWithRaggedKVCacheWrapper.plan``
(flashinfer/prefill.py) only takes ``kv_len_arr = kv_indptr_host[1:] - kv_indptr_host[:-1]`` and
checks ``q.size(0) == qo_indptr[-1]`` at run, nothing about ``k.size(0)`` or ``kv_indptr[0]``;
fa3: ``PrefillSM90Plan`` (include/flashinfer/attention/scheduler.cuh) copies ``kv_indptr_h[i]``
into each work item, and the kernel (hopper/mainloop.cuh ``load``) TMA-loads K/V tiles at row
``kv_indptr`` of a tensor of ``nnz_kv = k.size(0)`` rows (csrc/batch_prefill_sm90.cu,
hopper/utils.cuh ``get_local_tile_tensor``); keys of a partial last tile past the run are masked
by ``kv_idx >= kv_len`` (hopper/mainloop_mma.cuh); fa2: ``k + (kv_indptr[request_idx] +
chunk_start + ...) * k_stride_n`` (include/flashinfer/attention/prefill.cuh). A qo_len-0 request
makes no work item in either planner (``ceil_div(qo_len, cta_tile_q) == 0`` tiles).

    python bench/kernels/prefix_probe.py --out OUT      (GPU machine; OUT/prefix-probe.json)
    python bench/kernels/prefix_probe.py --out OUT --only pool
        (the default Triton launch, fi-ragged-fa3 x4 and the fi-pool rows only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from relay_radix.kernels.triton_relay import TritonRelayDecode  # noqa: E402
from relay_radix.kernels.triton_segment import launch_segment_attention  # noqa: E402

SHAPES = {  # name: (num_q_heads, num_kv_heads, prefix tokens, members)
    "GQA-4 8K x128": (32, 8, 8192, 128),
    "GQA-4 16K x128": (32, 8, 16384, 128),
    "MHA 16K x128": (32, 32, 16384, 128),
    "MHA 8K x128": (32, 32, 8192, 128),
}
# (block_m, block_n, stages, warps); the first is the server's default launch. Triton 3.6's
# automatic warp specialization (tl.range(..., warp_specialize=True) on the TMA loop) was measured
# here too and left out: no gain on the H100 (GQA-4 8K x 128: 54.1 against 46.8 us; the others
# within 2%; bench/results/raw/prefix-probe-h100-s11-warpspec.md).
TMA_VARIANTS = [
    (64, 64, 3, 4), (64, 64, 4, 4), (64, 32, 4, 4), (128, 64, 3, 8), (128, 64, 4, 8), (64, 64, 2, 4),
]


def bench_us(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def split_indptr(nsplit: int, members: int, prefix: int, kv_start: int = 0, dev: str = "cuda"):
    """One group's prefix cut into ``nsplit`` FlashInfer requests: ``qo_indptr``, ``kv_indptr``
    ``[nsplit+1]`` int32 (device). Request i = all ``members`` queries (q repeated per request)
    against keys ``kv_start + [i*prefix//nsplit, (i+1)*prefix//nsplit)``; ``kv_start=0`` indexes
    the run's slice of the pool, ``kv_start=first`` the whole pool."""
    i = torch.arange(nsplit + 1, dtype=torch.int64)
    return (i * members).to(torch.int32).to(dev), (kv_start + i * prefix // nsplit).to(torch.int32).to(dev)


def merge_splits(o: torch.Tensor, lse2: torch.Tensor, nsplit: int):
    """Exact merge of ``nsplit`` states per query: ``o`` ``[nsplit*M, H, D]``, ``lse2``
    ``[nsplit*M, H]`` fp32 base 2 (FlashInfer's convention) -> fp32 ``[M, H, D]``, ``[M, H]``.
    In torch rather than ``flashinfer.merge_states`` so the check needs no extra JIT module."""
    o = o.float().unflatten(0, (nsplit, -1))
    lse2 = lse2.unflatten(0, (nsplit, -1))
    m = lse2.max(0).values
    w = torch.exp2(lse2 - m)
    s = w.sum(0)
    return (w[..., None] * o).sum(0) / s[..., None], m + torch.log2(s)


def reference_heads(q, kc, vc, sm_scale, kv_heads):
    """fp32 attention of all members over the dense prefix ``kc``/``vc`` ``[P, hkv, d]`` for the
    query heads of ``kv_heads``: {kv head: (o [M, gqa, d] fp32, lse2 [M, gqa] base 2)}."""
    g = q.shape[1] // kc.shape[1]
    out = {}
    for h in kv_heads:
        s = torch.einsum("mgd,pd->mgp", q[:, h * g:(h + 1) * g].float(), kc[:, h].float()) * sm_scale
        lse = torch.logsumexp(s, -1)
        out[h] = (torch.einsum("mgp,pd->mgd", torch.exp(s - lse[..., None]), vc[:, h].float()),
                  lse / 0.6931471805599453)
    return out


def probe_shape(hq: int, hkv: int, prefix: int, members: int, d: int = 128, flashinfer_rows: bool = True,
                only_pool: bool = False) -> dict:
    dev, dt = "cuda", torch.bfloat16
    num_slots = prefix + 4096
    k = torch.randn(num_slots, hkv, d, dtype=dt, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(members, hq, d, dtype=dt, device=dev)
    first = 1000
    slots = torch.arange(first, first + prefix, dtype=torch.int32, device=dev)
    sm_scale = d ** -0.5
    flops = 4.0 * members * hq * prefix * d
    out = dict(flops=flops, rows={})

    def plan_for(block_m: int, block_n: int) -> TritonRelayDecode:
        w = TritonRelayDecode(hq, hkv, d, dt, dev, max_bs=members, max_groups=1, max_members=members,
                              max_prefix_tokens=prefix, max_suffix_tokens=1, external_suffix=True,
                              prefix_block_m=block_m, block_n=block_n)
        w.plan(prefix_kv_indices=slots, suffix_kv_indices=None, prefix_lens_cpu=torch.tensor([prefix]),
               member_indptr_cpu=torch.tensor([0, members]), member_rows_cpu=torch.arange(members),
               suffix_lens_cpu=torch.zeros(members, dtype=torch.int64))
        return w

    def args(w):
        return dict(q=q, k_buffer=k, v_buffer=v, kv_indices=w._prefix_kv_indices, rows=w.member_rows,
                    slot_base=w.prefix_slot_base, work=w.prefix_work, num_work=w.num_prefix_work,
                    part_o=w.part_o, part_lse=w.part_lse, sm_scale=sm_scale, num_programs=w.prefix_programs)

    def record(name, us, **extra):
        out["rows"][name] = dict(us=round(us, 2), tflops=round(flops / us / 1e6, 1), **extra)
        print(f"  {name:28s} {us:8.1f} us  {flops / us / 1e6:6.1f} TFLOP/s {extra or ''}", flush=True)

    # Reference partials: the gather loop (default launch for BLOCK_M 64, two warpgroups for 128).
    variants = TMA_VARIANTS[:1] if only_pool else TMA_VARIANTS
    refs = {}
    for bm, bn in sorted({(v[0], v[1]) for v in variants}):
        w = plan_for(bm, bn)
        a = args(w)
        f = lambda: launch_segment_attention(**a, logit_cap=0.0, block_m=w.prefix_block_m, block_n=bn,  # noqa: E731
                                             num_warps=4 if bm == 64 else 8, num_stages=3)
        f()
        torch.cuda.synchronize()
        n = w.last_plan.num_parts
        refs[(bm, bn)] = (w.part_o[:n].clone(), w.part_lse[:n].clone())
        if bn == 64:
            record(f"gather bm{bm} bn{bn}", bench_us(f), work=int(w.last_plan.prefix_work.shape[0]),
                   chunk=w.last_plan.prefix_chunk)

    for bm, bn, st, nw in variants:
        w = plan_for(bm, bn)
        a = args(w)
        f = lambda: launch_segment_attention(**a, logit_cap=0.0, block_m=w.prefix_block_m, block_n=bn,  # noqa: E731
                                             num_warps=nw, num_stages=st, slot_runs=True)
        name = f"runs bm{bm} bn{bn} s{st} w{nw}"
        try:
            w.part_o.fill_(float("nan"))
            f()
            torch.cuda.synchronize()
            n = w.last_plan.num_parts
            ro, rl = refs[(bm, bn)]
            err = float((w.part_o[:n] - ro).abs().max())
            lerr = float((w.part_lse[:n] - rl).abs().max())
            record(name, bench_us(f), max_abs_diff_o=err, max_abs_diff_lse=lerr)
        except Exception as e:  # a variant that does not compile or fit is reported, not fatal
            out["rows"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"  {name}: {out['rows'][name]['error']}", flush=True)

    if not flashinfer_rows:
        return out
    try:
        import flashinfer
    except Exception as e:
        out["rows"]["flashinfer"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print("  flashinfer:", out["rows"]["flashinfer"]["error"], flush=True)
        return out
    kc, vc = k[first:first + prefix], v[first:first + prefix]  # the run: a view, [prefix, hkv, d] contiguous
    ref = reference_heads(q, kc, vc, sm_scale, sorted({0, hkv - 1}))
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def check(o, lse2, nsplit):
        """max |diff| of the LSE-merged split outputs against the fp32 reference heads."""
        mo, ml = merge_splits(o, lse2, nsplit)
        g = hq // hkv
        return dict(
            max_abs_diff_o=max(float((mo[:, h * g:(h + 1) * g] - ro).abs().max()) for h, (ro, _) in ref.items()),
            max_abs_diff_lse=max(float((ml[:, h * g:(h + 1) * g] - rl).abs().max()) for h, (_, rl) in ref.items()))

    def fi_row(name, backend, nsplit, kbuf, vbuf, qo_indptr, kv_indptr, q_rows, graph_replan=None):
        """Plan + time one ragged-prefill launch; errors are reported in the row (the GPU run is
        the judge of what FlashInfer accepts). ``graph_replan``: (qo_indptr, kv_indptr) planned
        after capturing the run in a CUDA graph; the timed and checked call is then the replay."""
        try:
            kw = {}
            if graph_replan is not None:
                kw = dict(use_cuda_graph=True, qo_indptr_buf=torch.empty_like(qo_indptr),
                          kv_indptr_buf=torch.empty_like(kv_indptr))
            wr = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend, **kw)
            plan = lambda qi, ki: wr.plan(qi, ki, hq, hkv, d, causal=False, sm_scale=sm_scale,  # noqa: E731
                                          q_data_type=dt, kv_data_type=dt)
            plan(qo_indptr, kv_indptr)
            o = torch.empty_like(q_rows)
            lse2 = torch.empty(q_rows.shape[:2], dtype=torch.float32, device=dev)
            f = lambda: wr.run(q_rows, kbuf, vbuf, out=o, lse=lse2, return_lse=True)  # noqa: E731
            f()  # also the warm-up a capture needs
            if graph_replan is not None:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    f()
                plan(*graph_replan)  # new split points into the same fixed buffers, then replay
                o.fill_(float("nan"))
                f = g.replay
            f()
            torch.cuda.synchronize()
            record(name, bench_us(f), **check(o, lse2, nsplit))
        except Exception as e:
            out["rows"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"  {name}: {out['rows'][name]['error']}", flush=True)

    # The run's slice (kc/vc), prefix split into N requests, queries repeated: the fa3 grid only
    # fills the chip with several requests per group.
    sliced = [("fa3", 4)] if only_pool else [("fa2", 1), ("fa3", 1), ("fa3", 4), ("fa3", 8), ("fa3", 16)]
    for backend, n in sliced:
        fi_row(f"fi-ragged-{backend} x{n}", backend, n, kc, vc, *split_indptr(n, members, prefix), q.repeat(n, 1, 1))
    # The whole pool as k/v, kv_indptr absolute (first + split points): several groups in one launch.
    for backend, n in [("fa3", 1), ("fa3", 2), ("fa3", 4), ("fa3", 8), ("fa2", 1)]:
        fi_row(f"fi-pool-{backend} x{n}", backend, n, k, v, *split_indptr(n, members, prefix, first), q.repeat(n, 1, 1))
    # Gaps bridged by qo_len-0 requests: [0, first) before the run, [first+P, num_slots) after.
    qi, ki = split_indptr(4, members, prefix, first)
    z = torch.zeros(1, dtype=torch.int32, device=dev)
    for backend in ("fa3", "fa2"):
        fi_row(f"fi-pool-{backend} x4 +gap", backend, 4, k, v, torch.cat([z, qi, qi[-1:]]),
               torch.cat([z, ki, z + num_slots]), q.repeat(4, 1, 1))
    # CUDA graph: captured on even splits, replayed after a plan with uneven ones (same batch size).
    cuts = torch.tensor([0, prefix // 8, prefix // 2, 3 * prefix // 4, prefix], dtype=torch.int32, device=dev)
    fi_row("fi-pool-fa3 x4 graph", "fa3", 4, k, v, qi, ki, q.repeat(4, 1, 1), graph_replan=(qi, first + cuts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--no-flashinfer", action="store_true", help="Triton launches only (no FlashInfer JIT)")
    ap.add_argument("--only", choices=["pool"],
                    help="pool: the default Triton launch, fi-ragged-fa3 x4 and the fi-pool rows")
    args = ap.parse_args()
    import triton
    versions = dict(torch=torch.__version__, triton=triton.__version__)
    try:
        import flashinfer
        versions["flashinfer"] = flashinfer.__version__
    except Exception:
        pass
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), versions=versions,
               shapes={})
    for name, shape in SHAPES.items():
        print(name, flush=True)
        res["shapes"][name] = probe_shape(*shape, flashinfer_rows=not args.no_flashinfer, only_pool=args.only == "pool")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefix-probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "prefix-probe.md"), "w") as f:
        f.write(markdown(res))


def markdown(res: dict) -> str:
    """One table per shape: launch, time, TFLOP/s, max |diff| (Triton run loops: partials against the
    gather loop's; FlashInfer rows: LSE-merged output and base-2 LSE against fp32 on two KV heads)."""
    out = [f"# Prefix pass: gather loop vs TMA run loop vs FlashInfer dense ({res['device']}, {res['date']})", "",
           f"versions: {res['versions']}; bf16, head_dim 128, prefix slots consecutive; "
           "`python bench/kernels/prefix_probe.py` (`PROBE=1 SKIP_BENCH=1 bash bench/kernels/run_device.sh`); "
           "diff: Triton run loops against the gather loop's partials, FlashInfer rows (splits merged by "
           "LSE) against fp32 on two KV heads, LSE base 2", ""]
    for name, sh in res["shapes"].items():
        out += [f"## {name} ({sh['flops'] / 1e9:.1f} GFLOP)", "", "| launch | us | TFLOP/s | max abs diff o / lse |",
                "|---|---|---|---|"]
        for row, r in sh["rows"].items():
            if "error" in r:
                out.append(f"| {row} | error: {r['error'][:80]} | | |")
                continue
            diff = f"{r['max_abs_diff_o']:.1e} / {r['max_abs_diff_lse']:.1e}" if "max_abs_diff_o" in r else ""
            out.append(f"| {row} | {r['us']} | {r['tflops']} | {diff} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
