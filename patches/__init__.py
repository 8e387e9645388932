"""SGLang hooks relay-radix still needs where SGLang has no seam (import name
``relay_radix.patches``). Each hook names the SGLang function it wraps and why."""

from relay_radix.patches.scheduler_hooks import register_hooks

__all__ = ["register_hooks"]
