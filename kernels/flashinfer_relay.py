"""Relay decode attention executed with FlashInfer 0.6.14 (GPU only).

Design (why not ``MultiLevelCascadeAttentionWrapper``): cascade levels need each group's
queries to be one contiguous range of the batch at every level; relay groups from the radix
tree (several groups, nested levels, rows in no group) would need a row permutation per
level plus FlashInfer's ``merge_state``, which returns NaN for two empty states
(flashinfer #4051) and has 2L-1 launches for L levels. Instead, three launches for any
number of groups and levels:

  1. ``BatchPrefillWithPagedKVCacheWrapper`` (non-causal, page size 1): one "request" per
     group = the group's member queries gathered contiguously (``member_rows`` order) against
     the group's shared slots -> one state per membership, base-2 LSE;
  2. ``BatchDecodeWithPagedKVCacheWrapper`` over every row's own suffix -> one state per row,
     base-2 LSE (``use_tensor_cores`` as SGLang chooses: GQA >= 4);
  3. our Triton merge (:func:`launch_merge_fi_states`): converts base 2 -> natural log at load
     (the one boundary), ignores the suffix state of rows with an empty suffix and the states
     of empty segments whatever FlashInfer wrote there, and merges exactly.

Partial outputs are in q's dtype (FlashInfer writes o in the query dtype), so this path is
slightly less exact than the Triton path (fp32 partials); see README for measured errors.

CUDA graphs (``use_cuda_graph=True``): FlashInfer fixes the batch size of each wrapper, so
an instance serves one captured batch size: ``q`` has exactly ``max_bs`` rows (pad rows with
empty suffixes), groups are padded to ``max_groups`` plus one sink group that takes the
padding member rows (so the prefill always has ``max_members`` query rows, as FlashInfer's
graph mode requires a fixed row count). ``plan`` writes only into buffers allocated here or,
with ``shared``, into those of the larger instance it borrows them from.
"""

from __future__ import annotations

import torch

from .triton_merge import launch_merge_fi_states
from .work_plan import run_one_shot

__all__ = ["FlashInferRelayDecode", "graph_workspace_bytes", "relay_decode_flashinfer"]


def _no_empty_segments(indices: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every empty segment one dummy key (slot 0) so FlashInfer never sees an empty KV
    list (its output there is unspecified: flashinfer #4051); the merge ignores those states.

    indices: ``[sum(lens)]`` int slot ids (device); lens: ``[n]`` CPU int64.
    Returns (``[sum(max(lens, 1))]`` int32 on indices' device, ``max(lens, 1)`` CPU int64).
    """
    indices = indices.to(torch.int32)
    if lens.numel() == 0 or bool((lens > 0).all()):
        return indices, lens
    new_lens = lens.clamp(min=1)
    new_start = torch.cumsum(new_lens, 0) - new_lens
    old_start = torch.cumsum(lens, 0) - lens
    seg = torch.repeat_interleave(torch.arange(lens.numel()), new_lens)
    src = old_start[seg] + torch.arange(int(new_lens.sum())) - new_start[seg]
    src = torch.where(lens[seg] > 0, src, torch.full_like(src, int(lens.sum())))  # -> the appended 0
    padded = torch.cat([indices, torch.zeros(1, dtype=torch.int32, device=indices.device)])
    return padded[src.to(indices.device)], new_lens


def graph_workspace_bytes(num_q_heads: int, num_kv_heads: int, head_dim: int, *, max_members: int,
                          max_groups: int, num_sms: int) -> int:
    """Float workspace that FlashInfer 0.6.14's paged prefill needs for one graph-mode plan.

    Graph mode always splits the KV (``PrefillBinarySearchKVChunkSize`` returns split for
    graphs) and sizes its fp32 partials for the padded grid: ``num_q_heads x padded_batch x
    cta_tile_q x (head_dim + 1)`` floats, with ``padded_batch x cta_tile_q`` at most the
    stacked rows (``max_members x gqa``) plus a 128-row tile per request (``max_groups + 1``)
    plus the split grid (``2 x num_sms / num_kv_heads`` tiles). Bound from
    ``include/flashinfer/attention/scheduler.cuh`` (``PrefillPlan``), plus 64 MiB for its
    index arrays; a plan past it fails loudly in FlashInfer's allocator."""
    gqa = num_q_heads // num_kv_heads
    rows = max_members * gqa + (max_groups + 1) * 128 + (2 * num_sms // num_kv_heads + 1) * 128
    return (64 << 20) + num_q_heads * rows * (head_dim + 1) * 4


class FlashInferRelayDecode:
    """Relay decode with FlashInfer kernels; same contract as :class:`TritonRelayDecode`.

    Args: as :class:`TritonRelayDecode`, plus
        use_cuda_graph: fixed-size FlashInfer buffers (one instance per captured batch size).
        workspace_bytes: FlashInfer float workspace per wrapper (default: 128 MiB, or in graph
            mode the bound of :func:`graph_workspace_bytes`).
        use_tensor_cores: decode wrapper option (default: GQA >= 4, as SGLang).
        prefill_backend: FlashInfer prefill implementation for the group pass. Default ``fa2``:
            on the H100 here FlashInfer's FA3 paged prefill at page size 1 took 120 us for the
            8K x 128-member GQA-4 group pass against 60 us for FA2 (``bench/kernels/profile_launches.py``);
            ``auto`` picks FA3 on Hopper.
        external_suffix: the suffixes are attended outside (the server: SGLang's FlashInfer
            decode writes each row's suffix state into ``o`` and a base-2 LSE); no decode
            wrapper is made, ``plan`` takes no suffix slots and ``run`` merges the groups'
            states on top of that state, in place.
        shared: a larger instance (same shape, same ``external_suffix``) whose workspace, member
            buffers and FlashInfer index buffers this one uses. The server makes one graph
            instance per captured batch size; they run one at a time, so one set of buffers
            serves all of them.

    Static buffers: ``q_gather``/``prefix_o`` ``[max_members(+pad), num_q_heads, head_dim]``,
    ``prefix_lse2`` fp32 base 2, ``suffix_o`` ``[max_bs, num_q_heads, head_dim]``,
    ``suffix_lse2`` base 2, ``lse`` ``[max_bs, num_q_heads]`` fp32 natural log (merged),
    the row-entry lists, and (graph mode) FlashInfer's index buffers.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        max_bs: int,
        max_groups: int,
        max_members: int,
        max_prefix_tokens: int,
        max_suffix_tokens: int,
        use_cuda_graph: bool = False,
        workspace_bytes: int | None = None,
        use_tensor_cores: bool | None = None,
        prefill_backend: str = "fa2",
        external_suffix: bool = False,
        shared: "FlashInferRelayDecode | None" = None,
    ) -> None:
        import flashinfer

        assert num_q_heads % num_kv_heads == 0
        dev = torch.device(device)
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype, self.device = (
            num_q_heads, num_kv_heads, head_dim, dtype, dev)
        self.max_bs, self.max_groups, self.max_members = max_bs, max_groups, max_members
        self.use_cuda_graph, self.external_suffix = use_cuda_graph, external_suffix
        if use_tensor_cores is None:
            use_tensor_cores = num_q_heads // num_kv_heads >= 4
        i32 = dict(dtype=torch.int32, device=dev)
        nb = max_groups + 1  # + sink group (graph mode)
        rows = max(1, max_members)
        if shared is not None:
            assert (shared.num_q_heads, shared.num_kv_heads, shared.head_dim, shared.dtype) == (
                num_q_heads, num_kv_heads, head_dim, dtype), "shared: another attention shape"
            assert shared.external_suffix == external_suffix and shared.max_groups == max_groups
            assert shared.max_bs >= max_bs and shared.member_rows.numel() >= rows
            self._ws_prefill, self._ws_decode = shared._ws_prefill, shared._ws_decode
            self._kv_indices_buf = shared._kv_indices_buf
            if use_cuda_graph:
                assert self._kv_indices_buf is not None and self._kv_indices_buf.numel() >= max_prefix_tokens + nb
        else:
            if workspace_bytes is None:
                workspace_bytes = 128 << 20
                if use_cuda_graph:
                    workspace_bytes = max(workspace_bytes, graph_workspace_bytes(
                        num_q_heads, num_kv_heads, head_dim, max_members=rows, max_groups=max_groups,
                        num_sms=torch.cuda.get_device_properties(dev).multi_processor_count))
            self._ws_prefill = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
            self._ws_decode = None if external_suffix else torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
            # + one dummy key per padded group (graph mode)
            self._kv_indices_buf = torch.zeros(max_prefix_tokens + nb, **i32) if use_cuda_graph else None
        prefill_kw = dict(backend=prefill_backend)
        if use_cuda_graph:
            prefill_kw.update(
                use_cuda_graph=True, qo_indptr_buf=torch.zeros(nb + 1, **i32),
                paged_kv_indptr_buf=torch.zeros(nb + 1, **i32), paged_kv_indices_buf=self._kv_indices_buf,
                paged_kv_last_page_len_buf=torch.zeros(nb, **i32))
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._ws_prefill, "NHD", **prefill_kw)
        self._decode = None
        if not external_suffix:
            decode_kw = dict(use_tensor_cores=use_tensor_cores)
            if use_cuda_graph:
                decode_kw.update(
                    use_cuda_graph=True, paged_kv_indptr_buffer=torch.zeros(max_bs + 1, **i32),
                    paged_kv_indices_buffer=torch.zeros(max_suffix_tokens + max_bs, **i32),  # + dummy keys
                    paged_kv_last_page_len_buffer=torch.zeros(max_bs, **i32))
            self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._ws_decode, "NHD", **decode_kw)

        def member_buf(name, shape, dtype_):
            if shared is not None:
                return getattr(shared, name)[: shape[0]]
            return torch.zeros(shape, dtype=dtype_, device=dev)

        self.member_rows = member_buf("member_rows", (rows,), torch.int64)  # gather index (pad: row 0)
        self.q_gather = member_buf("q_gather", (rows, num_q_heads, head_dim), dtype)
        self.prefix_o = member_buf("prefix_o", (rows, num_q_heads, head_dim), dtype)
        self.prefix_lse2 = member_buf("prefix_lse2", (rows, num_q_heads), torch.float32)
        if external_suffix:
            self.suffix_o = self.suffix_lse2 = None  # the caller's o / base_lse2
        else:
            self.suffix_o = torch.zeros((max_bs, num_q_heads, head_dim), dtype=dtype, device=dev)
            self.suffix_lse2 = torch.zeros((max_bs, num_q_heads), dtype=torch.float32, device=dev)
        self.lse = torch.zeros((max_bs, num_q_heads), dtype=torch.float32, device=dev)
        # Every row's suffix is live in external mode (decode rows own >= 1 token): indptr = arange.
        self.suffix_kv_indptr = (torch.arange(max_bs + 1, **i32) if external_suffix
                                 else torch.zeros(max_bs + 1, **i32))
        self.row_entry_indptr = torch.zeros(max_bs + 1, **i32)
        self.row_entry_pos = torch.zeros(rows, **i32)
        self._bs = 0
        self._prefill_rows = 0
        self._logit_cap: float | None = None

    def plan(
        self,
        *,
        prefix_kv_indices: torch.Tensor,
        suffix_kv_indices: torch.Tensor | None,
        prefix_lens_cpu: torch.Tensor,
        member_indptr_cpu: torch.Tensor,
        member_rows_cpu: torch.Tensor,
        suffix_lens_cpu: torch.Tensor,
        sm_scale: float | None = None,
        logit_cap: float = 0.0,
        prefix_kv_indptr: torch.Tensor | None = None,
        member_indptr: torch.Tensor | None = None,
        member_rows: torch.Tensor | None = None,
        suffix_kv_indptr: torch.Tensor | None = None,
    ) -> None:
        """Host work of one decode step (FlashInfer plans + our row-entry lists).

        Arguments as :meth:`TritonRelayDecode.plan`, plus ``logit_cap``, which selects
        FlashInfer's kernel variant at plan time (``run`` asserts it gets the same value), and
        ``sm_scale`` (optional: ``run`` sets the layer's scale). In graph mode
        ``suffix_lens_cpu`` must have exactly ``max_bs`` rows. With ``external_suffix``,
        ``suffix_kv_indices`` is ``None`` and only the batch size is taken from ``suffix_lens_cpu``.
        """
        del prefix_kv_indptr, member_indptr, member_rows, suffix_kv_indptr
        i32 = torch.int32
        p_lens = prefix_lens_cpu.to(torch.int64).cpu()
        m_indptr = member_indptr_cpu.to(torch.int64).cpu()
        m_rows = member_rows_cpu.to(torch.int64).cpu()
        s_lens = suffix_lens_cpu.to(torch.int64).cpu()
        bs, ng, nm = s_lens.numel(), p_lens.numel(), m_rows.numel()
        assert bs <= self.max_bs and ng <= self.max_groups and nm <= self.max_members
        if self.use_cuda_graph:
            assert bs == self.max_bs, "graph mode: plan exactly max_bs rows (pad with empty suffixes)"
        assert (suffix_kv_indices is None) == self.external_suffix, "suffix slots: given iff not external_suffix"
        cap = float(logit_cap) if logit_cap > 0 else None
        self._logit_cap = float(logit_cap)
        scale = dict(sm_scale=sm_scale) if sm_scale is not None else {}

        # Prefill over groups (member queries gathered contiguously).
        m_counts = m_indptr[1:] - m_indptr[:-1]
        if self.use_cuda_graph:
            pad_g = self.max_groups - ng
            p_lens_b = torch.cat([p_lens, torch.zeros(pad_g + 1, dtype=torch.int64)])
            m_counts_b = torch.cat([m_counts, torch.zeros(pad_g, dtype=torch.int64),
                                    torch.tensor([self.member_rows.numel() - nm])])  # sink group
        else:
            p_lens_b, m_counts_b = p_lens, m_counts
        self._prefill_rows = int(m_counts_b.sum())
        if self._prefill_rows > 0:
            p_idx, p_lens_f = _no_empty_segments(prefix_kv_indices, p_lens_b)
            qo_indptr = torch.zeros(p_lens_b.numel() + 1, dtype=i32)
            qo_indptr[1:] = torch.cumsum(m_counts_b, 0)
            kv_indptr = torch.zeros(p_lens_b.numel() + 1, dtype=i32)
            kv_indptr[1:] = torch.cumsum(p_lens_f, 0)
            last = torch.ones(p_lens_b.numel(), dtype=i32)  # page size 1: the last page holds 1 token
            self._prefill.plan(
                qo_indptr, kv_indptr, p_idx, last, self.num_q_heads, self.num_kv_heads,
                self.head_dim, 1, causal=False, logits_soft_cap=cap,
                q_data_type=self.dtype, kv_data_type=self.dtype, **scale,
            )
        gather = torch.zeros(self.member_rows.numel(), dtype=torch.int64)
        gather[:nm] = m_rows
        self.member_rows.copy_(gather, non_blocking=True)  # pageable source: safe to drop after

        if not self.external_suffix:  # decode over suffixes
            s_idx, s_lens_f = _no_empty_segments(suffix_kv_indices, s_lens)
            fi_indptr = torch.zeros(bs + 1, dtype=i32)
            fi_indptr[1:] = torch.cumsum(s_lens_f, 0)
            s_indptr = torch.zeros(bs + 1, dtype=i32)  # the real lengths, for the merge
            s_indptr[1:] = torch.cumsum(s_lens, 0)
            self._decode.plan(
                fi_indptr, s_idx, torch.ones(bs, dtype=i32), self.num_q_heads, self.num_kv_heads,
                self.head_dim, 1, logits_soft_cap=cap, q_data_type=self.dtype, kv_data_type=self.dtype,
                **scale,
            )
            self.suffix_kv_indptr[: bs + 1].copy_(s_indptr, non_blocking=True)

        # Row entries: memberships of non-empty segments, grouped by row (member_rows order).
        group_of = torch.repeat_interleave(torch.arange(ng), m_counts)
        keep = p_lens[group_of] > 0 if nm else torch.zeros(0, dtype=torch.bool)
        pos = torch.arange(nm)[keep]
        rows_k = m_rows[keep]
        order = torch.sort(rows_k, stable=True).indices
        entry_indptr = torch.zeros(bs + 1, dtype=i32)
        entry_indptr[1:] = torch.cumsum(torch.bincount(rows_k, minlength=bs)[:bs], 0)
        self.row_entry_indptr[: bs + 1].copy_(entry_indptr, non_blocking=True)
        if pos.numel():
            self.row_entry_pos[: pos.numel()].copy_(pos[order].to(i32), non_blocking=True)
        self._bs = bs

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        o: torch.Tensor,
        *,
        sm_scale: float,
        logit_cap: float = 0.0,
        base_lse2: torch.Tensor | None = None,
        suffix_state=None,
    ) -> torch.Tensor:
        """One layer: q ``[bs, num_q_heads, head_dim]``, k/v_buffer ``[num_slots, num_kv_heads, head_dim]``,
        o ``[bs, num_q_heads, head_dim]`` (written in full, mutated). Returns ``o``; ``self.lse[:bs]``
        holds the natural-log LSE.

        ``external_suffix`` only: ``base_lse2`` ``[>=bs, num_q_heads]`` fp32 base-2 LSE of the
        suffix state in ``o``, and ``suffix_state``, a callable that writes that state (called
        after the group prefill is issued; without it ``o``/``base_lse2`` hold it on entry)."""
        assert self._logit_cap is not None, "plan() first"
        assert self._logit_cap == float(logit_cap), (
            "FlashInfer selects its soft-cap kernel at plan time: plan with the layer's logit_cap")
        bs = self._bs
        kv = (k_buffer.unsqueeze(1), v_buffer.unsqueeze(1))  # [num_slots, page_size=1, num_kv_heads, head_dim]
        n = self._prefill_rows
        if n > 0:
            # The scale is a kernel argument read at run (what FlashInfer's own forward() sets),
            # so one plan serves every layer whatever its scale.
            self._prefill._sm_scale = sm_scale
            torch.index_select(q, 0, self.member_rows[:n], out=self.q_gather[:n])
            self._prefill.run(self.q_gather[:n], kv, out=self.prefix_o[:n], lse=self.prefix_lse2[:n], return_lse=True)
        if self.external_suffix:
            assert base_lse2 is not None, "external_suffix: pass the suffix state (o, base_lse2)"
            if suffix_state is not None:
                suffix_state()
            suffix_o, suffix_lse2 = o, base_lse2  # merged in place: each program reads its block first
        else:
            assert base_lse2 is None and suffix_state is None, "base_lse2/suffix_state: external_suffix objects only"
            self._decode._sm_scale = sm_scale
            self._decode.run(q[:bs], kv, out=self.suffix_o[:bs], lse=self.suffix_lse2[:bs], return_lse=True)
            suffix_o, suffix_lse2 = self.suffix_o, self.suffix_lse2
        launch_merge_fi_states(
            suffix_o=suffix_o, suffix_lse2=suffix_lse2, suffix_kv_indptr=self.suffix_kv_indptr,
            prefix_o=self.prefix_o, prefix_lse2=self.prefix_lse2, row_entry_indptr=self.row_entry_indptr,
            row_entry_pos=self.row_entry_pos, o=o[:bs], lse_out=self.lse,
        )
        return o


def relay_decode_flashinfer(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    *,
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    member_indptr: torch.Tensor,
    member_rows: torch.Tensor,
    suffix_kv_indptr: torch.Tensor,
    suffix_kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot FlashInfer relay decode; arguments and result as
    :func:`relay_radix.reference.relay_decode_attention` (indptr arrays start at 0)."""
    # FlashInfer plans the scale and the cap (its wrappers take them at plan time).
    return run_one_shot(
        FlashInferRelayDecode, q, k_buffer, v_buffer, sm_scale=sm_scale, logit_cap=logit_cap,
        plan_extra=dict(sm_scale=sm_scale, logit_cap=logit_cap), prefix_kv_indptr=prefix_kv_indptr,
        prefix_kv_indices=prefix_kv_indices, member_indptr=member_indptr, member_rows=member_rows,
        suffix_kv_indptr=suffix_kv_indptr, suffix_kv_indices=suffix_kv_indices)
