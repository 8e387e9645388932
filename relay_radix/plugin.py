"""SGLang general plugin (entry point ``sglang.srt.plugins: relay``).

``load_plugins()`` calls :func:`register` in the launcher process and in every scheduler
process (SGLang 0.5.16 ``srt/plugins/__init__.py:103-141``: once per process, and each
spawned child loads the plugins afresh). It uses SGLang's own seams:
  * ``add_attention_backend_choices`` + ``register_attention_backend("relay")``,
  * ``register_radix_cache_backend("relay")`` (the tree that tracks relay groups),
  * ``HookRegistry`` for what has no seam: server-argument checks and the scheduler's plan
    hook (``relay_radix.patches``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "relay"
_registered = False


def register() -> None:
    """Register the ``relay`` attention backend, radix cache backend and hooks (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    _stack_dump_on_sigusr1()
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_relay_backend)
    if get_radix_cache_factory(BACKEND_NAME) is None:
        from relay_radix.radix_cache import relay_radix_cache_factory

        register_radix_cache_backend(BACKEND_NAME, relay_radix_cache_factory)

    from relay_radix.patches import register_hooks

    register_hooks()


def _stack_dump_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack to stderr (the server log):
    how a stuck server is diagnosed where no debugger runs. SGLang does not use SIGUSR1."""
    import faulthandler
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def create_relay_backend(runner):
    """``register_attention_backend`` factory: check the model, build base + relay backends."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from relay_radix.backend import RelayAttnBackend
    from relay_radix.config import RelayConfig
    from relay_radix.support import check_model_runner

    config = RelayConfig.from_env()
    check_model_runner(runner)
    if config.kernel == "flashinfer" and str(runner.device).startswith("cuda") and config.suffix_kernel() != "flashinfer":
        # The FlashInfer relay kernel merges the groups' states on top of the suffix state that
        # SGLang's FlashInfer decode wrappers write (relay_radix.suffix_decode).
        raise ValueError(
            "relay-radix: RELAY_RADIX_KERNEL=flashinfer runs suffixes on FlashInfer's decode: leave "
            "RELAY_RADIX_SUFFIX unset and RELAY_RADIX_BASE_BACKEND unset or flashinfer, or use "
            "RELAY_RADIX_KERNEL=triton")
    base_name = config.base_backend or ("flashinfer" if str(runner.device).startswith("cuda") else "torch_native")
    if base_name == BACKEND_NAME or base_name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"RELAY_RADIX_BASE_BACKEND={base_name!r} is not a usable base backend; "
            "use flashinfer, triton or torch_native")
    base = ATTENTION_BACKENDS[base_name](runner)
    logger.info("relay-radix: decode=relay(%s prefix, %s suffix), prefill/extend=%s, min_group_size=%d, "
                "min_prefix_tokens=%d", config.kernel, config.suffix_kernel() if str(runner.device).startswith("cuda")
                else "reference", base_name, config.min_group_size, config.min_prefix_tokens)
    return RelayAttnBackend(runner, base, config)
