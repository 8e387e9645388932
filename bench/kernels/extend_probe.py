"""Extend (prefill) probe: attention of a prefill batch whose requests share one cached prefix.

In a burst behind a long system prompt, every prefill batch after the first is B requests x L new
tokens over the same cached P-token prompt. Decode relay does not touch these batches, and their
attention over the prompt (B x L x P per head, the same math as vanilla's) is what stretches the
median TPOT of the requests already decoding (session 17: relay TPOT - full-batch step 0.9-1.5 ms
per token at 8K/16K MHA, 0.4-0.6 ms on the control). SGLang's FlashInfer backend runs it as:

  * ``ragged``: FlashInfer ragged prefill, causal, each request's new tokens against themselves
    (``backend="auto"``, FA3 on Hopper), plus
  * ``paged-fa2``: FlashInfer paged prefill, non-causal, each request's queries against its cached
    prefix, one request per sequence, page size 1 (``backend="fa2"``, what SGLang 0.5.16 sets),
  * merged by LSE (``flashinfer.merge_state``).

Variants timed here for the prefix part, side by side on the same tensors (per layer, ms):
  * ``paged-fa2``: SGLang's path (above);
  * ``paged-fa3``: the same plan on FlashInfer's FA3 kernel;
  * ``pool-fa3``: the relay way: the B requests' queries stacked into one request against the
    prompt's run of consecutive slots, read in place from the pool (ragged FA3, ``kv_indptr`` =
    absolute slots ``[first, first + P]``, as ``kernels/pool_prefix.py`` does for decode groups);
  * ``pool-fa2``: the same stacked request on FA2 (stacking alone, no kernel change).
Each variant's prefix output and LSE are checked against ``paged-fa2``'s; the full extend output
(prefix + ragged, merged) of ``pool-fa3`` against SGLang's.

    python bench/kernels/extend_probe.py --out OUT       (GPU machine; OUT/extend-probe.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

SHAPES = {  # name: (num_q_heads, num_kv_heads)
    "MHA": (32, 32),
    "GQA-4": (32, 8),
}
HEAD_DIM = 128
NEW_TOKENS = 128  # per request, as in the serving workloads' questions


def bench_ms(fn, reps: int = 20) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=reps * 10, return_mode="median")


def one_config(hq: int, hkv: int, prefix: int, bs: int, dtype=torch.bfloat16) -> dict:
    import flashinfer

    dev = "cuda"
    d, L = HEAD_DIM, NEW_TOKENS
    n_new = bs * L
    # Pool: [pad | prompt run | new tokens], one layer; the prompt starts at an odd slot.
    first = 4097
    slots = first + prefix + n_new + 1024
    g = torch.Generator(device=dev).manual_seed(0)
    k_pool = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    v_pool = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    q = torch.randn(n_new, hq, d, device=dev, dtype=dtype, generator=g)
    k_new = k_pool[first + prefix: first + prefix + n_new]
    v_new = v_pool[first + prefix: first + prefix + n_new]
    scale = d ** -0.5
    i32 = dict(dtype=torch.int32, device=dev)
    qo_indptr = torch.arange(bs + 1, **i32) * L
    ws = lambda: torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # noqa: E731

    # Ragged causal part over the new tokens (what SGLang runs next to the prefix part).
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws(), "NHD", backend="auto")
    ragged.plan(qo_indptr, qo_indptr.clone(), hq, hkv, d, causal=True, q_data_type=dtype, kv_data_type=dtype)

    # Paged prefix part: each request's keys = the prompt's slots (page size 1).
    kv_indptr = torch.arange(bs + 1, **i32) * prefix
    kv_indices = (first + torch.arange(prefix, **i32)).repeat(bs)
    last_page = torch.ones(bs, **i32)
    paged_cache = (k_pool.unsqueeze(1), v_pool.unsqueeze(1))  # [slots, page=1, hkv, d]

    def paged(backend):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws(), "NHD", backend=backend)
        w.plan(qo_indptr, kv_indptr, kv_indices, last_page, hq, hkv, d, 1, causal=False, sm_scale=scale,
               q_data_type=dtype, kv_data_type=dtype)
        return lambda: w.run(q, paged_cache, return_lse=True)

    def pool(backend):
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws(), "NHD", backend=backend)
        w.plan(torch.tensor([0, n_new], **i32), torch.tensor([first, first + prefix], **i32), hq, hkv, d,
               causal=False, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
        return lambda: w.run(q, k_pool, v_pool, return_lse=True)

    variants = {"paged-fa2": paged("fa2"), "paged-fa3": paged("fa3"), "pool-fa3": pool("fa3"),
                "pool-fa2": pool("fa2")}
    row = {"num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d, "prefix": prefix, "requests": bs,
           "new_tokens": L, "ms": {}, "max_abs_vs_paged_fa2": {}, "max_lse_diff_vs_paged_fa2": {}}
    ref_o, ref_lse = variants["paged-fa2"]()
    for name, fn in variants.items():
        try:
            o, lse = fn()
            torch.cuda.synchronize()
            row["max_abs_vs_paged_fa2"][name] = float((o.float() - ref_o.float()).abs().max())
            row["max_lse_diff_vs_paged_fa2"][name] = float((lse - ref_lse).abs().max())
            row["ms"][name] = bench_ms(fn)
        except Exception as e:  # noqa: BLE001 - a variant FlashInfer refuses is reported, not fatal
            row["ms"][name] = None
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
    # The whole extend attention, SGLang's way and the pool way (ragged + prefix + merge).
    rag = lambda: ragged.run(q, k_new, v_new, return_lse=True)  # noqa: E731

    def full(prefix_fn):
        def go():
            o1, s1 = rag()
            o2, s2 = prefix_fn()
            return flashinfer.merge_state(o1, s1, o2, s2)[0]
        return go
    row["ms"]["ragged"] = bench_ms(rag)
    sg, pf = full(variants["paged-fa2"]), full(variants["pool-fa3"])
    row["ms"]["extend-sglang"] = bench_ms(sg)
    if row["ms"]["pool-fa3"] is not None:
        row["ms"]["extend-pool-fa3"] = bench_ms(pf)
        row["extend_max_abs_pool_vs_sglang"] = float((sg().float() - pf().float()).abs().max())
    flops = 4.0 * n_new * prefix * hq * d
    row["prefix_tflops"] = {k: (flops / (v * 1e-3) / 1e12 if v else None) for k, v in row["ms"].items()
                            if k in variants}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--prefixes", default="8192,16384")
    ap.add_argument("--requests", default="32,64")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import flashinfer
    import triton
    res = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "triton": triton.__version__, "flashinfer": flashinfer.__version__,
           "rows": []}
    print(f"{'shape':6} {'P':>6} {'B':>3} | " + " ".join(f"{k:>10}" for k in
          ("paged-fa2", "paged-fa3", "pool-fa3", "pool-fa2", "ragged", "ext-sgl", "ext-pool")), flush=True)
    for name, (hq, hkv) in SHAPES.items():
        for p in map(int, args.prefixes.split(",")):
            for bs in map(int, args.requests.split(",")):
                row = one_config(hq, hkv, p, bs)
                row["shape"] = name
                res["rows"].append(row)
                ms = row["ms"]
                cells = [ms.get(k) for k in ("paged-fa2", "paged-fa3", "pool-fa3", "pool-fa2", "ragged",
                                              "extend-sglang", "extend-pool-fa3")]
                print(f"{name:6} {p:6d} {bs:3d} | " + " ".join(f"{c:10.3f}" if c else f"{'-':>10}" for c in cells),
                      f"| diff {row['max_abs_vs_paged_fa2']} ext {row.get('extend_max_abs_pool_vs_sglang')}",
                      row.get("errors", ""), flush=True)
                with open(os.path.join(args.out, "extend-probe.json"), "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
