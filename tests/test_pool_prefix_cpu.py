"""The pool prefix pass on the CPU: its request plan (NumPy), the run table that feeds it
(``PrefixSlotRuns``), and the relay kernel with the pass attended by a float32 PyTorch loop
(``prefix_pool="torch"``: the same requests, gather and merge as FlashInfer's FA3 would get),
against the float64 oracle. FA3 itself runs in tests/test_kernels_gpu.py."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from relay_radix.kernels.pool_prefix import plan_pool_requests
from relay_radix.kv_slots import PrefixSlotRuns, slot_run_starts
from tests._relay_cases import make_case, plan_kwargs, rel_err


def _requests(pp):
    """Live requests as (qo_len, kv_start, kv_end) from the padded indptr arrays."""
    return [(int(pp.qo_indptr[i + 1] - pp.qo_indptr[i]), int(pp.kv_indptr[i]), int(pp.kv_indptr[i + 1]))
            for i in range(pp.num_requests)]


def test_pool_requests_cover_each_run_once():
    """Groups in runs go to the pass in slot order, each segment cut into its splits exactly once,
    members gathered once per split; a group that is not a run, one that overlaps an earlier run
    and one with no member are left out; gaps between runs are query-less requests; padding
    requests have neither queries nor keys; each row's entries point at its own output rows."""
    first = [1000, 50, -1, 60, 3000, 5000]
    lens = [600, 700, 300, 100, 400, 256]
    members = [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9], [1, 2], [0, 9], []]
    indptr = np.cumsum([0] + [len(m) for m in members])
    rows = np.array([r for m in members for r in m])
    pp = plan_pool_requests(first, lens, indptr, rows, bs=10, gqa=4, num_kv_heads=2, num_sms=32,
                            max_requests=40, max_rows=200, min_piece=64, min_rows=1)
    assert pp.taken.tolist() == [True, True, False, False, True, False]
    reqs = _requests(pp)
    assert all(a <= b for a, b in zip(pp.kv_indptr[:-1], pp.kv_indptr[1:])), "kv_indptr must not decrease"
    assert all(q == 0 and k0 == k1 for q, k0, k1 in [
        (int(pp.qo_indptr[i + 1] - pp.qo_indptr[i]), int(pp.kv_indptr[i]), int(pp.kv_indptr[i + 1]))
        for i in range(pp.num_requests, pp.qo_indptr.size - 1)]), "padding requests must be empty"
    covered = {}
    for i, (nq, k0, k1) in enumerate(reqs):
        if nq == 0:
            continue  # a gap
        r = pp.q_rows[pp.qo_indptr[i]:pp.qo_indptr[i + 1]].tolist()
        g = next(g for g in range(len(first)) if pp.taken[g] and first[g] <= k0 < first[g] + lens[g])
        assert r == members[g] and first[g] <= k0 < k1 <= first[g] + lens[g]
        covered.setdefault(g, []).append((k0, k1))
    for g, pieces in covered.items():
        pieces.sort()
        assert pieces[0][0] == first[g] and pieces[-1][1] == first[g] + lens[g]
        assert all(a[1] == b[0] for a, b in zip(pieces[:-1], pieces[1:])), "pieces must tile the run"
        assert len(pieces) == pp.splits[g] >= 1
    gaps = [(k0, k1) for nq, k0, k1 in reqs if nq == 0]
    assert gaps == [(750, 1000), (1600, 3000)]
    assert pp.splits.tolist() == [5, 6, 0, 0, 3, 0]  # 6 CTAs per split round, 32 SMs: ~106 keys per CTA
    for r in range(10):
        pos = pp.entry_pos[pp.entry_indptr[r]:pp.entry_indptr[r + 1]]
        assert all(pp.q_rows[p] == r for p in pos)
        assert len(pos) == sum(int(pp.splits[g]) for g in range(len(first)) if pp.taken[g] and r in members[g])


def test_pool_requests_fit_the_static_capacity():
    """Rows (members x splits) and requests past the capacity: splits shrink first, then the
    runs that still do not fit are left to the Triton launch."""
    first, lens = [0, 10_000], [8192, 8192]
    members = [list(range(40)), list(range(40, 80))]
    indptr, rows = np.cumsum([0, 40, 40]), np.arange(80)
    wide = plan_pool_requests(first, lens, indptr, rows, bs=80, gqa=8, num_kv_heads=4, num_sms=132,
                              max_requests=64, max_rows=4096, min_rows=1)
    assert wide.taken.all() and wide.splits.min() > 1
    tight = plan_pool_requests(first, lens, indptr, rows, bs=80, gqa=8, num_kv_heads=4, num_sms=132,
                               max_requests=64, max_rows=100, min_rows=1)
    assert tight.taken.all() and tight.splits.tolist() == [1, 1] and tight.num_rows == 80
    one = plan_pool_requests(first, lens, indptr, rows, bs=80, gqa=8, num_kv_heads=4, num_sms=132,
                             max_requests=64, max_rows=60, min_rows=1)
    assert one.taken.tolist() == [True, False] and one.num_rows == 40
    assert members[0] == one.q_rows.tolist()
    # Groups of few stacked rows (members x gqa < POOL_MIN_ROWS) stay on the Triton launch.
    small = plan_pool_requests(first, lens, indptr, rows, bs=80, gqa=4, num_kv_heads=8, num_sms=132,
                               max_requests=64, max_rows=4096)
    assert not small.taken.any() and small.num_rows == 0 and small.num_requests == 0


def test_run_table_learns_first_slots_and_refuses_moved_groups(caplog):
    """The break count and each group's first slot when its segment is one run; a key seen again
    at other slots switches the table off (every group back to the Triton launch), loudly."""
    runs = PrefixSlotRuns()
    keys = [(7, 0, 5), (8, 5, 9), (9, 9, 10)]
    idx = torch.tensor([100, 101, 102, 103, 104, 20, 21, 30, 31, 55], dtype=torch.int32)
    runs.count(idx, torch.tensor([5, 4, 1]), keys)
    assert runs.poll() == 1  # 21 -> 30 inside group 2; group boundaries are not breaks
    assert runs.run_starts(keys + [(1, 0, 1)]).tolist() == [100, -1, 55, -1]  # unknown key: -1
    runs.count(idx, torch.tensor([5, 4, 1]), keys)  # the same slots again: fine
    assert not runs.disabled
    moved = idx.clone()
    moved[:5] += 1000
    with caplog.at_level(logging.ERROR):
        runs.count(moved, torch.tensor([5, 4, 1]), keys)
    assert runs.disabled and "switched off" in caplog.text
    assert runs.run_starts(keys).tolist() == [-1, -1, -1]


interpret = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                               reason="CPU interpreter tests")


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("external", [False, True])
def test_relay_kernel_with_pool_pass_matches_float64(dtype, hq, hkv, external):
    """Groups in runs (nested ones included) through the pool pass, the group whose slots hold a
    break and the rest through the Triton launch, merged with the suffix states: equal to the
    float64 oracle, and the pass took exactly the one-run groups."""
    from relay_radix.kernels import TritonRelayDecode
    from relay_radix.reference import naive_decode_attention

    bs, d = 14, 64
    groups = [(list(range(0, 10)), 301), (list(range(0, 4)), 97), (list(range(10, 13)), 130), ([3, 11], 64)]
    suffix = [int(x) for x in np.random.default_rng(hq).integers(1, 90, bs)]
    case = make_case(bs=bs, hq=hq, hkv=hkv, d=d, dtype=dtype, groups=groups, suffix_lens=suffix,
                     slot_layout="runs", seed=hq + hkv)
    c = case.csr
    lens = (c["prefix_kv_indptr"][1:] - c["prefix_kv_indptr"][:-1]).long()
    first = slot_run_starts(c["prefix_kv_indices"], lens)
    assert first[0] == -1 and (first[1:] >= 0).all(), first  # make_case plants a break in group 0
    caps = dict(max_bs=bs, max_groups=len(groups), max_members=int(c["member_rows"].numel()),
                max_prefix_tokens=int(c["prefix_kv_indices"].numel()),
                max_suffix_tokens=1 if external else int(c["suffix_kv_indices"].numel()))
    w = TritonRelayDecode(hq, hkv, d, dtype, "cpu", external_suffix=external, num_sms=4, prefix_pool="torch",
                          pool_min_rows=1, min_chunk=64, **caps)
    kw = plan_kwargs(case)
    if external:
        kw["suffix_kv_indices"] = None
        suf_o, suf_lse = naive_decode_attention(case.q.double(), case.k.double(), case.v.double(),
                                                c["suffix_kv_indptr"], c["suffix_kv_indices"], case.sm_scale, 0.0)
        o = suf_o.to(dtype).clone()
        base = dict(base_lse2=(suf_lse / 0.6931471805599453).float())
    else:
        o = torch.full_like(case.q, float("nan"))
        base = {}
    w.plan(**kw, prefix_first_slot_cpu=first)
    assert w.last_pool_plan.taken.tolist() == [False, True, True, True]
    assert w.last_plan.prefix_work.shape[0] > 0  # group 0 still on the Triton launch
    w.pool.o.fill_(float("nan"))  # rows the plan does not write must not be read
    w.run(case.q, case.k, case.v, o, sm_scale=case.sm_scale, **base)
    ref_o, ref_lse = case.reference()
    err, mx = rel_err(o, ref_o)
    assert not torch.isnan(o).any() and err < {torch.float32: 1e-5, torch.float16: 2e-3}[dtype], (err, mx)
    assert (w.lse[:bs].double() - ref_lse).abs().max().item() < 1e-3
