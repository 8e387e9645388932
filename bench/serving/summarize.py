"""Summarize serving benchmarks: relay vs vanilla side by side.

    python bench/serving/summarize.py RESULTS.json [more.json ...] [raw.jsonl ...] --out-dir bench/results

Inputs are ``results.json`` files written by ``run_serving.py`` (one per device call) and/or
raw ``--output-file`` JSONL of ``sglang.benchmark.serving`` whose ``tag`` is
``<model>/<system>/<workload>[@rate]`` (as run_serving.py sets it). Writes
``serving-<device>.json`` (device, versions, dates, exact commands, every config and result),
``serving-<device>.md`` (tables) and ``serving-<device>-<model>-*.png`` (plots, if matplotlib
is installed). Later inputs override earlier ones for the same (model, system, workload, rate).
Calls made with other server settings (``run_serving.py --server-args``) go in their own
summary: ``--suffix dyntok`` writes ``serving-<device>-dyntok.*``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
from run_serving import SYSTEMS as ALL_SYSTEMS  # noqa: E402  (stdlib-only module)
from run_serving import WORKLOADS, check_input_tokens, exactness_key_parts  # noqa: E402

SYSTEMS = ("relay", "vanilla")  # the twins of the main table
REFERENCES = tuple(s for s in ALL_SYSTEMS if s not in SYSTEMS)


def device_slug(device: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    s = (device or "unknown").lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def parse_tag(tag: str | None) -> tuple[str, str, str, float | None] | None:
    """``llama2-7b-mha/relay/rate8k@16`` -> (model, system, workload, 16.0); None if not ours."""
    parts = (tag or "").split("/")
    if len(parts) != 3 or parts[1] not in ALL_SYSTEMS:
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
    """{(model, workload, rate): {system: run}}, with relay and vanilla always from one call.

    Calls are taken in order. A call that ran both twins of a workload replaces the twins
    shown; a call with only one of them replaces nothing already paired (its lone run is shown
    only where no pair exists), so a ratio is never taken across calls. A reference system's run
    carries its own call's vanilla and relay (``twin_vanilla``, ``twin_relay``) for its ratios."""
    table: dict = {}
    for call in calls:
        each: dict = {}
        for run in call.get("runs", []):
            if "result" not in run:
                continue
            model = run.get("model") or call.get("model")
            key = (model, run["workload"], run.get("rate"))
            each.setdefault(key, {}).setdefault(run["system"], []).append(dict(run, record=record_name(call.get("source"))))
        this = {key: pick_repeats(by_system) for key, by_system in each.items()}
        for key, runs in this.items():
            shown = table.setdefault(key, {})
            twins = {x: runs[x] for x in SYSTEMS if x in runs}
            if len(twins) == len(SYSTEMS) or not any(x in shown for x in SYSTEMS):
                for x in SYSTEMS:
                    shown.pop(x, None)
                shown.update(twins)
            for system, run in runs.items():
                if system not in SYSTEMS:
                    shown[system] = dict(run, twin_vanilla=runs.get("vanilla"), twin_relay=runs.get("relay"))
    return table


def median_run(runs: list[dict]) -> dict:
    """The run of median output throughput among one call's repeats of a workload on one system
    (``run_serving.py --repeat``; the lower median for an even count)."""
    tok_s = [r["result"].get("output_throughput") or 0.0 for r in runs]
    return runs[sorted(range(len(runs)), key=lambda i: tok_s[i])[(len(runs) - 1) // 2]]


def pick_repeats(by_system: dict[str, list[dict]]) -> dict[str, dict]:
    """One run per system from one call's runs of one workload (several with ``--repeat``).

    Twins are paired by repeat index, i.e. by seed, so both ran the same prompts: the row is the
    same-seed pair whose relay / vanilla throughput ratio is the median of the pairs' (the lower
    median for an even count; repeats only one twin ran are left out). A system without its twin
    shows its median run. Each picked run keeps its own numbers (TTFT, TPOT, step: never a mix of
    runs) and, when there were repeats, ``repeats_tok_s`` (every run, in repeat order) and
    ``pair_ratios`` (relay / vanilla per common seed)."""
    picked = {}
    for system, runs in by_system.items():
        runs = sorted(runs, key=lambda r: r.get("repeat") or 0)
        picked[system] = dict(median_run(runs), repeats_tok_s=[r["result"].get("output_throughput") for r in runs]) \
            if len(runs) > 1 else runs[0]
    r_runs, v_runs = by_system.get("relay", []), by_system.get("vanilla", [])
    if len(r_runs) > 1 or len(v_runs) > 1:
        r_by = {r.get("repeat") or 0: r for r in r_runs}
        v_by = {r.get("repeat") or 0: r for r in v_runs}
        common = sorted(set(r_by) & set(v_by))
        tput = lambda run: run["result"].get("output_throughput") or 0.0  # noqa: E731
        ratios = {i: tput(r_by[i]) / tput(v_by[i]) for i in common if tput(v_by[i])}
        if ratios:
            rep = sorted(ratios, key=ratios.get)[(len(ratios) - 1) // 2]
            pair_ratios = [ratios[i] for i in sorted(ratios)]
            picked["relay"] = dict(r_by[rep], repeats_tok_s=picked["relay"].get("repeats_tok_s"), pair_ratios=pair_ratios)
            picked["vanilla"] = dict(v_by[rep], repeats_tok_s=picked["vanilla"].get("repeats_tok_s"),
                                     pair_ratios=pair_ratios)
    return picked


def record_name(source: str | None) -> str:
    """``bench/results/raw/serving-h100-s4-call3.json`` -> ``h100-s4-call3`` (the device call a row comes from)."""
    stem = Path(source or "?").stem
    return stem[len("serving-"):] if stem.startswith("serving-") else stem


def _records(*runs) -> str:
    """Where a table row's runs come from: one name for twins of one call, else each name."""
    names = list(dict.fromkeys(r["record"] for r in runs if r is not None and r.get("record")))
    return " / ".join(names) or "–"


def _f(x, fmt="{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ratio(a, b, fmt="{:.2f}x") -> str:
    return "–" if a is None or not b else fmt.format(a / b)


def _get(run: dict | None, key: str):
    return None if run is None else run["result"].get(key)


def _pair(a, b, fmt="{:.0f}") -> str:
    """``relay / vanilla`` in one cell."""
    return f"{_f(a, fmt)} / {_f(b, fmt)}"


def _step(run: dict | None):
    """Decode step at full batch from the server's log (``server_log.profile_window``): the
    per-step cost without the prefills that median TPOT mixes in while requests still arrive."""
    return None if run is None else (run.get("server_profile") or {}).get("full_batch_step_ms")


def _input_note(runs: dict) -> str:
    notes = []
    for system, run in sorted(runs.items()):
        if run.get("input_tokens_ok") is False:
            err = run.get("input_tokens_rel_err")
            notes.append(f"{system} MISMATCH {_f(err, '{:+.1%}') if err is not None else '(missing)'}")
    return "; ".join(notes) or "exact"


def merge_rate_searches(searches: list[dict]) -> dict:
    """One search per system from several calls' points (passing is monotone in the rate):
    sustainable = the highest passing rate below every failing one."""
    merged: dict = {}
    for search in searches:
        for system, s in search.items():
            m = merged.setdefault(system, {"slo_p99_tpot_ms": s.get("slo_p99_tpot_ms"), "tried": []})
            if m["slo_p99_tpot_ms"] != s.get("slo_p99_tpot_ms"):
                raise ValueError(f"{system}: rate searches with different SLOs cannot be merged")
            m["tried"] += s.get("tried", [])
    for m in merged.values():
        fails = [t["rate"] for t in m["tried"] if not t["pass"]]
        lowest_fail = min(fails, default=float("inf"))
        good = [t["rate"] for t in m["tried"] if t["pass"] and t["rate"] < lowest_fail]
        m["sustainable_rate"] = max(good, default=None)
        m["bounded_above"] = bool(fails)
    return merged


def rate_ratio_bound(search: dict) -> str | None:
    """relay / vanilla sustainable rate from one call's search, as the grid allows: passing is
    monotone in the rate, so the true ratio is at least relay's highest pass over vanilla's
    lowest failure (and at most the reverse bracket when both are bounded)."""
    r, v = search.get("relay"), search.get("vanilla")
    if not r or not v or not r.get("sustainable_rate"):
        return None
    r_pass = r["sustainable_rate"]
    v_fail = min((t["rate"] for t in v.get("tried", []) if not t["pass"]), default=None)
    v_pass = v.get("sustainable_rate")
    parts = []
    if v_pass:
        parts.append(f"{r_pass / v_pass:.1f}x at the grid's points ({r_pass:g} vs {v_pass:g} req/s)")
    if v_fail:
        parts.append(f"at least {r_pass / v_fail:.1f}x (relay passes {r_pass:g}, vanilla fails {v_fail:g})")
    r_fail = min((t["rate"] for t in r.get("tried", []) if not t["pass"]), default=None)
    if r_fail and v_pass:
        parts.append(f"at most {r_fail / v_pass:.1f}x (relay fails {r_fail:g}, vanilla passes {v_pass:g})")
    if not r.get("bounded_above"):
        parts.append("relay passed the highest rate tried")
    return "; ".join(parts) or None


def server_args_extra(call: dict) -> str:
    """The ``--server-args`` both servers of a call ran with ('' for the plain setup)."""
    if "server_args_extra" in call:
        return call["server_args_extra"]
    argv = call.get("driver_argv") or []  # records written before the field existed
    for i, arg in enumerate(argv):
        if arg.startswith("--server-args="):
            return arg.split("=", 1)[1]
        if arg == "--server-args" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def probe_rows(calls: list[dict], model: str) -> list[str]:
    """TTFT probe runs (``ttft_probe.py``): where a burst's time to first token goes."""
    rows = []
    for c in calls:
        for r in c.get("runs", []):
            p = r.get("probe")
            if not p or (r.get("model") or c.get("model")) != model:
                continue
            st, pt = p["stages"], p["points"]

            def stage(k):
                return f"{st[k]['median_ms']:.0f} / {st[k]['p99_ms']:.0f}" if k in st else "–"

            def last(k):
                return f"{pt[k]['last_s']:.2f}" if k in pt else "–"

            rows.append("| " + " | ".join([
                r["workload"], r["system"], server_args_extra(c) or "(none)", stage("ttft"), stage("receive"),
                stage("tokenize_dispatch"), last("request_received_ts"), last("api_server_dispatch_finish_ts"),
                last("response_sent_to_client_ts"), last("done"), record_name(c.get("source"))]) + " |")
    if not rows:
        return []
    return ["TTFT probe (`ttft_probe.py`: 128 text prompts sent at once, server stage timestamps from "
            "`meta_info` with `--enable-metrics`). Stages: median / p99 ms; then when the last request "
            "reached each point, in s after the burst was sent:", "",
            "| workload | system | extra server args | TTFT | sent -> received by the tokenizer manager | "
            "received -> tokenized and sent to the scheduler | last received | last sent to scheduler | "
            "last first token out | last done | record |",
            "|---|---|---|---|---|---|---|---|---|---|---|"] + rows + [""]


def repeat_rows(table: dict, model: str) -> list[str]:
    """Workloads run several times per server (``--repeat``): every run's output tok/s, the
    relay / vanilla ratio of each same-seed pair, and the row's (the median pair's)."""
    rows = []
    for name in WORKLOADS:
        runs = table.get((model, name, None), {})
        r, v = runs.get("relay"), runs.get("vanilla")
        if not any(x and x.get("repeats_tok_s") for x in (r, v)):
            continue
        rs = (r or {}).get("repeats_tok_s") or [_get(r, "output_throughput")]
        vs = (v or {}).get("repeats_tok_s") or [_get(v, "output_throughput")]
        pairs = (r or v).get("pair_ratios") or []
        rows.append("| " + " | ".join([
            name, ", ".join(_f(x) for x in rs), ", ".join(_f(x) for x in vs),
            ", ".join(f"{x:.2f}x" for x in pairs) or "–",
            _ratio(_get(r, "output_throughput"), _get(v, "output_throughput")), _records(r, v)]) + " |")
    if not rows:
        return []
    return ["Repeated runs (`run_serving.py --repeat N`: each server runs the workload N times with seeds 42, "
            "43, ...; the i-th runs of relay and vanilla served the same prompts. The main table's row is the "
            "same-seed pair with the median ratio):", "",
            "| workload | relay tok/s, each run | vanilla tok/s, each run | relay / vanilla, same seed | "
            "row's ratio | record |",
            "|---|---|---|---|---|---|"] + rows + [""]


def timeline_rows(calls: list[dict], model: str) -> list[str]:
    """Runs with a ``timeline`` (``decode_timeline.py``): a burst's median TPOT next to the decode
    step at full batch; the difference is what the burst's prefill ramp (and the ramp's smaller
    batches) adds per token."""
    rows = []
    for c in calls:
        if c.get("model") != model:
            continue
        for r in c.get("runs", []):
            t = r.get("timeline")
            if not t:
                continue
            step = _step(r)
            tpot = t.get("median_tpot_ms")
            rows.append("| " + " | ".join([
                r["workload"], r["system"], _f(tpot, "{:.2f}"), _f(t.get("steady_step_ms"), "{:.2f}"),
                _f(step, "{:.2f}"),
                _f(tpot - step if tpot and step else None, "{:.2f}"),
                f"{t['ramp_ms'][0]:.0f}-{t['ramp_ms'][1]:.0f}", record_name(c.get("source"))]) + " |")
    if not rows:
        return []
    return ["Median TPOT against the decode step (`decode_timeline.py`, from the client's per-token "
            "latencies): the client's median gap between tokens after the last request's first token, "
            "and the server's full-batch step. TPOT - step is what the burst's prefill ramp adds per "
            "token: prefill batches of later arrivals stall the requests already decoding.", "",
            "| workload | system | median TPOT ms | median token gap ms | full-batch step ms | "
            "TPOT - step ms | first tokens (ms after the burst) | record |",
            "|---|---|---|---|---|---|---|---|"] + rows + [""]


def markdown(calls: list[dict]) -> str:
    table = index(calls)
    own_calls = {(record_name(c.get("source")), k[0], k[1]): runs for c in calls
                 for k, runs in index([c]).items() if k[2] is None}  # each call's own rows
    probed = {r.get("model") or c.get("model") for c in calls for r in c.get("runs", []) if r.get("probe")}
    models = sorted(({k[0] for k in table} | probed) - {None})
    devices = sorted({c.get("device") for c in calls if c.get("device")}) or ["unknown device"]
    out = [f"# Serving benchmark: relay vs vanilla SGLang ({', '.join(devices)})", ""]
    for call in calls:
        v = call.get("versions") or {}
        extra = server_args_extra(call)
        out.append(f"- {call.get('model')} {call.get('date', '')} {call.get('gpu', '')}: "
                   + ", ".join(f"{k} {x}" for k, x in v.items() if x) + f" ({call.get('source', '')})"
                   + (f"; both servers with `{extra}`" if extra else ""))
        for msg in call.get("errors", []):
            out.append(f"  - ERROR: {msg}")
        for msg in call.get("skipped", []):
            out.append(f"  - skipped: {msg}")
        for key in sorted(k for k in call if k.startswith("exactness")):
            ex = call[key]
            if not ex:
                continue
            workload, system = exactness_key_parts(key)
            what = f"{system} vs vanilla" + ("" if workload == "exact" else f", {workload}")
            out.append(f"  - exactness ({what}, greedy, same prompts): {ex['identical_greedy']}/"
                           f"{ex['requests']} identical outputs, max |logprob diff| chosen "
                           f"{ex['max_abs_logprob_diff_chosen']:.3g}, top-k {ex['max_abs_logprob_diff_topk']:.3g}")
    out.append("")
    for model in models:
        out += [f"## {model}", "",
                "Control TPOT: median TPOT of the same-shape workload with nothing shared (vanilla's run; "
                "relay's if vanilla has none). 1.00 = the shared prompt costs nothing per decode step. "
                "Full-batch step: the decode step at >= 90% of the peak batch, from the server log "
                "(`server_log.py`); median TPOT also counts the prefill steps of requests that arrive "
                "while others decode.", "",
                "| workload | what | relay tok/s | vanilla tok/s | tok/s ratio | req/s relay / vanilla | "
                "relay med TTFT ms | vanilla med TTFT ms | p99 TTFT ms relay / vanilla | relay med TPOT ms | vanilla med TPOT ms | TPOT speedup | "
                "relay p99 TPOT ms | vanilla p99 TPOT ms | relay TPOT / control | vanilla TPOT / control | "
                "full-batch step ms relay / vanilla | relay step / control step | input tokens | record |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, w in WORKLOADS.items():
            runs = table.get((model, name, None))
            if not runs:
                continue
            r, v = runs.get("relay"), runs.get("vanilla")
            # The control of the same call when it ran one (c64 controls vary between calls), else the shown one.
            ctrl = own_calls.get(((r or v or {}).get("record"), model, w.control)) or table.get((model, w.control, None), {}) \
                if w.control else {}
            ctrl_tpot = _get(ctrl.get("vanilla"), "median_tpot_ms") or _get(ctrl.get("relay"), "median_tpot_ms")
            ctrl_step = _step(ctrl.get("vanilla")) or _step(ctrl.get("relay"))
            out.append("| " + " | ".join([
                name, w.desc,
                _f(_get(r, "output_throughput")), _f(_get(v, "output_throughput")),
                _ratio(_get(r, "output_throughput"), _get(v, "output_throughput")),
                _pair(_get(r, "request_throughput"), _get(v, "request_throughput"), "{:.2f}"),
                _f(_get(r, "median_ttft_ms")), _f(_get(v, "median_ttft_ms")),
                _pair(_get(r, "p99_ttft_ms"), _get(v, "p99_ttft_ms")),
                _f(_get(r, "median_tpot_ms"), "{:.1f}"), _f(_get(v, "median_tpot_ms"), "{:.1f}"),
                _ratio(_get(v, "median_tpot_ms"), _get(r, "median_tpot_ms")),
                _f(_get(r, "p99_tpot_ms"), "{:.1f}"), _f(_get(v, "p99_tpot_ms"), "{:.1f}"),
                _ratio(_get(r, "median_tpot_ms"), ctrl_tpot, "{:.2f}"),
                _ratio(_get(v, "median_tpot_ms"), ctrl_tpot, "{:.2f}"),
                _pair(_step(r), _step(v), "{:.1f}"),
                _ratio(_step(r), ctrl_step, "{:.2f}"),
                _input_note(runs),
                _records(r, v),
            ]) + " |")
        out.append("")
        out += repeat_rows(table, model)
        refs = [(name, system, runs[system], runs[system].get("twin_vanilla"), runs[system].get("twin_relay"))
                for name in WORKLOADS for system in REFERENCES
                if (runs := table.get((model, name, None), {})) and system in runs and "result" in runs[system]]
        if refs:
            out += ["Reference systems, against the vanilla (and relay) runs of their own call:", "",
                    "| workload | system | tok/s | med TTFT ms | med TPOT ms | vanilla (FlashInfer) tok/s | "
                    "vanilla med TPOT ms | vanilla / system tok/s | relay / system tok/s |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for name, system, x, v, r in refs:
                out.append("| " + " | ".join([
                    name, ALL_SYSTEMS[system], _f(_get(x, "output_throughput")), _f(_get(x, "median_ttft_ms")),
                    _f(_get(x, "median_tpot_ms"), "{:.1f}"), _f(_get(v, "output_throughput")),
                    _f(_get(v, "median_tpot_ms"), "{:.1f}"),
                    _ratio(_get(v, "output_throughput"), _get(x, "output_throughput")),
                    _ratio(_get(r, "output_throughput"), _get(x, "output_throughput")),
                ]) + " |")
            out.append("")
        out += probe_rows(calls, model)
        searches = [(c.get("rate_search") or {}, c) for c in calls if c.get("model") == model]
        if any(s for s, _ in searches):
            out += ["Request-rate search on `rate8k` (8K shared prompt, Poisson arrivals, ~8 s of arrivals per rate):", "",
                    "| call | system | SLO p99 TPOT ms | tried: rate req/s -> p99 TPOT ms | sustainable rate req/s |",
                    "|---|---|---|---|---|"]
            for search, call in searches:
                for system in SYSTEMS:
                    s = search.get(system)
                    if not s:
                        continue
                    tried = ", ".join(f"{t['rate']:g} -> {_f(t['p99_tpot_ms'], '{:.1f}')}{'' if t['pass'] else ' (fail)'}"
                                      for t in sorted(s.get("tried", []), key=lambda t: t["rate"]))
                    rate = s.get("sustainable_rate")
                    top = "" if rate is None or s.get("bounded_above") else " (highest tried)"
                    out.append(f"| {call.get('date', '')} | {system} | {s.get('slo_p99_tpot_ms')} | {tried} | "
                               f"{_f(rate, '{:g}')}{top} |")
            merged = merge_rate_searches([s for s, _ in searches])
            out += ["", f"All points of these calls together (same SLO): {rate_ratio_bound(merged) or 'no ratio'}"]
            out.append("")
        out += timeline_rows(calls, model)
        util = [(c, r) for c in calls if c.get("model") == model for r in c.get("runs", []) if r.get("gpu_util")]
        if util:
            out += ["GPU kernel-busy share (`--gpu-util`: nvidia-smi every 100 ms over the run's window; busy = "
                    "samples above 0%, so the client's start and idle tail are left out):", "",
                    "| call | system | workload | samples | mean % | mean of busy samples % | busy samples below 90% |",
                    "|---|---|---|---|---|---|---|"]
            for c, r in util:
                u = r["gpu_util"]
                label = r["workload"] + (f"@{r['rate']:g}" if r.get("rate") else "")
                out.append(f"| {c.get('date', '')} | {r['system']} | {label} | {u['samples']} | {_f(u['mean'], '{:.1f}')} | "
                           f"{_f(u['mean_busy'], '{:.1f}')} | {_f(u['share_below_90'], '{:.0%}')} |")
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
    ap.add_argument("--suffix", default="", help="output name suffix for calls with other server settings")
    a = ap.parse_args(argv)
    calls = load(a.inputs)
    device = a.device or next((c["device"] for c in calls if c.get("device")), None)
    for c in calls:
        c["device"] = c.get("device") or device
        c.pop("exact_raw", None)  # per-token logprobs of both servers: summarised in "exactness"
    slug = device_slug(device) + (f"-{a.suffix}" if a.suffix else "")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(calls)
    doc = {"device": device, "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           # Each call's settings, versions and outcome; its runs are in "table" and, whole, in its source file.
           "sources": a.inputs, "calls": [{k: v for k, v in c.items() if k not in ("runs", "server_info")} for c in calls],
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
