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
graph mode requires a fixed row count). ``plan`` writes only into buffers allocated here.
"""

from __future__ import annotations

import torch

from .triton_merge import launch_merge_fi_states
from .work_plan import run_one_shot

__all__ = ["FlashInferRelayDecode", "relay_decode_flashinfer"]


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


class FlashInferRelayDecode:
    """Relay decode with FlashInfer kernels; same contract as :class:`TritonRelayDecode`.

    Args: as :class:`TritonRelayDecode`, plus
        use_cuda_graph: fixed-size FlashInfer buffers (one instance per captured batch size).
        workspace_bytes: FlashInfer float workspace per wrapper.
        use_tensor_cores: decode wrapper option (default: GQA >= 4, as SGLang).

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
        workspace_bytes: int = 128 << 20,
        use_tensor_cores: bool | None = None,
    ) -> None:
        import flashinfer

        assert num_q_heads % num_kv_heads == 0
        dev = torch.device(device)
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype, self.device = (
            num_q_heads, num_kv_heads, head_dim, dtype, dev)
        self.max_bs, self.max_groups, self.max_members = max_bs, max_groups, max_members
        self.use_cuda_graph = use_cuda_graph
        if use_tensor_cores is None:
            use_tensor_cores = num_q_heads // num_kv_heads >= 4
        i32 = dict(dtype=torch.int32, device=dev)
        nb = max_groups + 1  # + sink group (graph mode)
        self._ws_prefill = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
        self._ws_decode = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
        if use_cuda_graph:
            self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self._ws_prefill, "NHD", use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(nb + 1, **i32), paged_kv_indptr_buf=torch.zeros(nb + 1, **i32),
                paged_kv_indices_buf=torch.zeros(max_prefix_tokens + nb, **i32),  # + dummy keys
                paged_kv_last_page_len_buf=torch.zeros(nb, **i32),
            )
            self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._ws_decode, "NHD", use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(max_bs + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(max_suffix_tokens + max_bs, **i32),  # + dummy keys
                paged_kv_last_page_len_buffer=torch.zeros(max_bs, **i32),
            )
        else:
            self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._ws_prefill, "NHD")
            self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._ws_decode, "NHD", use_tensor_cores=use_tensor_cores)
        rows = max(1, max_members)
        self.member_rows = torch.zeros(rows, dtype=torch.int64, device=dev)  # gather index (pad: row 0)
        self.q_gather = torch.zeros((rows, num_q_heads, head_dim), dtype=dtype, device=dev)
        self.prefix_o = torch.zeros((rows, num_q_heads, head_dim), dtype=dtype, device=dev)
        self.prefix_lse2 = torch.zeros((rows, num_q_heads), dtype=torch.float32, device=dev)
        self.suffix_o = torch.zeros((max_bs, num_q_heads, head_dim), dtype=dtype, device=dev)
        self.suffix_lse2 = torch.zeros((max_bs, num_q_heads), dtype=torch.float32, device=dev)
        self.lse = torch.zeros((max_bs, num_q_heads), dtype=torch.float32, device=dev)
        self.suffix_kv_indptr = torch.zeros(max_bs + 1, **i32)
        self.row_entry_indptr = torch.zeros(max_bs + 1, **i32)
        self.row_entry_pos = torch.zeros(rows, **i32)
        self._bs = 0
        self._prefill_rows = 0
        self._scale: tuple[float, float] | None = None

    def plan(
        self,
        *,
        prefix_kv_indices: torch.Tensor,
        suffix_kv_indices: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        member_indptr_cpu: torch.Tensor,
        member_rows_cpu: torch.Tensor,
        suffix_lens_cpu: torch.Tensor,
        sm_scale: float,
        logit_cap: float = 0.0,
        prefix_kv_indptr: torch.Tensor | None = None,
        member_indptr: torch.Tensor | None = None,
        member_rows: torch.Tensor | None = None,
        suffix_kv_indptr: torch.Tensor | None = None,
    ) -> None:
        """Host work of one decode step (FlashInfer plans + our row-entry lists).

        Arguments as :meth:`TritonRelayDecode.plan`, plus ``sm_scale``/``logit_cap``, which
        FlashInfer takes at plan time (``run`` asserts it gets the same values). In graph mode
        ``suffix_lens_cpu`` must have exactly ``max_bs`` rows.
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
        cap = float(logit_cap) if logit_cap > 0 else None
        self._scale = (float(sm_scale), float(logit_cap))

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
                self.head_dim, 1, causal=False, sm_scale=sm_scale, logits_soft_cap=cap,
                q_data_type=self.dtype, kv_data_type=self.dtype,
            )
        gather = torch.zeros(self.member_rows.numel(), dtype=torch.int64)
        gather[:nm] = m_rows
        self.member_rows.copy_(gather, non_blocking=True)  # pageable source: safe to drop after

        # Decode over suffixes.
        s_idx, s_lens_f = _no_empty_segments(suffix_kv_indices, s_lens)
        fi_indptr = torch.zeros(bs + 1, dtype=i32)
        fi_indptr[1:] = torch.cumsum(s_lens_f, 0)
        s_indptr = torch.zeros(bs + 1, dtype=i32)  # the real lengths, for the merge
        s_indptr[1:] = torch.cumsum(s_lens, 0)
        self._decode.plan(
            fi_indptr, s_idx, torch.ones(bs, dtype=i32), self.num_q_heads, self.num_kv_heads,
            self.head_dim, 1, logits_soft_cap=cap, q_data_type=self.dtype, kv_data_type=self.dtype,
            sm_scale=sm_scale,
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
    ) -> torch.Tensor:
        """One layer: q ``[bs, num_q_heads, head_dim]``, k/v_buffer ``[num_slots, num_kv_heads, head_dim]``,
        o ``[bs, num_q_heads, head_dim]`` (written in full, mutated). Returns ``o``; ``self.lse[:bs]``
        holds the natural-log LSE."""
        assert self._scale is not None, "plan() first"
        assert abs(self._scale[0] - sm_scale) <= 1e-6 * abs(sm_scale) and self._scale[1] == float(logit_cap), (
            "FlashInfer takes sm_scale/logit_cap at plan time: plan with the layer's values")
        bs = self._bs
        kv = (k_buffer.unsqueeze(1), v_buffer.unsqueeze(1))  # [num_slots, page_size=1, num_kv_heads, head_dim]
        n = self._prefill_rows
        if n > 0:
            torch.index_select(q, 0, self.member_rows[:n], out=self.q_gather[:n])
            self._prefill.run(self.q_gather[:n], kv, out=self.prefix_o[:n], lse=self.prefix_lse2[:n], return_lse=True)
        self._decode.run(q[:bs], kv, out=self.suffix_o[:bs], lse=self.suffix_lse2[:bs], return_lse=True)
        launch_merge_fi_states(
            suffix_o=self.suffix_o, suffix_lse2=self.suffix_lse2, suffix_kv_indptr=self.suffix_kv_indptr,
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
