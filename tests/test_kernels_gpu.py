"""Relay decode kernels on the GPU: Triton and FlashInfer paths, bf16/fp16, GQA 1/4/8, head dim
64/128/256, prefixes up to 32K, suffixes 0..2048, groups of 1..256, nested groups, and CUDA-graph
capture + replay after a new plan. Skipped without CUDA (FlashInfer JIT-compiles on first use)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HEADS = [(16, 16), (32, 8), (32, 4)]  # GQA 1, 4, 8


def _assert(row):
    assert not row["nan"], row
    assert row["ok"], row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_triton_mixed(dtype, hq, hkv, d):
    from tests._relay_gpu_checks import check

    _assert(check("triton", "mixed", hq=hq, hkv=hkv, d=d, dtype=dtype, seed=hq * 1000 + d))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_triton_k_row_major_variant(dtype, hq, hkv):
    """The K-tile load variant measured by bench/kernels/run.py (``krow``) is exact too."""
    from tests._relay_gpu_checks import check

    _assert(check("triton_krow", "mixed", hq=hq, hkv=hkv, d=128, dtype=dtype, seed=hq * 7 + hkv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_triton_large_prefix_tiles(dtype, hq, hkv, d):
    """The 128 x 128 prefix tile launch (``RELAY_RADIX_PREFIX_TILE=128x128x8x2``) is exact too."""
    from tests._relay_gpu_checks import check

    _assert(check("triton_bm128_bn128", "mixed", hq=hq, hkv=hkv, d=d, dtype=dtype, seed=hq * 11 + d))


@pytest.mark.parametrize("kind", ["big_group", "nested", "no_groups"])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 4)])
def test_triton_shapes(kind, hq, hkv):
    from tests._relay_gpu_checks import check

    _assert(check("triton", kind, hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16, seed=7))


@pytest.mark.parametrize("kind", ["mixed", "nested", "big_group"])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_flashinfer(kind, hq, hkv):
    from tests._relay_gpu_checks import check

    _assert(check("flashinfer", kind, hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16, seed=9))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mixed", "nested", "big_group", "no_groups"])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
@pytest.mark.parametrize("path", ["hybrid", "hybrid_stream", "hybrid_fi", "hybrid_plain", "hybrid_pool"])
def test_hybrid_flashinfer_suffix(path, kind, hq, hkv, dtype):
    """The server's paths: FlashInfer decode suffix state + the groups' prefix states merged in
    place, from the Triton prefix kernel (hybrid; hybrid_stream: on a side stream, concurrent with
    the suffix decode) or FlashInfer's prefill (hybrid_fi: ``RELAY_RADIX_KERNEL=flashinfer``);
    hybrid_plain: hybrid_stream whose plans with no group decode plainly (the plain graph);
    hybrid_pool: hybrid_stream with the pool prefix pass on (its groups here are not in runs, so
    all take the Triton launch beside an idle FA3 launch: see test_slot_runs for the others)."""
    from tests._relay_gpu_checks import check

    if path == "hybrid_pool" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FlashInfer's FA3 prefill needs compute capability 9.x")

    _assert(check(path, kind, hq=hq, hkv=hkv, d=128, dtype=dtype, seed=13))


SLOT_RUN_CASES = [("triton", k, d, dt) for k, d in [("mixed", 64), ("mixed", 128), ("mixed", 256), ("big_group", 128),
                                                   ("nested", 128)] for dt in (torch.bfloat16, torch.float16)]
SLOT_RUN_CASES += [("hybrid_stream", k, 128, torch.bfloat16) for k in ("mixed", "big_group", "nested")]
# The pool prefix pass (FlashInfer FA3 over the pool) for the groups that are one run; head_dim
# 128 only (each dtype x head_dim is one more FA3 module for the GPU machine to JIT-compile).
SLOT_RUN_CASES += [("hybrid_pool", k, 128, dt) for k in ("mixed", "big_group", "nested")
                   for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("path,kind,d,dtype", SLOT_RUN_CASES)
def test_slot_runs(path, kind, d, dtype, hq, hkv):
    """Prefixes in consecutive slots (as SGLang allocates a prompt prefilled in one piece): the
    prefix chunks that are one run take the TMA loop, the chunk across the planted break the
    gather loop (``hybrid_stream`` is the server's default path)."""
    from tests._relay_gpu_checks import check

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA run loop needs compute capability >= 9")
    if path == "hybrid_pool" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FlashInfer's FA3 prefill needs compute capability 9.x")
    _assert(check(path, kind, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=hq * 31 + d, slot_layout="runs"))


@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_pool_prefix_under_cuda_graph(hq, hkv):
    """The pool pass's fixed-request FlashInfer wrapper and its gather/merge tables, captured once
    and replayed after re-plans with other groups, splits, gaps and batch sizes."""
    from tests._relay_gpu_checks import check_pool_graph

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FlashInfer's FA3 prefill needs compute capability 9.x")
    rows = check_pool_graph(hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16)
    for row in rows:
        _assert(row)
    taken = [int(r["case"].split("pool groups ")[1].split("/")[0]) for r in rows]
    assert max(taken) > 0 and min(taken) == 0, taken  # replays with and without pool groups


@pytest.mark.parametrize("slot_layout", ["shuffled", "runs"])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_prefix_stream_under_cuda_graph(hq, hkv, slot_layout):
    """Fork/join of the side-stream prefix launch captured in a CUDA graph and replayed."""
    from tests._relay_gpu_checks import check_stream_graph

    for row in check_stream_graph(hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16, slot_layout=slot_layout):
        _assert(row)


@pytest.mark.parametrize("path,layouts", [("triton", ("shuffled",) * 3), ("flashinfer", ("shuffled",) * 3),
                                          ("triton", ("runs", "shuffled", "runs"))])
def test_cuda_graph_replay_after_replan(path, layouts):
    from tests._relay_gpu_checks import check_graph

    for row in check_graph(path, hq=32, hkv=8, d=128, dtype=torch.bfloat16, slot_layouts=layouts):
        _assert(row)


@pytest.mark.parametrize("slot_layout", ["shuffled", "runs"])
def test_int64_offsets(slot_layout):
    # KV pool with num_slots * num_kv_heads * head_dim > 2**31 elements; live slots at the top
    # (runs: the TMA loop's int32 row coordinates and its int64 tail offsets up there).
    from relay_radix.kernels import relay_decode_triton
    from tests._relay_cases import make_case, reference_device, rel_err

    hkv, d = 8, 128
    num_slots = 2**31 // (hkv * d) + 8192
    small = make_case(bs=16, hq=32, hkv=hkv, d=d, dtype=torch.bfloat16, groups=[(list(range(16)), 3001)],
                      suffix_lens=[100] * 16, device="cuda", seed=5, slot_layout=slot_layout)
    k = torch.empty((num_slots, hkv, d), dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    base = num_slots - small.k.shape[0]
    k[base:], v[base:] = small.k, small.v
    csr = dict(small.csr)
    csr["prefix_kv_indices"] = csr["prefix_kv_indices"] + base
    csr["suffix_kv_indices"] = csr["suffix_kv_indices"] + base
    o, _ = relay_decode_triton(small.q, k, v, sm_scale=small.sm_scale, **csr)
    ref, _ = reference_device(small)
    err, _ = rel_err(o, ref)
    assert err < 1.5e-2 and not torch.isnan(o).any()


@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_server_flashinfer_kernel_graphs(hq, hkv):
    """Per-batch-size graph objects on shared buffers, replayed after re-plans, interleaved."""
    from tests._relay_gpu_checks import check_fi_external_graph

    for row in check_fi_external_graph(hq=hq, hkv=hkv, d=128, dtype=torch.bfloat16):
        _assert(row)


def test_decode_metadata_never_syncs_the_host():
    """The backend's per-step metadata (prefix slot gather, slot-break count, work lists) is built
    while the previous step still runs on the GPU (SGLang's overlap scheduler); a host sync there
    would idle the GPU while the step is launched. torch's sync debug mode turns any synchronising
    copy into an error. The gathered slots are checked against slicing on the host."""
    from relay_radix.kernels.triton_relay import TritonRelayDecode
    from relay_radix.kv_slots import PrefixSlotRuns, gather_ranges

    dev = torch.device("cuda")
    req_to_token = torch.randint(0, 1 << 20, (8, 4096), dtype=torch.int32, device=dev)
    rows, starts, lens = torch.tensor([3, 5], dtype=torch.int32), torch.tensor([0, 100], dtype=torch.int32), \
        torch.tensor([1000, 37])
    dev_rows = rows.to(dev)
    pool = "fa3" if torch.cuda.get_device_capability()[0] == 9 else None  # + FlashInfer's pool-pass plan
    kernel = TritonRelayDecode(32, 8, 128, torch.bfloat16, dev, max_bs=8, max_groups=2, max_members=8,
                               max_prefix_tokens=2048, max_suffix_tokens=0, external_suffix=True, prefix_pool=pool)
    counter = PrefixSlotRuns()
    keys = [(11, 0, 1000), (12, 100, 137)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the third plan reuses the first staging buffer
            idx = gather_ranges(req_to_token, rows, starts, lens)
            idx_dev_rows = gather_ranges(req_to_token, dev_rows, starts, lens)
            counter.count(idx, lens, keys)
            first = counter.run_starts(keys)
            first[0] = 5  # as if group 0 were one run: the pool pass plans it
            kernel.plan(prefix_kv_indices=idx, suffix_kv_indices=None, prefix_lens_cpu=lens,
                        member_indptr_cpu=torch.tensor([0, 4, 8]), member_rows_cpu=torch.arange(8),
                        suffix_lens_cpu=torch.ones(8, dtype=torch.int64), prefix_first_slot_cpu=first)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    host = req_to_token.cpu()
    expected = torch.cat([host[3, :1000], host[5, 100:137]])
    assert torch.equal(idx.cpu(), expected) and torch.equal(idx_dev_rows.cpu(), expected)
    torch.cuda.synchronize()
    assert counter.poll() is not None
    assert counter.run_starts(keys).tolist() == [-1, -1]  # random slots: no run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_extend_pool_matches_sglang_paged_prefix(dtype, hq, hkv):
    """The extend pool pass (FA3 over the pool, runs' requests stacked, in a non-batch order, with a
    gap and a request with no cached prefix) against what it replaces in SGLang's FlashInfer extend:
    the paged FA2 prefill over each request's cached prefix, and both against float64."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 needs a Hopper GPU")
    import math

    import flashinfer

    from relay_radix.kernels.extend_pool import ExtendPoolPass, plan_extend_pool
    from relay_radix.reference import attention_state

    dev, d = "cuda", 128
    g = torch.Generator(device=dev).manual_seed(hq + hkv)
    slots = 12000
    k = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(slots, hkv, d, device=dev, dtype=dtype, generator=g)
    # Requests: prompt B at slot 7001 (P=2500), none, prompt A at 1003 (P=4000), B, A, A.
    first = [7001, -1, 1003, 7001, 1003, 1003]
    plen = [2500, 0, 4000, 2500, 4000, 4000]
    elen = [37, 64, 128, 5, 200, 1]
    pp, why = plan_extend_pool(first, plen, elen, min_pairs=1)
    assert why == "planned" and pp.groups == 2 and not pp.in_batch_order
    n = sum(elen)
    q = torch.randn(n, hq, d, device=dev, dtype=dtype, generator=g)
    scale = d ** -0.5
    p = ExtendPoolPass(hq, hkv, d, dtype, dev)
    p.plan(pp)
    o, lse2 = p.forward_return_lse(q, (k, v), causal=False, sm_scale=scale)
    # SGLang's paged prefill over the same prefixes (page size 1), FA2 as in 0.5.16.
    i32 = dict(dtype=torch.int32, device=dev)
    qo_indptr = torch.tensor([0] + list(torch.tensor(elen).cumsum(0)), **i32)
    kv_indptr = torch.tensor([0] + list(torch.tensor(plen).cumsum(0)), **i32)
    kv_indices = torch.cat([torch.arange(f, f + pl, **i32) for f, pl in zip(first, plen) if pl])
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev),
                                                       "NHD", backend="fa2")
    w.plan(qo_indptr, kv_indptr, kv_indices, torch.ones(len(elen), **i32), hq, hkv, d, 1, causal=False,
           sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
    o_ref, lse_ref = w.run(q, (k.unsqueeze(1), v.unsqueeze(1)), return_lse=True)
    empty = slice(37, 101)  # the request with no cached prefix
    assert torch.all(o[empty] == 0) and torch.all(torch.isneginf(lse2[empty]))
    keep = torch.ones(n, dtype=torch.bool, device=dev)
    keep[empty] = False
    assert (o[keep].float() - o_ref[keep].float()).abs().max().item() < 2e-2
    assert (lse2[keep] - lse_ref[keep]).abs().max().item() < 1e-2
    t = 0
    for f, pl, ne in zip(first, plen, elen):  # float64 on a few tokens of each request
        if pl:
            rows = [t, t + ne - 1]
            kk = k[f:f + pl].double().unsqueeze(0).expand(len(rows), -1, -1, -1)
            vv = v[f:f + pl].double().unsqueeze(0).expand(len(rows), -1, -1, -1)
            ro, rl = attention_state(q[rows].double(), kk, vv, None, scale)
            assert (o[rows].double() - ro).abs().max().item() < 2e-2
            assert (lse2[rows].double() * math.log(2) - rl).abs().max().item() < 1e-2
        t += ne
