"""Relay decode attention kernels (``relay_radix.kernels``).

Public API:
  * :class:`TritonRelayDecode` / :func:`relay_decode_triton`: Triton path (CPU-testable
    under ``TRITON_INTERPRET=1``), plan/run with static CUDA-graph buffers. With
    ``external_suffix=True`` (the server's default) it computes only the shared-segment parts
    and merges them onto a suffix state computed by FlashInfer's paged decode.
  * :class:`FlashInferRelayDecode` / :func:`relay_decode_flashinfer`: FlashInfer 0.6.14 path
    (GPU only; imported lazily so this package imports without FlashInfer).
See ``README.md`` in this folder for the tensor contract.
"""

from .triton_relay import TritonRelayDecode, relay_decode_triton
from .work_plan import RelayWorkPlan, build_work_plan

__all__ = [
    "FlashInferRelayDecode",
    "RelayWorkPlan",
    "TritonRelayDecode",
    "build_work_plan",
    "relay_decode_flashinfer",
    "relay_decode_triton",
]


def __getattr__(name: str):
    # Lazy: flashinfer imports CUDA bits at import time.
    if name in ("FlashInferRelayDecode", "relay_decode_flashinfer"):
        from . import flashinfer_relay

        return getattr(flashinfer_relay, name)
    raise AttributeError(name)
