"""The pure-torch relay attention equals naive softmax attention over the whole sequence.

Float64 throughout: relay's result (shared segments once per group, own suffix per row,
exact LSE merge) must match softmax over each row's concatenated KV to ~1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from relay_radix.reference import (
    attention_state,
    merge_states,
    naive_decode_attention,
    relay_decode_attention,
)
from tests._relay_cases import make_case, random_groups


def full_sequences(csr: dict, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's whole KV list (its groups' segments in level order, then its suffix)."""
    p_ind, m_ind = csr["prefix_kv_indptr"].long(), csr["member_indptr"].long()
    rows_all, s_ind = csr["member_rows"].long(), csr["suffix_kv_indptr"].long()
    per_row = [[] for _ in range(bs)]
    for g in range(p_ind.numel() - 1):
        seg = csr["prefix_kv_indices"][p_ind[g]:p_ind[g + 1]]
        for r in rows_all[m_ind[g]:m_ind[g + 1]].tolist():
            per_row[r].append(seg)
    lists = [torch.cat(per_row[r] + [csr["suffix_kv_indices"][s_ind[r]:s_ind[r + 1]]]) for r in range(bs)]
    indptr = torch.zeros(bs + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor([len(x) for x in lists]), 0)
    return indptr, torch.cat(lists)


def relay_vs_naive(case, bs, logit_cap=0.0):
    csr = {k: t.cpu() for k, t in case.csr.items()}
    q, k, v = case.q.double(), case.k.double(), case.v.double()
    o, lse = relay_decode_attention(q, k, v, sm_scale=case.sm_scale, logit_cap=logit_cap, **csr)
    indptr, indices = full_sequences(csr, bs)
    o_ref, lse_ref = naive_decode_attention(q, k, v, indptr, indices, case.sm_scale, logit_cap)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    rel = ((o - o_ref).norm() / o_ref.norm()).item()
    return rel, (lse - lse_ref).abs().max().item()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])  # GQA 1 / 4 / 8
@pytest.mark.parametrize("d", [64, 128, 256])
def test_random_groups_match_naive(hq, hkv, d):
    for seed in range(3):
        gen = torch.Generator().manual_seed(1000 * seed + d + hq)
        bs = int(torch.randint(2, 12, (1,), generator=gen))
        groups = random_groups(bs, seed=seed + d, max_prefix=700, max_group=5)
        suffix = torch.randint(0, 40, (bs,), generator=gen).tolist()
        # A row whose suffix and groups are all empty has no keys at all: give it one token.
        covered = {r for rows, _ in groups for r in rows}
        suffix = [max(s, 1) if r not in covered else s for r, s in enumerate(suffix)]
        case = make_case(bs=bs, hq=hq, hkv=hkv, d=d, dtype=torch.float64, groups=groups,
                         suffix_lens=suffix, seed=seed)
        rel, lse_err = relay_vs_naive(case, bs)
        assert rel < 1e-10 and lse_err < 1e-10, (seed, rel, lse_err)


def test_long_prefix_single_member_and_empty_suffixes():
    bs = 5
    groups = [([0, 1, 2, 3], 3000), ([0, 1], 900), ([4], 1)]  # nested pair, a single-member group
    case = make_case(bs=bs, hq=8, hkv=2, d=64, dtype=torch.float64, groups=groups,
                     suffix_lens=[0, 3, 0, 17, 0], seed=7)
    rel, lse_err = relay_vs_naive(case, bs)
    assert rel < 1e-10 and lse_err < 1e-10


def test_logit_cap_matches_naive():
    bs = 4
    case = make_case(bs=bs, hq=4, hkv=1, d=64, dtype=torch.float64, groups=[([0, 1, 3], 50)],
                     suffix_lens=[2, 9, 4, 1], seed=3)
    case.q *= 8  # large scores, so the cap matters
    rel, _ = relay_vs_naive(case, bs, logit_cap=5.0)
    assert rel < 1e-10


def test_empty_state_merges():
    """(0, -inf) is the identity of the merge; two empty states merge to the empty state."""
    o = torch.randn(3, 4, 8, dtype=torch.float64)
    lse = torch.randn(3, 4, dtype=torch.float64)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, -math.inf)
    m_o, m_lse = merge_states(torch.stack([o, empty_o]), torch.stack([lse, empty_lse]))
    assert torch.equal(m_o, o) and torch.equal(m_lse, lse)
    e_o, e_lse = merge_states(torch.stack([empty_o, empty_o]), torch.stack([empty_lse, empty_lse]))
    assert torch.equal(e_o, empty_o) and torch.isneginf(e_lse).all()
    # A part with no keys is the empty state.
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    s_o, s_lse = attention_state(q, k, k, torch.zeros(2, 3, dtype=torch.bool), 0.3)
    assert torch.equal(s_o, torch.zeros_like(s_o)) and torch.isneginf(s_lse).all()


def test_half_precision_inputs_use_fp32_math():
    bs = 3
    case = make_case(bs=bs, hq=8, hkv=2, d=64, dtype=torch.float16, groups=[([0, 2], 300)],
                     suffix_lens=[5, 7, 1], seed=11)
    csr = {k: t.cpu() for k, t in case.csr.items()}
    o, lse = relay_decode_attention(case.q, case.k, case.v, sm_scale=case.sm_scale, **csr)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    o64, _ = relay_decode_attention(case.q.double(), case.k.double(), case.v.double(),
                                    sm_scale=case.sm_scale, **csr)
    assert ((o.double() - o64).norm() / o64.norm()).item() < 2e-3
