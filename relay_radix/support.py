"""What relay supports, checked loudly at launch (never silently wrong attention).

Two checkpoints: :func:`check_server_args` runs on the resolved ``ServerArgs`` (a hook after
``ServerArgs.__post_init__``, in the launcher, before any process is spawned);
:func:`check_model_runner` runs when the backend is built, where the model is known.
Each refusal says what to use instead.
"""

from __future__ import annotations

import torch

SUPPORTED_KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALTERNATIVE = "use --attention-backend flashinfer (vanilla radix caching) for this setup"


class RelayUnsupported(ValueError):
    """A launch configuration relay-radix refuses."""


def _refuse(what: str, fix: str) -> None:
    raise RelayUnsupported(f"relay-radix: {what} is not supported. {fix}")


def server_args_problems(args) -> list[tuple[str, str]]:
    """(what, fix) for each unsupported server setting of a relay launch."""
    out = []
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if g("speculative_algorithm"):
        out.append(("speculative decoding (--speculative-algorithm)", "Drop the speculative flags or " + ALTERNATIVE))
    if (g("page_size") or 1) != 1:
        out.append((f"--page-size {g('page_size')}", "Use --page-size 1 (relay addresses KV per token)"))
    if g("disable_radix_cache"):
        out.append(("--disable-radix-cache", "Relay groups come from the radix tree: keep the radix cache on"))
    if g("enable_hierarchical_cache"):
        out.append(("--enable-hierarchical-cache", "Drop it, or " + ALTERNATIVE))
    kv = str(g("kv_cache_dtype") or "auto")
    if kv not in ("auto", "bfloat16", "bf16"):  # SGLang's unquantized --kv-cache-dtype choices
        out.append((f"--kv-cache-dtype {kv} (quantized KV)", "Use --kv-cache-dtype auto, or " + ALTERNATIVE))
    if g("enable_dp_attention"):
        out.append(("--enable-dp-attention", "Drop it (use --dp-size without DP attention), or " + ALTERNATIVE))
    if g("enable_deterministic_inference"):
        out.append(("--enable-deterministic-inference", ALTERNATIVE))
    if g("enable_two_batch_overlap"):
        # Two-batch overlap wraps the backend per micro-batch (TboAttnBackend); those copies
        # would get no relay plan and decode with no groups.
        out.append(("--enable-two-batch-overlap", "Drop it, or " + ALTERNATIVE))
    if g("enable_pdmux"):
        out.append(("--enable-pdmux", ALTERNATIVE))
    if str(g("disaggregation_mode") or "null") != "null":
        out.append(("prefill/decode disaggregation", ALTERNATIVE))
    backend = g("radix_cache_backend")
    if backend not in (None, "", "relay"):
        out.append((f"--radix-cache-backend {backend}", "Leave it unset (relay sets 'relay')"))
    return out


def check_server_args(args) -> None:
    """Refuse unsupported server settings, and read the ``RELAY_RADIX_*`` settings here so a
    bad value fails in the launcher rather than in each spawned scheduler."""
    problems = server_args_problems(args)
    if problems:
        _refuse("; ".join(w for w, _ in problems), " ".join(f for _, f in problems))
    from relay_radix.config import RelayConfig

    RelayConfig.from_env()


def check_model_runner(runner) -> None:
    """Refuse models whose attention relay would compute wrong."""
    if getattr(runner, "use_mla_backend", False):
        _refuse("MLA attention (DeepSeek-style latent KV)", ALTERNATIVE)
    if getattr(runner, "is_draft_worker", False):
        _refuse("a speculative draft worker", "Drop the speculative flags")
    mc = runner.model_config
    if getattr(mc, "is_encoder_decoder", False):
        _refuse("encoder-decoder (cross attention) models", ALTERNATIVE)
    hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    window = getattr(hf, "sliding_window", None) if hf is not None else None
    # Qwen2-style configs carry a window they do not use (use_sliding_window=False).
    if (window and getattr(hf, "use_sliding_window", True)) or getattr(mc, "is_hybrid_swa", False) \
            or getattr(mc, "sliding_window_size", None):
        _refuse(f"sliding-window attention (window {window})", ALTERNATIVE)
    if getattr(mc, "attention_chunk_size", None):
        _refuse("chunked local attention", ALTERNATIVE)
    dtype = getattr(runner.token_to_kv_pool, "dtype", None)
    if dtype is not None and dtype not in SUPPORTED_KV_DTYPES:
        _refuse(f"KV cache dtype {dtype}", "Use --kv-cache-dtype auto, or " + ALTERNATIVE)
    model_dtype = getattr(mc, "dtype", None)
    if dtype is not None and model_dtype is not None and dtype != model_dtype:
        # The relay kernels multiply queries (model dtype) with keys on tensor cores in one dtype.
        _refuse(f"KV cache dtype {dtype} with model dtype {model_dtype}",
                "Use --kv-cache-dtype auto (the model's dtype), or " + ALTERNATIVE)
    if getattr(runner, "page_size", 1) != 1:
        _refuse(f"page size {runner.page_size}", "Use --page-size 1")
