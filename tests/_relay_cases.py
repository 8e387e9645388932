"""Random relay-decode batches shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RelayCase:
    q: torch.Tensor  # [bs, hq, d]
    k: torch.Tensor  # [num_slots, hkv, d]
    v: torch.Tensor
    csr: dict  # the contract's index tensors (int32, on the case's device)
    sm_scale: float
    layout_tag: str = ""  # "/runs" when prefixes sit in consecutive slots (report rows say so)

    def reference(self, logit_cap: float = 0.0):
        """float64 oracle on upcast inputs (CPU)."""
        from relay_radix.reference import relay_decode_attention

        csr = {k: t.cpu() for k, t in self.csr.items()}
        return relay_decode_attention(self.q.double().cpu(), self.k.double().cpu(), self.v.double().cpu(),
                                      sm_scale=self.sm_scale, logit_cap=logit_cap, **csr)


def make_case(
    *, bs: int, hq: int, hkv: int, d: int, dtype: torch.dtype, groups: list[tuple[list[int], int]],
    suffix_lens: list[int], device: str = "cpu", seed: int = 0, extra_slots: int = 7,
    slot_layout: str = "shuffled",
) -> RelayCase:
    """groups: (member rows, prefix length) per group; disjoint slots per segment.

    slot_layout: ``shuffled`` (every slot id drawn at random) or ``runs``: each group's prefix
    lies in consecutive slots, as SGLang allocates a prompt prefilled in one piece, except that
    the first group of >= 2 tokens is two runs in swapped order (a chunk straddling the break is
    not one run) and the runs of different groups are separated by random gaps; suffix slots
    stay shuffled (decode tokens are allocated one step at a time).
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(p for _, p in groups) + sum(suffix_lens)
    num_slots = total + extra_slots
    perm = torch.randperm(num_slots, generator=g).to(torch.int32)
    if slot_layout == "runs":
        perm = _prefix_runs(perm, [p for _, p in groups], g)
    else:
        assert slot_layout == "shuffled", slot_layout
    plens = torch.tensor([p for _, p in groups], dtype=torch.int64)
    p_indptr = torch.zeros(len(groups) + 1, dtype=torch.int32)
    p_indptr[1:] = torch.cumsum(plens, 0)
    npre = int(p_indptr[-1])
    s_indptr = torch.zeros(bs + 1, dtype=torch.int32)
    s_indptr[1:] = torch.cumsum(torch.tensor(suffix_lens, dtype=torch.int64), 0)
    m_indptr = torch.zeros(len(groups) + 1, dtype=torch.int32)
    m_indptr[1:] = torch.cumsum(torch.tensor([len(r) for r, _ in groups], dtype=torch.int64), 0)
    m_rows = torch.tensor([r for rows, _ in groups for r in sorted(rows)], dtype=torch.int32)
    csr = dict(prefix_kv_indptr=p_indptr, prefix_kv_indices=perm[:npre], member_indptr=m_indptr,
               member_rows=m_rows, suffix_kv_indptr=s_indptr,
               suffix_kv_indices=perm[npre:npre + int(s_indptr[-1])])
    gd = torch.Generator(device=device).manual_seed(seed)  # draw the big tensors where they live
    k = torch.randn(num_slots, hkv, d, generator=gd, device=device).to(dtype)
    v = torch.randn(num_slots, hkv, d, generator=gd, device=device).to(dtype)
    q = torch.randn(bs, hq, d, generator=gd, device=device).to(dtype)
    return RelayCase(q=q, k=k, v=v, csr={n: t.to(device) for n, t in csr.items()}, sm_scale=d ** -0.5,
                     layout_tag="" if slot_layout == "shuffled" else f"/{slot_layout}")


def _prefix_runs(perm: torch.Tensor, prefix_lens: list[int], g: torch.Generator) -> torch.Tensor:
    """Re-lay ``perm`` (a permutation of all slot ids) so that its first ``sum(prefix_lens)``
    entries are per-group consecutive runs (see ``make_case``); the rest keeps the leftover
    ids in random order."""
    num_slots, npre = perm.numel(), sum(prefix_lens)
    spare = num_slots - npre
    gaps = torch.randint(0, max(1, spare // max(1, len(prefix_lens))) + 1, (len(prefix_lens),), generator=g)
    gaps = (gaps * spare // max(1, int(gaps.sum()))).tolist() if int(gaps.sum()) > spare else gaps.tolist()
    runs, used, start, split_done = [], torch.zeros(num_slots, dtype=torch.bool), 0, False
    for plen, gap in zip(prefix_lens, gaps):
        start += gap
        ids = torch.arange(start, start + plen, dtype=torch.int32)
        if plen >= 2 and not split_done:  # two runs, swapped: [cut..plen) then [0..cut)
            cut = int(torch.randint(1, plen, (1,), generator=g))
            ids = torch.cat([ids[cut:], ids[:cut]])
            split_done = True
        used[start:start + plen] = True
        runs.append(ids)
        start += plen
    rest = torch.arange(num_slots, dtype=torch.int32)[~used]
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    return torch.cat(runs + [rest]) if runs else rest


def random_groups(bs: int, *, seed: int, max_prefix: int, max_group: int, nested: bool = True,
                  num_groups: int | None = None) -> list[tuple[list[int], int]]:
    """Level-0 groups over a random subset of rows (some rows in none), and optionally one
    level-1 subgroup inside some level-0 groups (2-level nesting)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(bs, generator=g).tolist()
    out: list[tuple[list[int], int]] = []
    i = 0
    n_made = 0
    while i < len(rows) - 1 and (num_groups is None or n_made < num_groups):
        size = int(torch.randint(1, max_group + 1, (1,), generator=g))
        members = rows[i:i + size]
        i += size
        plen = int(torch.randint(1, max_prefix + 1, (1,), generator=g))
        out.append((members, plen))
        n_made += 1
        if nested and len(members) >= 2 and bool(torch.rand(1, generator=g) < 0.7):
            sub = members[: max(1, len(members) // 2)]
            out.append((sub, int(torch.randint(1, max_prefix + 1, (1,), generator=g))))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out-ref|| / ||ref||, max abs) in float64; NaN propagates (and fails the caller's bound)."""
    o, r = out.double().cpu(), ref.double().cpu()
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item(), (o - r).abs().max().item()


def reference_device(case: RelayCase, logit_cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle on the case's device for big shapes (same math as
    ``relay_radix.reference``: states per part, exact merge), without the padded
    ``[n, L, heads, d]`` gathers of the CPU oracle. Returns (o float64, lse float64)."""
    from relay_radix.reference import merge_states

    q, k, v, c = case.q.double(), case.k, case.v, case.csr
    bs, hq, d = q.shape
    hkv = k.shape[1]
    gqa = hq // hkv

    def state(qr: torch.Tensor, idx: torch.Tensor):
        kk = k[idx.long()].double()  # [L, hkv, d]
        vv = v[idx.long()].double()
        s = torch.einsum("mhgd,lhd->mhgl", qr.reshape(-1, hkv, gqa, d), kk) * case.sm_scale
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        lse = torch.logsumexp(s, -1)
        o = torch.einsum("mhgl,lhd->mhgd", torch.exp(s - lse[..., None]), vv)
        return o.reshape(-1, hq, d), lse.reshape(-1, hq)

    o_acc = torch.zeros(bs, hq, d, dtype=torch.float64, device=q.device)
    lse_acc = torch.full((bs, hq), float("-inf"), dtype=torch.float64, device=q.device)
    s_ind = c["suffix_kv_indptr"].long().cpu()
    for r in range(bs):
        a, b = int(s_ind[r]), int(s_ind[r + 1])
        if b > a:
            o_acc[r], lse_acc[r] = (t[0] for t in state(q[r:r + 1], c["suffix_kv_indices"][a:b]))
    p_ind = c["prefix_kv_indptr"].long().cpu()
    m_ind = c["member_indptr"].long().cpu()
    rows_all = c["member_rows"].long()
    for g in range(p_ind.numel() - 1):
        rows = rows_all[int(m_ind[g]):int(m_ind[g + 1])]
        if rows.numel() == 0 or p_ind[g + 1] == p_ind[g]:
            continue
        o_g, l_g = state(q[rows], c["prefix_kv_indices"][int(p_ind[g]):int(p_ind[g + 1])])
        o_m, l_m = merge_states(torch.stack([o_acc[rows], o_g]), torch.stack([lse_acc[rows], l_g]))
        o_acc[rows], lse_acc[rows] = o_m, l_m
    return o_acc, lse_acc


def plan_kwargs(case: RelayCase) -> dict:
    """Arguments of TritonRelayDecode.plan / FlashInferRelayDecode.plan from a case."""
    c = case.csr
    p, m, s = (c[n].long().cpu() for n in ("prefix_kv_indptr", "member_indptr", "suffix_kv_indptr"))
    return dict(prefix_kv_indices=c["prefix_kv_indices"], suffix_kv_indices=c["suffix_kv_indices"],
                prefix_lens_cpu=p[1:] - p[:-1], member_indptr_cpu=m, member_rows_cpu=c["member_rows"].cpu(),
                suffix_lens_cpu=s[1:] - s[:-1])
