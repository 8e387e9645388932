"""Each request's own suffix through SGLang's FlashInfer decode: ordinary paged attention.

Relay splits a decode row's KV into shared segments (read once per group by the Triton
prefix kernel) and the row's own suffix ``req_to_token[pool[r], suffix_start[r]:seq_len[r]]``.
The suffix is plain paged decode, so it runs on the kernel vanilla SGLang decode runs:
FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``, driven through the wrapped
``FlashInferAttnBackend``'s own wrappers and index updater. With no shared segment in a batch,
``run`` without an LSE is the whole decode (the plain path: vanilla's kernel, nothing else).

What is reused from the wrapped backend (SGLang 0.5.16, ``flashinfer_backend.py``):
  * graph mode: the per-batch-size graph wrappers it creates in
    ``init_forward_metadata_out_graph(fb, in_capture=True)`` (``decode_cuda_graph_metadata[bs]``);
    its capture call also swaps in ``fast_decode_plan``, which plans from host lengths;
  * eager mode: its ``decode_wrappers``;
  * ``indices_updater_decode.call_begin_forward``: writes the slot list on the device
    (``create_flashinfer_kv_indices_triton`` with a per-row start) and plans the wrapper, as
    the backend's sliding-window path does with its window start.

The state is written as ``o`` (q's dtype) plus a **base-2** LSE (FlashInfer's convention);
``TritonRelayDecode.run(base_lse2=...)`` converts it at the merge.
"""

from __future__ import annotations

import torch

from relay_radix.kv_slots import to_device_async


class FlashInferSuffixDecode:
    """Suffix decode states for the relay merge, on the wrapped FlashInfer backend's wrappers."""

    def __init__(self, base_backend) -> None:
        from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

        if not isinstance(base_backend, FlashInferAttnBackend):
            raise ValueError(
                f"relay-radix: RELAY_RADIX_SUFFIX=flashinfer needs the FlashInfer base backend, got "
                f"{type(base_backend).__name__}; set RELAY_RADIX_BASE_BACKEND=flashinfer or RELAY_RADIX_SUFFIX=triton")
        if base_backend.num_wrappers != 1:
            # Sliding window / cross attention use two wrappers; relay refuses those models at launch.
            raise ValueError("relay-radix: the FlashInfer suffix path supports full attention only (one wrapper); "
                             "set RELAY_RADIX_SUFFIX=triton, or use --attention-backend flashinfer for this model")
        self.base = base_backend
        self.updater = base_backend.indices_updater_decode
        self.wrapper = None  # the wrapper planned for the current step

    def prepare_capture(self, fb) -> None:
        """Capture of batch size ``fb.batch_size``: let the base backend create (and first-plan)
        its graph wrappers for that size; ``plan`` re-plans them over the suffixes."""
        self.base.init_forward_metadata_out_graph(fb, in_capture=True)

    def graph_batch_sizes(self):
        """Batch sizes whose graph wrappers the base backend has made (at their capture)."""
        return self.base.decode_cuda_graph_metadata.keys()

    def plan(self, fb, suffix_start_cpu: torch.Tensor, suffix_lens_cpu: torch.Tensor, *, graph: bool) -> None:
        """Plan row ``r``'s suffix ``[suffix_start[r], seq_len[r])`` for this step.

        fb: the step's ForwardBatch (graph: the runner's padded view; ``fb.batch_size`` rows).
        suffix_start_cpu, suffix_lens_cpu: ``[bs]`` int64 CPU (padded rows included, length >= 1).
        graph: use the captured wrappers of this batch size (replay/capture) or the eager one.
        """
        bs = int(suffix_lens_cpu.numel())
        if graph:
            wrapper = self.base.decode_cuda_graph_metadata[bs][0]
        else:
            wrapper = self.base.decode_wrappers[0]
        dev = fb.seq_lens.device
        start = to_device_async(suffix_start_cpu, dev, torch.int32)  # no host sync (overlap scheduler)
        lens = (fb.seq_lens[:bs] - start).to(torch.int32)
        self.updater.call_begin_forward(
            wrapper, fb.req_pool_indices[:bs], lens, int(suffix_lens_cpu.sum()), self.base.kv_indptr[0], start,
            None, suffix_lens_cpu.to(torch.int32),
            disable_split_kv=self.base.disable_cuda_graph_kv_split if graph else None,
        )
        self.wrapper = wrapper

    def run(self, q: torch.Tensor, layer, out: torch.Tensor, lse2: torch.Tensor | None) -> None:
        """q ``[bs, num_q_heads, head_dim]``; writes ``out`` (same shape, q's dtype) and, unless
        None (a plain step: ``out`` is the attention output), ``lse2`` ``[bs, num_q_heads]`` fp32
        base 2."""
        w = self.wrapper
        # The per-layer scalars live on the wrapper: set them as FlashInfer's own forward()
        # (the call SGLang's backend makes) does before run(), which alone takes out/lse.
        w._pos_encoding_mode = "NONE"
        w._window_left = -1
        w._logits_soft_cap = layer.logit_cap if getattr(layer, "logit_cap", 0) else None
        w._sm_scale = layer.scaling
        w._rope_scale = w._rope_theta = None
        kv = self.base.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        w.run(q, kv, out=out, lse=lse2, return_lse=lse2 is not None,
              k_scale=getattr(layer, "k_scale_float", None), v_scale=getattr(layer, "v_scale_float", None))
