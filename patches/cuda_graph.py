"""Decode CUDA graphs: a second, *plain* graph per batch size for steps with no relay group.

A captured relay decode graph replays its prefix launch and its merge launch every step,
even when the step has no group and both only find no work: about 5 us per layer on top of
vanilla's decode (H100, ``bench/results/kernels-h100.md``, no-sharing rows). Steps with no
group are common (no shared prompt in the batch, a burst's first steps, groups the gate turned
off), so they replay a graph captured without those launches: the FlashInfer decode over whole
sequences, the kernel vanilla SGLang runs.

SGLang 0.5.16's decode runner already captures two graphs per batch size when its attribute
``record_nolora_graph`` is true (``runner/decode_cuda_graph_runner.py:887-911``): it loops over
the labels ``"lora"`` and ``"nolora"``, publishes the label being captured through
``runner_utils.capture_mode.get_capture_lora_variant()`` and keys the graphs by
``ShapeKey.variant_label``; at replay ``_resolve_lora_variant(fb)`` picks the label, after the
backend's ``init_forward_metadata_out_graph`` (``load_batch``, ``:1188`` then ``:1199``).
Nothing in 0.5.16 turns that attribute on (LoRA decodes in one graph), so relay borrows the
pair: ``"lora"`` holds the relay graph, ``"nolora"`` the plain one. Two hooks:

  * AROUND ``DecodeCudaGraphRunner._capture_one_stream``: with a relay backend that can run
    plain steps, capture both variants; the backend reads :func:`capturing_plain_graph` at
    capture to record the plain or the relay launches.
  * AROUND ``DecodeCudaGraphRunner._resolve_lora_variant``: replay the plain graph when the
    backend planned a plain step (``RelayAttnBackend.step_is_plain``), else the relay graph.

Graphs are captured twice (startup time and graph memory per batch size grow accordingly);
``RELAY_RADIX_PLAIN_GRAPHS=0`` keeps one relay graph per batch size.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
RELAY_GRAPH = "lora"  # the label SGLang captures first for each batch size
PLAIN_GRAPH = "nolora"


def capturing_plain_graph() -> bool:
    """True while the decode runner captures the plain graph of a batch size."""
    from sglang.srt.model_executor.runner_utils.capture_mode import get_capture_lora_variant

    return get_capture_lora_variant() == PLAIN_GRAPH


def _relay_backend_for_plain_graphs(runner):
    """The runner's relay backend if it should get plain graphs, else None."""
    from relay_radix.patches.scheduler_hooks import find_relay_backend

    backend = find_relay_backend(getattr(runner, "attn_backend", None))
    if backend is None or not backend.wants_plain_graphs:
        return None  # not relay, turned off, or Triton suffixes (no plain path)
    if getattr(runner.model_runner, "is_draft_worker", False):
        return None
    return backend


def around_capture_one_stream(original, self, *args, **kwargs):
    # SGLang: DecodeCudaGraphRunner._capture_one_stream -- capture relay + plain graphs per bs.
    backend = _relay_backend_for_plain_graphs(self)
    if backend is None:
        return original(self, *args, **kwargs)
    from sglang.srt.model_executor.runner_utils.capture_mode import _set_capture_lora_variant

    self.record_nolora_graph = True
    self._relay_plain_backend = backend
    try:
        out = original(self, *args, **kwargs)
    finally:
        _set_capture_lora_variant(None)  # SGLang leaves the last label set after its loop
    backend.plain_graphs = True
    logger.info("relay-radix: decode graphs captured twice per batch size: relay, and plain for steps with "
                "no group (RELAY_RADIX_PLAIN_GRAPHS=0 to capture the relay graph only)")
    return out


def around_resolve_lora_variant(original, self, forward_batch):
    # SGLang: DecodeCudaGraphRunner._resolve_lora_variant -- which of the two graphs replays.
    backend = getattr(self, "_relay_plain_backend", None)
    if backend is None:
        return original(self, forward_batch)
    return PLAIN_GRAPH if backend.step_is_plain else RELAY_GRAPH


def register(hook_registry, hook_type) -> None:
    hook_registry.register(f"{RUNNER}._capture_one_stream", around_capture_one_stream, hook_type.AROUND)
    hook_registry.register(f"{RUNNER}._resolve_lora_variant", around_resolve_lora_variant, hook_type.AROUND)
