"""Host cost of the scheduler's decode relay plan (CPU): 256 requests, 4 groups.

Builds the state with SGLang's real radix cache and batches (relay_radix.cpu_sim), then
times ``build_decode_plan`` (sync with the batch + group refresh + plan tensors) per decode
step in steady state, and a step where the batch changed (one request left, one joined).
Writes bench/results/plan-cost-cpu.json and prints a table.

    python bench/plan/plan_cost.py [--reqs 256] [--groups 4] [--prompt 2048]
"""
import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time

import torch

from relay_radix.config import RelayConfig
from relay_radix.cpu_sim import MiniScheduler
from relay_radix.plan import build_decode_plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reqs", type=int, default=256)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    rng = random.Random(0)
    per = a.reqs // a.groups
    s = MiniScheduler(num_q_heads=4, num_kv_heads=1, head_dim=16, num_layers=1, max_reqs=a.reqs + 8,
                      kv_size=a.groups * a.prompt + a.reqs * 64 + 4096, max_context=a.prompt + 256,
                      relay_config=RelayConfig(min_group_size=4, min_prefix_tokens=256, gate=False))
    prompts = [[rng.randrange(3, 999) for _ in range(a.prompt)] for _ in range(a.groups)]
    for p in prompts:
        s.prefill([s.new_req(p + [rng.randrange(3, 999) for _ in range(16)])])
    for p in prompts:
        s.prefill([s.new_req(p + [rng.randrange(3, 999) for _ in range(16)]) for _ in range(per - 1)])
    batch = s.decode_batch()
    reqs, pool, lens = batch.reqs, batch.req_pool_indices_cpu, batch.seq_lens_cpu
    plan = build_decode_plan(s.tree.relay, reqs, pool, lens)
    assert plan.num_groups == a.groups and plan.batch_size == a.reqs
    steady = []
    for _ in range(a.iters):
        t = time.perf_counter()
        build_decode_plan(s.tree.relay, reqs, pool, lens)
        steady.append((time.perf_counter() - t) * 1e6)
    # A changed batch: one member leaves and one request joins between steps.
    changed = []
    for i in range(20):
        s.after_decode(batch)
        s.finish(s.running[i % len(s.running)])
        s.prefill([s.new_req(prompts[i % a.groups] + [rng.randrange(3, 999) for _ in range(16)])])
        batch = s.decode_batch()
        t = time.perf_counter()
        build_decode_plan(s.tree.relay, batch.reqs, batch.req_pool_indices_cpu, batch.seq_lens_cpu)
        changed.append((time.perf_counter() - t) * 1e6)
    res = dict(
        what="build_decode_plan host time per decode step (sync + refresh + plan tensors)",
        reqs=a.reqs, groups=a.groups, prompt_tokens=a.prompt,
        steady_median_us=round(statistics.median(steady), 1), steady_p90_us=round(sorted(steady)[int(0.9 * len(steady))], 1),
        changed_median_us=round(statistics.median(changed), 1),
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
        date=datetime.date.today().isoformat(), command="python bench/plan/plan_cost.py",
    )
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/plan-cost-cpu.json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"| reqs | groups | steady median (us) | steady p90 (us) | batch changed, median (us) |")
    print(f"|---|---|---|---|---|")
    print(f"| {a.reqs} | {a.groups} | {res['steady_median_us']} | {res['steady_p90_us']} | {res['changed_median_us']} |")


if __name__ == "__main__":
    main()
