"""Prefix-pass probe: the segment kernel's gather loop vs its TMA run loop vs FlashInfer dense.

For the serving shapes whose relay step is bound by the prefix pass (members x heads stacked
against one long shared KV, slots consecutive as SGLang allocates a prompt prefilled in one
piece), times on the GPU, side by side in one run:
  * ``gather``: kernels/triton_segment.py with ``slot_runs=False`` (per-row pointer gathers);
  * ``runs``: the same kernel and work items with ``slot_runs=True`` (each chunk checked to be
    one run of slots, then loaded by TMA), BLOCK_M / BLOCK_N / stages / warps variants;
  * ``fi-ragged-fa2`` / ``fi-ragged-fa3``: FlashInfer's ragged prefill over the same keys
    stored contiguously (fa3 = its Hopper TMA + warp-specialised kernel); fa3 is fed the
    prefix split into chunks as separate requests (queries repeated) so the grid fills the chip.
Each run-loop variant's partials are checked against the gather loop's on the same plan.

    python bench/kernels/prefix_probe.py --out OUT      (GPU machine; OUT/prefix-probe.json)
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


def probe_shape(hq: int, hkv: int, prefix: int, members: int, d: int = 128, flashinfer_rows: bool = True) -> dict:
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
    refs = {}
    for bm, bn in sorted({(v[0], v[1]) for v in TMA_VARIANTS}):
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

    for bm, bn, st, nw in TMA_VARIANTS:
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
        kc, vc = k[first:first + prefix], v[first:first + prefix]  # contiguous [prefix, hkv, d]
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        for backend in ("fa2", "fa3"):
            for nchunks in ((1,) if backend == "fa2" else (1, 4, 8, 16)):
                wr = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
                c = prefix // nchunks
                qo_indptr = torch.arange(nchunks + 1, dtype=torch.int32, device=dev) * members
                kv_indptr = torch.arange(nchunks + 1, dtype=torch.int32, device=dev) * c
                wr.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=False, q_data_type=dt, kv_data_type=dt)
                q_rep = q.repeat(nchunks, 1, 1)
                f = lambda: wr.run(q_rep, kc, vc, return_lse=True)  # noqa: E731
                record(f"fi-ragged-{backend} x{nchunks}", bench_us(f))
    except Exception as e:
        out["rows"]["flashinfer"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print("  flashinfer:", out["rows"]["flashinfer"]["error"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--no-flashinfer", action="store_true", help="Triton launches only (no FlashInfer JIT)")
    args = ap.parse_args()
    import triton
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
               versions=dict(torch=torch.__version__, triton=triton.__version__), shapes={})
    for name, shape in SHAPES.items():
        print(name, flush=True)
        res["shapes"][name] = probe_shape(*shape, flashinfer_rows=not args.no_flashinfer)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefix-probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "prefix-probe.md"), "w") as f:
        f.write(markdown(res))


def markdown(res: dict) -> str:
    """One table per shape: launch, time, TFLOP/s, max |diff| of the partials against the gather loop."""
    out = [f"# Prefix pass: gather loop vs TMA run loop vs FlashInfer dense ({res['device']}, {res['date']})", "",
           f"versions: {res['versions']}; bf16, head_dim 128, prefix slots consecutive; "
           "`python bench/kernels/prefix_probe.py` (`PROBE=1 SKIP_BENCH=1 bash bench/kernels/run_device.sh`)", ""]
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
