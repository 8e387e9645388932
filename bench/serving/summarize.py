"""Summarize serving benchmarks: relay vs vanilla side by side.

    python bench/serving/summarize.py RESULTS.json [more.json ...] [raw.jsonl ...] --out-dir bench/results

Inputs are ``results.json`` files written by ``run_serving.py`` (one per device call) and/or
raw ``--output-file`` JSONL of ``sglang.benchmark.serving`` whose ``tag`` is
``<model>/<system>/<workload>[@rate]`` (as run_serving.py sets it). Writes
``serving-<device>.json`` (device, versions, dates, exact commands, every config and result),
``serving-<device>.md`` (tables) and ``serving-<device>-<model>-*.png`` (plots, if matplotlib
is installed). Later inputs override earlier ones for the same (model, system, workload, rate).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
from run_serving import WORKLOADS, check_input_tokens  # noqa: E402  (stdlib-only module)

SYSTEMS = ("relay", "vanilla")


def device_slug(device: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    s = (device or "unknown").lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def parse_tag(tag: str | None) -> tuple[str, str, str, float | None] | None:
    """``llama2-7b-mha/relay/rate8k@16`` -> (model, system, workload, 16.0); None if not ours."""
    parts = (tag or "").split("/")
    if len(parts) != 3 or parts[1] not in SYSTEMS:
        return None
    workload, _, rate = parts[2].partition("@")
    return parts[0], parts[1], workload, float(rate) if rate else None


def calls_from_jsonl(path: Path) -> dict:
    """A results dict (as run_serving.py writes) built from raw benchmark JSONL records."""
    runs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        parsed = parse_tag(rec.get("tag"))
        if parsed is None:
            print(f"{path}: skipping a record with tag {rec.get('tag')!r}", file=sys.stderr)
            continue
        model, system, workload, rate = parsed
        run = {"model": model, "system": system, "workload": workload, "rate": rate,
               "result": {k: v for k, v in rec.items() if not isinstance(v, (list, dict))}}
        w = WORKLOADS.get(workload)
        if w is not None and w.kind != "rate":
            expected = rec.get("expected_input_tokens") or w.expected_input_tokens()
            ok, err = check_input_tokens(expected, rec.get("total_input_tokens"))
            run.update(expected_input_tokens=expected, input_tokens_ok=ok, input_tokens_rel_err=err)
        runs.append(run)
    model = runs[0]["model"] if runs else None
    return {"model": model, "device": None, "source": str(path), "runs": runs, "rate_search": {}}


def load(paths: list[str]) -> list[dict]:
    calls = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl":
            calls.append(calls_from_jsonl(p))
        else:
            call = json.loads(p.read_text())
            call.setdefault("source", str(p))
            calls.append(call)
    return calls


def index(calls: list[dict]) -> dict:
    """{(model, workload, rate): {system: run}}; later calls win."""
    table: dict = {}
    for call in calls:
        for run in call.get("runs", []):
            if "result" not in run:
                continue
            model = run.get("model") or call.get("model")
            key = (model, run["workload"], run.get("rate"))
            table.setdefault(key, {})[run["system"]] = run
    return table


def _f(x, fmt="{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(a, b, fmt="{:.2f}x") -> str:
    return "–" if a is None or not b else fmt.format(a / b)


def _get(run: dict | None, key: str):
    return None if run is None else run["result"].get(key)


def _input_note(runs: dict) -> str:
    notes = []
    for system, run in sorted(runs.items()):
        if run.get("input_tokens_ok") is False:
            err = run.get("input_tokens_rel_err")
            notes.append(f"{system} MISMATCH {_f(err, '{:+.1%}') if err is not None else '(missing)'}")
    return "; ".join(notes) or "exact"


def markdown(calls: list[dict]) -> str:
    table = index(calls)
    models = sorted({k[0] for k in table if k[0]})
    devices = sorted({c.get("device") for c in calls if c.get("device")}) or ["unknown device"]
    out = [f"# Serving benchmark: relay vs vanilla SGLang ({', '.join(devices)})", ""]
    for call in calls:
        v = call.get("versions") or {}
        out.append(f"- {call.get('model')} {call.get('date', '')} {call.get('gpu', '')}: "
                   + ", ".join(f"{k} {x}" for k, x in v.items() if x) + f" ({call.get('source', '')})")
        for msg in call.get("errors", []):
            out.append(f"  - ERROR: {msg}")
        for msg in call.get("skipped", []):
            out.append(f"  - skipped: {msg}")
        if ex := call.get("exactness"):
            out.append(f"  - exactness (relay vs vanilla, greedy, same prompts): {ex['identical_greedy']}/"
                       f"{ex['requests']} identical outputs, max |logprob diff| chosen "
                       f"{ex['max_abs_logprob_diff_chosen']:.3g}, top-k {ex['max_abs_logprob_diff_topk']:.3g}")
    out.append("")
    for model in models:
        out += [f"## {model}", "",
                "Control TPOT: median TPOT of the same-shape workload with nothing shared (vanilla's run; "
                "relay's if vanilla has none). 1.00 = the shared prompt costs nothing per decode step.", "",
                "| workload | what | relay tok/s | vanilla tok/s | tok/s ratio | relay med TTFT ms | "
                "vanilla med TTFT ms | relay med TPOT ms | vanilla med TPOT ms | TPOT speedup | "
                "relay p99 TPOT ms | vanilla p99 TPOT ms | relay TPOT / control | vanilla TPOT / control | "
                "input tokens |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, w in WORKLOADS.items():
            runs = table.get((model, name, None))
            if not runs:
                continue
            r, v = runs.get("relay"), runs.get("vanilla")
            ctrl = table.get((model, w.control, None), {}) if w.control else {}
            ctrl_tpot = _get(ctrl.get("vanilla"), "median_tpot_ms") or _get(ctrl.get("relay"), "median_tpot_ms")
            out.append("| " + " | ".join([
                name, w.desc,
                _f(_get(r, "output_throughput")), _f(_get(v, "output_throughput")),
                _ratio(_get(r, "output_throughput"), _get(v, "output_throughput")),
                _f(_get(r, "median_ttft_ms")), _f(_get(v, "median_ttft_ms")),
                _f(_get(r, "median_tpot_ms"), "{:.1f}"), _f(_get(v, "median_tpot_ms"), "{:.1f}"),
                _ratio(_get(v, "median_tpot_ms"), _get(r, "median_tpot_ms")),
                _f(_get(r, "p99_tpot_ms"), "{:.1f}"), _f(_get(v, "p99_tpot_ms"), "{:.1f}"),
                _ratio(_get(r, "median_tpot_ms"), ctrl_tpot, "{:.2f}"),
                _ratio(_get(v, "median_tpot_ms"), ctrl_tpot, "{:.2f}"),
                _input_note(runs),
            ]) + " |")
        out.append("")
        searches = [(c.get("rate_search") or {}, c) for c in calls if c.get("model") == model]
        if any(s for s, _ in searches):
            out += ["Request-rate search on `rate8k` (8K shared prompt, Poisson arrivals, ~10 s of arrivals per rate):", "",
                    "| system | SLO p99 TPOT ms | tried: rate req/s -> p99 TPOT ms | sustainable rate req/s |",
                    "|---|---|---|---|"]
            for search, _ in searches:
                for system in SYSTEMS:
                    s = search.get(system)
                    if not s:
                        continue
                    tried = ", ".join(f"{t['rate']:g} -> {_f(t['p99_tpot_ms'], '{:.1f}')}{'' if t['pass'] else ' (fail)'}"
                                      for t in sorted(s.get("tried", []), key=lambda t: t["rate"]))
                    rate = s.get("sustainable_rate")
                    top = "" if rate is None or s.get("bounded_above") else " (highest tried)"
                    out.append(f"| {system} | {s.get('slo_p99_tpot_ms')} | {tried} | {_f(rate, '{:g}')}{top} |")
            out.append("")
    return "\n".join(out) + "\n"


def plot(calls: list[dict], out_dir: Path, slug: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return []
    table = index(calls)
    written = []
    for model in sorted({k[0] for k in table if k[0]}):
        names = [n for n, w in WORKLOADS.items() if w.kind != "rate" and (model, n, None) in table]
        if names:
            fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names)), 4.5))
            for ax, key, label in ((axes[0], "output_throughput", "output tok/s"),
                                   (axes[1], "median_tpot_ms", "median TPOT ms")):
                for i, system in enumerate(SYSTEMS):
                    vals = [_get(table[(model, n, None)].get(system), key) or 0 for n in names]
                    ax.bar([x + (i - 0.5) * 0.4 for x in range(len(names))], vals, 0.4, label=system)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
                ax.set_ylabel(label)
                ax.legend()
            fig.suptitle(f"{model}: relay vs vanilla ({slug})")
            fig.tight_layout()
            path = out_dir / f"serving-{slug}-{model}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        rate_runs = {k: v for k, v in table.items() if k[0] == model and k[1] == "rate8k" and k[2] is not None}
        if rate_runs:
            fig, ax = plt.subplots(figsize=(6, 4))
            for system in SYSTEMS:
                pts = sorted((k[2], _get(v.get(system), "p99_tpot_ms")) for k, v in rate_runs.items() if system in v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=system)
            slos = {s.get("slo_p99_tpot_ms") for c in calls if c.get("model") == model
                    for s in (c.get("rate_search") or {}).values()} - {None}
            for slo in slos:
                ax.axhline(slo, ls="--", color="gray", label=f"SLO {slo:g} ms")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("request rate (req/s, Poisson)")
            ax.set_ylabel("p99 TPOT ms")
            ax.set_title(f"{model}: 8K shared prompt")
            ax.legend()
            fig.tight_layout()
            path = out_dir / f"serving-{slug}-{model}-rate.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="results.json and/or benchmark JSONL files")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--device", help="device name (default: from the inputs)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    calls = load(a.inputs)
    device = a.device or next((c["device"] for c in calls if c.get("device")), None)
    for c in calls:
        c["device"] = c.get("device") or device
        c.pop("exact_raw", None)  # per-token logprobs of both servers: summarised in "exactness"
    slug = device_slug(device)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(calls)
    doc = {"device": device, "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "sources": a.inputs, "calls": calls,
           "table": [{"model": k[0], "workload": k[1], "rate": k[2],
                      **{s: r["result"] for s, r in v.items()}} for k, v in sorted(
                          index(calls).items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2] or 0))]}
    (out_dir / f"serving-{slug}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out_dir / f"serving-{slug}.md").write_text(md)
    pngs = [] if a.no_plots else plot(calls, out_dir, slug)
    print(md)
    print("wrote", ", ".join(str(p) for p in [out_dir / f"serving-{slug}.json", out_dir / f"serving-{slug}.md", *pngs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
