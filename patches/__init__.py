"""SGLang hooks relay-radix still needs where SGLang has no seam (import name
``relay_radix.patches``). Each hook names the SGLang function it wraps and why.

* ``scheduler_hooks``: server-argument checks, linking the tree to the backend, and the
  per-step decode plan (``Scheduler.run_batch``);
* ``cuda_graph``: a plain decode graph per batch size, replayed for steps with no group.
"""

from relay_radix.patches.scheduler_hooks import register_hooks

__all__ = ["register_hooks"]
