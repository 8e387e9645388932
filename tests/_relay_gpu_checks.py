"""GPU correctness checks shared by tests/test_kernels_gpu.py and bench/kernels/run.py.

Each check draws fresh random inputs, poisons the output (NaN) before the run, compares with
the float64 oracle (``reference_device``: the reference's math on the device) and returns a
row ``{path, dtype, hq, hkv, d, case, rel_err, max_abs, nan, ok}``. NaN never passes.
"""

from __future__ import annotations

import torch

from tests._relay_cases import make_case, plan_kwargs, random_groups, reference_device, rel_err

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def build_case(kind: str, *, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int, bs: int | None = None):
    g = torch.Generator().manual_seed(seed)
    if kind == "mixed":  # several + nested groups, rows in no group, suffixes 0..2048
        bs = bs or 48
        groups = random_groups(bs, seed=seed, max_prefix=4096, max_group=16)
        suffix = torch.randint(0, 2049, (bs,), generator=g).tolist()
    elif kind == "big_group":  # one group of 256 with a 32K prefix
        bs = bs or 256
        groups = [(list(range(bs)), 32768)]
        suffix = torch.randint(0, 2049, (bs,), generator=g).tolist()
    elif kind == "nested":  # 2 levels: all rows share 2K, 4 subgroups share 1..3K more
        bs = bs or 64
        groups = [(list(range(bs)), 2048)] + [
            (list(range(i, i + bs // 4)), int(torch.randint(1, 3072, (1,), generator=g))) for i in range(0, bs, bs // 4)]
        suffix = torch.randint(1, 513, (bs,), generator=g).tolist()
    elif kind == "no_groups":
        bs = bs or 32
        groups = []
        suffix = torch.randint(1, 4097, (bs,), generator=g).tolist()
    else:
        raise ValueError(kind)
    return make_case(bs=bs, hq=hq, hkv=hkv, d=d, dtype=dtype, groups=groups, suffix_lens=suffix,
                     device="cuda", seed=seed, extra_slots=1000)


def _capacity(case, extra: int = 0) -> dict:
    c = case.csr
    return dict(max_bs=case.q.shape[0] + extra, max_groups=c["member_indptr"].numel() - 1 + 8,
                max_members=c["member_rows"].numel() + 8 + extra,
                max_prefix_tokens=c["prefix_kv_indices"].numel() + 70000,
                max_suffix_tokens=c["suffix_kv_indices"].numel() + 70000)


def make_wrapper(path: str, case, *, graph: bool = False, **cap):
    hq, d = case.q.shape[1], case.q.shape[2]
    hkv = case.k.shape[1]
    cap = cap or _capacity(case)
    if path == "triton":
        from relay_radix.kernels import TritonRelayDecode

        return TritonRelayDecode(hq, hkv, d, case.q.dtype, "cuda", **cap)
    from relay_radix.kernels import FlashInferRelayDecode

    return FlashInferRelayDecode(hq, hkv, d, case.q.dtype, "cuda", use_cuda_graph=graph, **cap)


def _plan(path, w, case):
    kw = plan_kwargs(case)
    if path == "flashinfer":
        kw["sm_scale"] = case.sm_scale
    w.plan(**kw)


def check(path: str, kind: str, *, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0) -> dict:
    case = build_case(kind, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=seed)
    w = make_wrapper(path, case)
    _plan(path, w, case)
    o = torch.full_like(case.q, float("nan"))
    w.run(case.q, case.k, case.v, o, sm_scale=case.sm_scale)
    torch.cuda.synchronize()
    ref, _ = reference_device(case)
    return _row(path, kind, case, o, ref)


def _row(path, kind, case, o, ref) -> dict:
    err, mx = rel_err(o, ref)
    nan = bool(torch.isnan(o).any())
    dtype = case.q.dtype
    return dict(path=path, case=kind, dtype=str(dtype).replace("torch.", ""), hq=case.q.shape[1],
                hkv=case.k.shape[1], d=case.q.shape[2], bs=case.q.shape[0], rel_err=err, max_abs=mx, nan=nan,
                ok=(not nan) and err < TOL[dtype])


def check_graph(path: str, *, hq: int, hkv: int, d: int, dtype: torch.dtype) -> list[dict]:
    """Capture run() once after plan A, then plan B (other groups, other lengths), replay, check;
    then plan C, replay, check. FlashInfer graph mode keeps the batch size fixed."""
    bs = 40
    cases = [build_case("mixed", hq=hq, hkv=hkv, d=d, dtype=dtype, seed=s, bs=bs) for s in (101, 102, 103)]
    if path == "triton":  # Triton graphs accept a smaller live batch too
        cases[2] = build_case("mixed", hq=hq, hkv=hkv, d=d, dtype=dtype, seed=103, bs=29)
    # One KV pool / q buffer for all plans (the graph reads fixed addresses): copy each case in.
    nslots = max(c.k.shape[0] for c in cases)
    k = torch.empty((nslots, hkv, d), dtype=dtype, device="cuda")
    v = torch.empty_like(k)
    q = torch.empty((bs, hq, d), dtype=dtype, device="cuda")
    o = torch.empty_like(q)
    cap = dict(max_bs=bs, max_groups=64, max_members=bs * 2, max_prefix_tokens=sum(
        c.csr["prefix_kv_indices"].numel() for c in cases), max_suffix_tokens=sum(
        c.csr["suffix_kv_indices"].numel() for c in cases))
    w = make_wrapper(path, cases[0], graph=True, **cap)

    def load(c):
        k[: c.k.shape[0]].copy_(c.k)
        v[: c.v.shape[0]].copy_(c.v)
        q[: c.q.shape[0]].copy_(c.q)
        _plan(path, w, c)

    load(cases[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w.run(q, k, v, o, sm_scale=cases[0].sm_scale)  # warm-up (compiles) outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, k, v, o, sm_scale=cases[0].sm_scale)
    rows = []
    for c in cases[1:] + cases[:1]:
        load(c)
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        n = c.q.shape[0]
        ref, _ = reference_device(c)
        rows.append(_row(path + "+graph", "replan", c, o[:n], ref))
    return rows
