"""Shared pytest setup (kernel tests: run Triton kernels through the interpreter when no GPU)."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit functions are defined (i.e. before relay_radix.kernels
    # is imported). Only on CPU-only machines, so GPU runs compile real kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
