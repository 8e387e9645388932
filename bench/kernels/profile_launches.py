"""Per-launch GPU time of the relay decode kernels (torch.profiler), next to a dense reference.

Answers "which launch is the time" for a few bench configs: the prefix segment kernel, the
suffix kernel (or FlashInfer decode), the merge. The dense references are PyTorch's
scaled_dot_product_attention (FlashAttention-2 and cuDNN backends) over the same stacked prefix
queries and the same number of keys stored contiguously: what the prefix pass would cost with no
slot gather.

    python bench/kernels/profile_launches.py --out OUT     (GPU machine; writes OUT/profile.json)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from bench.kernels.run import KERNELS, make_workload, timing_configs  # noqa: E402

CONFIGS = {
    "llama3-8b P=8192 B=128 prefix only": dict(hq=32, hkv=8, d=128, bs=128, groups_spec=[[(0, 128, 8192)]],
                                               suffix_lo=1, suffix_hi=1),
    "llama2-7b P=8192 B=128 prefix only": dict(hq=32, hkv=32, d=128, bs=128, groups_spec=[[(0, 128, 8192)]],
                                               suffix_lo=1, suffix_hi=1),
    "llama3-8b P=8192 B=128 (serving 8K)": dict(hq=32, hkv=8, d=128, bs=128, groups_spec=[[(0, 128, 8192)]],
                                                suffix_lo=129, suffix_hi=384),
    # Nothing shared (the serving control's step): relay's launches beyond FlashInfer decode.
    "llama3-8b no-sharing short B=128": dict(hq=32, hkv=8, d=128, bs=128, groups_spec=[],
                                             suffix_lo=129, suffix_hi=384),
}


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of each kernel name launched by ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            out[ev.key[:90]] = t / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def dense_reference_us(hq: int, hkv: int, d: int, members: int, keys: int, backend: str) -> float:
    """SDPA over [1, hkv, members * gqa, d] queries x [1, hkv, keys, d] contiguous keys
    (``backend``: ``FLASH_ATTENTION`` (FA2) or ``CUDNN_ATTENTION``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    gqa = hq // hkv
    q = torch.randn(1, hkv, members * gqa, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, hkv, keys, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        return do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--kernels", default="fi_decode,relay_triton,relay_hybrid_stream,relay_fi,relay_fi_fa3")
    ap.add_argument("--configs", default=None,
                    help="regex over these configs and the kernel table's (bench/kernels/run.py timing_configs)")
    args = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(), configs={})
    # With --configs, the kernel table's configs (bench/kernels/run.py) can be picked as well.
    configs = {**dict(timing_configs(quick=False)), **CONFIGS} if args.configs else CONFIGS
    for name, spec in configs.items():
        if args.configs and not re.search(args.configs, name):
            continue
        w = make_workload(**spec)
        row = dict(launches={})
        for kname in args.kernels.split(","):
            fn, _, _ = KERNELS[kname](w)
            row["launches"][kname] = kernel_times(fn)
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION") if spec["groups_spec"] else ():
            try:
                row[f"dense_{backend}_us"] = dense_reference_us(
                    spec["hq"], spec["hkv"], spec["d"], spec["bs"], spec["groups_spec"][0][0][2], backend)
            except Exception as e:  # noqa: BLE001
                row[f"dense_{backend}_us"] = repr(e)[:200]
        res["configs"][name] = row
        print(f"== {name}: dense SDPA over the prefix, contiguous keys:",
              {k: v for k, v in row.items() if k.startswith("dense_")})
        for kname, launches in row["launches"].items():
            for kn, us in launches.items():
                print(f"   {kname:22s} {us:8.1f} us  {kn}")
        del w
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
