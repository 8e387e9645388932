"""The relay gate against measured kernel time: is the server's decision ever slower than vanilla?

    python bench/kernels/gate_sweep.py --out DIR     # writes gate-<device>.json / .md

For small groups and short prompts relay can lose: vanilla's members read a shared segment at
about the same time and hit L2, while relay adds a merge launch and a side-stream join. The
gate (``relay_radix.gate``) prices both sides. This sweep measures, per config and per layer,
in one CUDA graph each:
  * ``fi_decode``: vanilla (FlashInfer batch decode over whole sequences);
  * ``relay`` (H): the server's relay path (FlashInfer suffix decode, Triton prefix on a side
    stream, merge);
  * ``plain``: the server's plain graph over the same rows unshared (what it runs when the gate
    says no).
For each config it then compares the gate's decision with the faster of relay and plain.
It also searches a grid of the gate's main constants (``decode_tflops``, ``reread_tbps``,
``step_us``) for the ones that never pick a slower relay step and leave the least time on the
table. That search is the
calibration behind ``relay_radix.gate.H100_COSTS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as kb  # noqa: E402  (bench/kernels/run.py: workloads, kernels, timing)

SHAPES = [("llama2-7b", 32, 32, 128), ("llama3-8b", 32, 8, 128)]
PREFIXES = [256, 512, 1024, 2048, 4096, 8192]
BATCHES = [4, 8, 16, 32, 64]
TOLERANCE = 0.01  # a relay step within 1% of plain counts as a tie (timing noise)


def sweep_configs():
    for sname, hq, hkv, d in SHAPES:
        for p in PREFIXES:
            for b in BATCHES:
                yield f"{sname} P={p} B={b}", dict(hq=hq, hkv=hkv, d=d, bs=b, groups_spec=[[(0, b, p)]])
        # Several small groups in one step (their gains add up against one fixed step cost).
        for n, m, p in ((4, 8, 1024), (8, 4, 2048), (32, 4, 2048), (16, 8, 512)):
            yield f"{sname} {n}x(P={p},B={m})", dict(hq=hq, hkv=hkv, d=d, bs=n * m,
                                                    groups_spec=[[(i * m, (i + 1) * m, p) for i in range(n)]])


def decisions(rows, costs):
    """(relayed but slower than plain, plain but relay would win) config names under ``costs``."""
    from relay_radix.gate import AttentionDims, step_relays

    losses, missed = [], []
    for r in rows:
        dims = AttentionDims(r["hq"], r["hkv"], r["d"], 2)
        relays = step_relays([tuple(g) for g in r["groups"]], dims, costs=costs)
        relay, plain = r["ms"]["relay"], r["ms"]["plain"]
        if relays and relay > plain * (1 + TOLERANCE):
            losses.append(r["config"])
        if not relays and relay < plain * (1 - TOLERANCE):
            missed.append(r["config"])
    return losses, missed


def fit(rows):
    """Grid search of the gate's constants (``decode_tflops``, ``reread_tbps``, ``step_us``):
    no loss first, then the least time left on the table by missed wins."""
    from relay_radix.gate import H100_COSTS

    by_name = {r["config"]: r for r in rows}
    best = None
    for tflops in (40, 60, 88, 120, 160):
        for tbps in (20, 32, 64, 128):
            for step_us in (3, 4, 5, 6, 7, 8, 10, 12):
                costs = dataclasses.replace(H100_COSTS, decode_tflops=float(tflops), reread_tbps=float(tbps),
                                            step_us=float(step_us))
                losses, missed = decisions(rows, costs)
                left = sum(by_name[n]["ms"]["plain"] - by_name[n]["ms"]["relay"] for n in missed)
                key = (len(losses), round(left, 4), -step_us)
                if best is None or key < best[0]:
                    best = (key, dict(decode_tflops=tflops, reread_tbps=tbps, step_us=step_us, losses=losses,
                                      missed=missed))
    return best[1]


def write_reports(res, out_dir, tag):
    from relay_radix.gate import H100_COSTS

    with open(os.path.join(out_dir, f"gate-{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    c = H100_COSTS
    lines = [f"# Relay gate against measured decode time on {res['device']} ({res['date']})", "",
             f"torch {res['torch']}, triton {res['triton']}, flashinfer {res['flashinfer']}; bf16, page size 1, "
             "suffixes U[64,512]; per layer, CUDA graph, L2 flushed before each repetition "
             "(`bench/kernels/gate_sweep.py`).", "",
             f"Gate constants (`relay_radix.gate.H100_COSTS`): decode {c.decode_tflops:g} TFLOP/s, reread "
             f"{c.reread_tbps:g} TB/s, group {c.group_us:g} us, step {c.step_us:g} us, HBM {c.hbm_tbps:g} TB/s. relay: the server's relay path (H). plain: its plain "
             "graph over the same rows unshared. gate gain: `step_gain_us` (> 0: relay). measured gain: plain - relay. "
             "S: the path the gate picks.", "",
             "| config | fi_decode ms | relay ms | plain ms | gate gain us | measured gain us | gate | S vs FI decode | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = r["ms"]
        s_ms = ms["relay"] if r["gate_relays"] else ms["plain"]
        best = "relay" if ms["relay"] < ms["plain"] else "plain"
        pick = "relay" if r["gate_relays"] else "plain"
        gap = abs(ms["relay"] - ms["plain"]) / min(ms["relay"], ms["plain"])
        verdict = "ok" if pick == best or gap <= TOLERANCE else ("LOSS" if pick == "relay" else "missed win")
        lines.append(f"| {r['config']} | {ms['fi_decode']:.4f} | {ms['relay']:.4f} | {ms['plain']:.4f} | "
                     f"{r['gate_gain_us']:.1f} | {1e3 * (ms['plain'] - ms['relay']):.1f} | {pick} | "
                     f"{ms['fi_decode'] / s_ms:.2f}x | {verdict} |")
    losses, missed = decisions(res["rows"], H100_COSTS)
    f = res.get("fit")
    lines += ["", f"With these constants: {len(losses)} relayed steps slower than plain by more than "
              f"{100 * TOLERANCE:.0f}% ({', '.join(losses) or 'none'}); {len(missed)} missed wins "
              f"({', '.join(missed) or 'none'})."]
    if f:
        lines.append(f"Grid search (no loss first, then the least time in missed wins): decode {f['decode_tflops']} "
                     f"TFLOP/s, reread {f['reread_tbps']} TB/s, step {f['step_us']} us: {len(f['losses'])} losses, "
                     f"{len(f['missed'])} missed wins.")
    with open(os.path.join(out_dir, f"gate-{tag}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--budget-s", type=float, default=240.0)
    args = ap.parse_args()
    import flashinfer
    import triton

    from relay_radix.gate import step_gain_us

    name = torch.cuda.get_device_name(0)
    tag = "h100" if "H100" in name else ("h200" if "H200" in name else name.replace(" ", "_").lower())
    res = dict(device=name, torch=torch.__version__, triton=triton.__version__, flashinfer=flashinfer.__version__,
               date=datetime.datetime.now().isoformat(timespec="seconds"), rows=[])
    deadline = time.time() + args.budget_s
    kernels = dict(fi_decode=kb.k_fi_decode, relay=kb.k_relay_hybrid_stream, plain=kb.k_relay_plain)
    for cname, spec in sweep_configs():
        if time.time() > deadline:
            kb.log("gate sweep: deadline reached at", cname)
            break
        w = kb.make_workload(**spec)
        groups = kb.gate_groups(w)
        row = dict(config=cname, hq=w["hq"], hkv=w["hkv"], d=w["d"], bs=w["bs"], groups=groups,
                   gate_relays=kb.gate_relays(w), gate_gain_us=step_gain_us(groups, kb.gate_dims(w)), ms={})
        try:
            for k, fn in kernels.items():
                run_fn, _, _ = fn(w)
                row["ms"][k] = kb.bench_ms(run_fn)[0]
        except Exception as e:  # noqa: BLE001
            kb.log(cname, "FAILED", repr(e)[:300])
            torch.cuda.synchronize()
            continue
        finally:
            del w
        res["rows"].append(row)
        kb.log(cname, {k: round(v, 4) for k, v in row["ms"].items()}, "gate", row["gate_relays"])
    res["fit"] = fit(res["rows"])
    write_reports(res, args.out, tag)
    with open(os.path.join(args.out, f"gate-{tag}.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
