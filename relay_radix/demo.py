"""relay-radix demo: with a GPU it launches the relay server; without one it replays a
shared-system-prompt workload over SGLang's real radix cache on the CPU.

CPU mode (``python -m relay_radix.demo``): requests with two system prompts (one with a
nested few-shot block) arrive, decode, finish. Each step prints the relay groups the
manager promoted, the KV bytes decode attention reads with relay against vanilla (for the
Llama-2-7B shape), and the max relative difference between the relay backend and SGLang's
``torch_native`` backend on the same batch. The gate (``relay_radix.gate``) prices each step
for that shape on an H100, so the groups are sized as a serving batch would be: 32 requests
on a 2K prompt, 16 of them under a 1K few-shot block (a nested group); a third, small
prompt's group relays only beside them, and the last steps, with few requests left, decode
plainly ("gated: faster unshared").

GPU mode (``python -m relay_radix.demo --serve``, or automatically when CUDA is present):
``relay_radix.launch_server`` on the built-in Llama-2-7B-shaped model.
"""

from __future__ import annotations

import argparse
import random
import sys
import types


def _words(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(n)]


def run_cpu_demo(steps: int = 12, seed: int = 0) -> dict:
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention

    from relay_radix.config import RelayConfig
    from relay_radix.cpu_sim import MiniScheduler, cpu_model_runner, forward_batch
    from relay_radix.gate import AttentionDims
    from relay_radix.metrics import format_stats
    from relay_radix.patches.scheduler_hooks import before_run_batch
    from relay_radix.plugin import create_relay_backend

    cfg = RelayConfig(min_group_size=4, demote_group_size=2, min_prefix_tokens=256)
    sched = MiniScheduler(num_q_heads=8, num_kv_heads=2, head_dim=64, relay_config=cfg, seed=seed,
                          kv_size=65536, max_context=4096)
    runner = cpu_model_runner(sched)
    relay = create_relay_backend(runner)
    relay.attach(sched.tree.relay)
    # Bytes are reported for the Llama-2-7B shape (the tiny CPU model only checks the math).
    relay.dims = sched.tree.relay.dims = AttentionDims(32, 32, 128, 2)
    relay.num_layers = 32
    native = TorchNativeAttnBackend(cpu_model_runner(sched))
    layers = [RadixAttention(8, 64, 64 ** -0.5, 2, layer_id=i) for i in range(sched.num_layers)]
    gen = torch.Generator().manual_seed(seed)
    scheduler = types.SimpleNamespace(_relay_backend=relay)

    support, fewshot, coding = _words(1, 2048), _words(2, 1024), _words(3, 768)
    # Prefill batches per step. A prompt's first request is prefilled alone, as a server's
    # first arrival would be: the requests after it then find the prompt in the radix tree.
    nested = [support + fewshot + _words(100 + i, 24) for i in range(16)]
    coders = [coding + _words(300 + i, 16) for i in range(5)]
    arrivals = {0: [nested[:1], nested[1:] + [support + _words(200 + i, 32) for i in range(16)]],
                2: [coders[:1], coders[1:] + [_words(400, 64)]],
                5: [[support + _words(500 + i, 20) for i in range(3)]]}
    worst, saved_total, vanilla_total, relayed_steps, gated_steps = 0.0, 0, 0, 0, 0
    print(f"{'step':>4} {'reqs':>4}  groups (level:[start,end) x members)        relay vs torch_native")
    for step in range(steps):
        for prompts in arrivals.get(step, []):
            sched.prefill([sched.new_req(t, max_new_tokens=64) for t in prompts])
        if step >= 7 and sched.running:  # requests start finishing
            for r in sched.running[: 8]:
                sched.finish(r)
        if not sched.running:
            break
        batch = sched.decode_batch()
        before_run_batch(scheduler, batch)
        fb = forward_batch(sched, batch, runner)
        relay.init_forward_metadata(fb)
        native.init_forward_metadata(fb)
        err = 0.0
        bs = len(batch.reqs)
        for layer in layers:
            q = torch.randn(bs, 8 * 64, generator=gen)
            k, v = torch.randn(bs, 2, 64, generator=gen), torch.randn(bs, 2, 64, generator=gen)
            a, b = relay.forward(q, k, v, layer, fb), native.forward(q, k, v, layer, fb)
            err = max(err, ((a - b).norm() / b.norm()).item())
        worst = max(worst, err)
        plan, stats = relay.plan, relay.last_stats
        groups = ", ".join(
            f"L{int(plan.group_level[g])}:[{int(plan.group_start[g])},{int(plan.group_end[g])})"
            f"x{int(plan.member_indptr[g + 1] - plan.member_indptr[g])}" for g in range(plan.num_groups))
        print(f"{step:>4} {bs:>4}  {groups or '-':<44} {err:.1e}   {format_stats(stats)}")
        saved_total += stats.kv_bytes_vanilla - stats.kv_bytes_relay
        vanilla_total += stats.kv_bytes_vanilla
        relayed_steps += plan.num_groups > 0
        gated_steps += stats.groups_gated > 0
        sched.after_decode(batch)
    for r in sched.running:
        sched.finish(r)
    leaked = sched.tree.protected_size()
    print(f"\nKV bytes saved over the run: {saved_total / 1e9:.2f} of {vanilla_total / 1e9:.2f} GB "
          f"({100 * saved_total / max(vanilla_total, 1):.0f}%); max rel. difference to torch_native "
          f"{worst:.1e}; pinned tokens after all finished: {leaked}")
    return dict(max_rel_err=worst, saved_bytes=saved_total, vanilla_bytes=vanilla_total, leaked=leaked,
                relayed_steps=relayed_steps, gated_steps=gated_steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="launch the relay server (needs a GPU)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU demo")
    ap.add_argument("--steps", type=int, default=12)
    a, rest = ap.parse_known_args(argv)
    import torch

    if a.serve or (torch.cuda.is_available() and not a.cpu):
        from relay_radix import launch_server

        sys.argv = ["relay_radix.launch_server", "--model-path", "relay-radix/llama2-7b-mha", *rest]
        return launch_server.main() or 0
    r = run_cpu_demo(a.steps)
    return 0 if r["max_rel_err"] < 1e-5 and r["leaked"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
