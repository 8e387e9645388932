"""Prefill (extend) over a cached shared prompt: the prompt's part of the batch's attention in
one FlashInfer FA3 launch that reads the prompt's KV in place from the pool.

Why: in a burst behind a long system prompt every prefill batch after the first is B requests x
L new tokens over the same cached P-token prompt. SGLang's FlashInfer backend attends each
request's tokens to its cached prefix with a paged prefill on FA2 (``backend="fa2"`` in 0.5.16),
one request per sequence, and decodes nothing while the batch runs: each such batch stalls
the requests already decoding, which is most of what relay's median TPOT adds over its decode
step (session 17: 0.9-1.5 ms per token at 8K/16K on MHA). A prompt prefilled in one piece sits
in one run of consecutive slots (``relay_radix.kv_slots``), i.e. a dense
``[P, num_kv_heads, head_dim]`` region of the pool, so the requests behind it can be one ragged
FA3 request: their query tokens stacked, the run read by TMA, no copy. On the H100 here
(``bench/results/extend-probe-h100-s18.md``, per layer, 32 / 64 requests x 128 tokens) the
prompt part took 0.85 / 1.70 ms at 8K and 1.67 / 3.26 ms at 16K against FA2's paged 1.54 /
3.07 and 3.08 / 6.21 ms, MHA and GQA-4 alike (the math, 650 against 355 TFLOPS, not the bytes).

This module replaces only that part. SGLang's ``FlashInferAttnBackend.forward_extend`` (ragged
path) computes ``o1, s1`` over the new tokens (causal) and ``o2, s2 =
prefill_wrapper_paged.forward_return_lse(q, kv_cache, causal=False, ...)`` over the cached
prefixes, then merges them; :class:`ExtendPoolPass` has that method, and the relay backend puts
it in the place of the paged wrapper for a batch it planned (``relay_radix.backend``).

Plan (host, :func:`plan_extend_pool`): requests whose cached prefix is the same run ``[first,
first + P)`` form a group, one ragged request whose queries are the members' tokens and whose
keys are pool rows ``first .. first + P`` (``kv_indptr`` holds absolute slots, as in
:mod:`relay_radix.kernels.pool_prefix`); groups go in slot order with a query-less *gap* request
between two runs. A batch is planned only when every request with a cached prefix is in a
group and no two groups' runs overlap (nested prompts: a 4K prompt and a 6K one that extends it);
otherwise SGLang's path runs it unchanged.

Layouts:
  * q ``[num_tokens, num_q_heads, head_dim]`` in batch order (SGLang's extend layout);
  * ``perm`` ``[rows]`` int64: the batch token of each stacked query row (gathered before the
    launch when it is not ``0 .. rows - 1``);
  * output ``o`` ``[num_tokens, num_q_heads, head_dim]`` (q's dtype) and ``lse2``
    ``[num_tokens, num_q_heads]`` fp32 **base 2** (FlashInfer's convention, which its merge
    reads); tokens of requests with no cached prefix get the empty state ``(0, -inf)``, as
    FlashInfer's paged wrapper gives them for zero keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .pool_prefix import plan_ragged_pinned, run_ragged_torch

__all__ = ["MIN_PREFIX_PAIRS", "ExtendPoolPass", "ExtendPoolPlan", "plan_extend_pool"]

# Fewest (new token, cached prefix token) pairs of a batch worth a plan of its own: below it the
# prompt part is a few microseconds per layer on either kernel and the FA3 plan (host, ~0.1 ms)
# is not worth making. 2^20 = 128 new tokens over an 8K prompt.
MIN_PREFIX_PAIRS = 1 << 20


@dataclasses.dataclass(slots=True)
class ExtendPoolPlan:
    """One prefill batch's pool requests (host arrays; see the module docstring)."""

    qo_indptr: np.ndarray  # [R + 1] int32: stacked query rows of each ragged request
    kv_indptr: np.ndarray  # [R + 1] int32: absolute slot numbers (non-decreasing)
    perm: np.ndarray  # [rows] int64: batch token of each stacked query row
    num_tokens: int  # tokens of the batch (rows <= num_tokens)
    groups: int

    @property
    def rows(self) -> int:
        return int(self.perm.size)

    @property
    def in_batch_order(self) -> bool:
        """Stacked rows are batch tokens ``0 .. rows - 1`` (no gather, no scatter)."""
        return bool(np.array_equal(self.perm, np.arange(self.perm.size)))


def plan_extend_pool(first_slots, prefix_lens, extend_lens, *,
                     min_pairs: int = MIN_PREFIX_PAIRS) -> tuple[ExtendPoolPlan | None, str]:
    """The pool requests of one prefill batch, or ``(None, why not)``.

    Args:
        first_slots: ``[B]`` first KV slot of each request's cached prefix when it is one run of
            consecutive slots, else -1 (not a run, or not known yet); ignored where the prefix is 0.
        prefix_lens: ``[B]`` cached prefix tokens per request (SGLang's ``extend_prefix_lens``).
        extend_lens: ``[B]`` new tokens per request (``extend_seq_lens``), in batch order.
        min_pairs: fewest ``sum(extend_len x prefix_len)`` worth a plan.
    """
    first = np.asarray(first_slots, dtype=np.int64).reshape(-1)
    plen = np.asarray(prefix_lens, dtype=np.int64).reshape(-1)
    elen = np.asarray(extend_lens, dtype=np.int64).reshape(-1)
    assert first.size == plen.size == elen.size
    cached = plen > 0
    if not cached.any():
        return None, "no cached prefix"
    if (first[cached] < 0).any():
        return None, "a cached prefix not known to be one run of KV slots"
    if int((plen * elen).sum()) < min_pairs:
        return None, "too little prefix attention"
    runs = sorted(set(zip(first[cached].tolist(), plen[cached].tolist())))
    end = -1
    for f, p in runs:
        if f < end:  # kv_indptr cannot go back: two prompts sharing slots need two launches
            return None, "cached prefixes that overlap (nested prompts)"
        end = f + p
    starts = np.concatenate([[0], np.cumsum(elen)[:-1]])
    qo_lens, kv_bounds, rows = [], [], []
    cur = runs[0][0]
    for f, p in runs:
        if f > cur:  # gap: no query over the slots between two runs
            qo_lens.append(0)
            kv_bounds.append(f)
        members = np.flatnonzero(cached & (first == f) & (plen == p))
        r = np.concatenate([np.arange(starts[i], starts[i] + elen[i]) for i in members])
        qo_lens.append(r.size)
        kv_bounds.append(f + p)
        rows.append(r)
        cur = f + p
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.asarray([runs[0][0]] + kv_bounds, dtype=np.int32)
    return ExtendPoolPlan(qo_indptr=qo_indptr, kv_indptr=kv_indptr, perm=np.concatenate(rows).astype(np.int64),
                          num_tokens=int(elen.sum()), groups=len(runs)), "planned"


class ExtendPoolPass:
    """FlashInfer's FA3 ragged prefill over the KV pool, in the place of SGLang's paged prefill
    wrapper for a planned batch (:meth:`forward_return_lse` has the paged wrapper's signature).

    ``backend="fa3"``: FlashInfer (Hopper), planned per batch (prefill runs eagerly).
    ``backend="torch"``: the same requests in float32 PyTorch (CPU tests of the plan layout).
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, *, backend: str = "fa3", workspace_bytes: int = 32 << 20) -> None:
        assert backend in ("fa3", "torch"), backend
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device, self.backend = dtype, torch.device(device), backend
        self.plan_: ExtendPoolPlan | None = None
        self._perm: torch.Tensor | None = None  # [rows] int64 on the device; None: batch order
        self._plan_event = None
        self._wrapper = None
        if backend == "fa3":
            import flashinfer

            self._ws = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
            self._wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self._ws, "NHD", backend="fa3")

    def plan(self, pp: ExtendPoolPlan) -> None:
        """Host work for one batch: FlashInfer's schedule and the stacking order on the device."""
        self.plan_ = pp
        perm = torch.from_numpy(pp.perm)
        if self.device.type == "cuda":
            perm = perm.pin_memory()  # an async copy (a pageable one would wait for the stream)
        self._perm = None if pp.in_batch_order else perm.to(self.device, non_blocking=True)
        if self._wrapper is not None:
            self._plan_event = plan_ragged_pinned(self._wrapper, pp.qo_indptr, pp.kv_indptr, self.num_q_heads,
                                                  self.num_kv_heads, self.head_dim, self.dtype, self._plan_event)

    def forward_return_lse(self, q: torch.Tensor, kv_cache, causal: bool = False, sm_scale: float | None = None,
                           window_left: int = -1, logits_soft_cap: float | None = None, **_unused):
        """The planned batch's attention over its cached prefixes (SGLang calls it per layer).

        q ``[num_tokens, num_q_heads, head_dim]``; kv_cache ``(k_buffer, v_buffer)``, the layer's
        pool ``[num_slots, num_kv_heads, head_dim]`` each. Returns ``(o, lse2)`` (module docstring).
        """
        pp = self.plan_
        # The relay backend plans only batches SGLang sends down its non-causal prefix path with
        # no window and no cap (it refuses soft-capped models at start); a change there must not
        # pass silently.
        assert pp is not None and not causal and (window_left is None or window_left < 0) and not logits_soft_cap
        assert q.shape[0] == pp.num_tokens, (q.shape, pp.num_tokens)
        k_buf, v_buf = kv_cache
        n, rows = pp.num_tokens, pp.rows
        scale = float(sm_scale) if sm_scale is not None else self.head_dim ** -0.5
        o = q.new_empty((n, self.num_q_heads, self.head_dim))
        lse2 = torch.empty((n, self.num_q_heads), dtype=torch.float32, device=q.device)
        if self._perm is None:
            q_rows, o_rows, lse_rows = q[:rows], o[:rows], lse2[:rows]
            if rows < n:  # tokens of requests with no cached prefix: the empty state
                o[rows:].zero_()
                lse2[rows:].fill_(float("-inf"))
        else:
            q_rows = q.index_select(0, self._perm)
            o_rows, lse_rows = torch.empty_like(q_rows), lse2.new_empty((rows, self.num_q_heads))
        if self._wrapper is None:  # the float32 stand-in (CPU tests of the layout, not of FA3)
            run_ragged_torch(q_rows, k_buf, v_buf, self.plan_.qo_indptr, self.plan_.kv_indptr, scale, o_rows, lse_rows)
        else:
            w = self._wrapper
            w._sm_scale = scale  # read at run (FlashInfer's own forward() sets it the same way)
            w.run(q_rows, k_buf, v_buf, out=o_rows, lse=lse_rows, return_lse=True)
        if self._perm is not None:
            o.zero_()
            lse2.fill_(float("-inf"))
            o.index_copy_(0, self._perm, o_rows)
            lse2.index_copy_(0, self._perm, lse_rows)
        return o, lse2
