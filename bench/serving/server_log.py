"""Where a serving run's time goes, from the SGLang server's own log lines.

Median TPOT over a 128-request burst mixes two things: the cost of a decode step once the
batch is full, and the steps stretched by prefill batches of requests still arriving (SGLang
interleaves them). The server log separates them:

  ``Prefill batch, #new-seq: N, ... #queue-req: Q``  -> when requests reached the scheduler
  ``Decode batch, #running-req: R, ... gen throughput (token/s): G[, relay: ...]``
                                                     -> one line per 40 decode steps (default
                                                        interval): a step costs R / G seconds

Per burst (log lines separated by a quiet gap) this reports: requests admitted and the span
over which they reached the scheduler (the floor under time to first token: the scheduler
never waits with a queue when ``#queue-req`` stays 0), the largest queue seen, and the decode
step at full batch (median over the intervals with ``#running-req >= full_frac * peak``, and the
best such interval: one with no prefill batch inside). Bursts: separated by >= 15 s of quiet
(the benchmark client's start-up between workloads; a slow decode interval logs every ~5 s).

    python bench/serving/server_log.py server-relay.log [server-vanilla.log ...]   # prints bursts
    python bench/serving/server_log.py logs.tar.gz                                  # every server-*.log in it

``run_serving.py`` calls :func:`profile_window` for each workload (the run's wall-clock window).
Stdlib only: runs anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import statistics
import sys
import tarfile

_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
_PREFILL = re.compile(r"Prefill batch.*?#new-seq: (\d+).*?#queue-req: (\d+)")
_DECODE = re.compile(r"Decode batch, #running-req: (\d+).*?gen throughput \(token/s\): ([\d.]+)")
_SHARED = re.compile(r"relay: groups (\d+), members (\d+), shared (\d+) tok")
_HOST = re.compile(r"host ([\d.]+) ms/step \(hook [\d.]+, metadata [\d.]+, plan reuse (\d+)%\)")


@dataclasses.dataclass
class Burst:
    start: float  # epoch seconds (log timestamps, 1 s resolution)
    end: float
    admitted: int = 0  # requests admitted by prefill batches
    first_prefill: float | None = None
    last_prefill: float | None = None
    max_queue: int = 0
    decode: list = dataclasses.field(default_factory=list)  # (running, gen tok/s, shared tokens or None)
    host: list = dataclasses.field(default_factory=list)  # (running, relay host ms/step, plan reuse %)

    def summary(self, full_frac: float = 0.9) -> dict:
        peak = max((r for r, _, _ in self.decode), default=0)
        full = [(r, g, s) for r, g, s in self.decode if peak and r >= full_frac * peak and g > 0]
        steps = [1e3 * r / g for r, g, _ in full]
        shared = sorted({s for _, _, s in full if s is not None})
        host = [(h, u) for r, h, u in self.host if peak and r >= full_frac * peak]
        return {
            "admitted": self.admitted,
            "arrival_span_s": (self.last_prefill - self.first_prefill) if self.first_prefill is not None else None,
            "max_queue": self.max_queue,
            "peak_running": peak,
            "full_batch_intervals": len(full),
            "full_batch_step_ms": round(statistics.median(steps), 2) if steps else None,
            "best_step_ms": round(min(steps), 2) if steps else None,  # an interval with no prefill in it
            "relay_shared_tokens": shared or None,
            # relay's own host time per decode step at full batch (median of the log intervals)
            "relay_host_ms": round(statistics.median(h for h, _ in host), 3) if host else None,
            "relay_plan_reuse_pct": round(statistics.median(u for _, u in host)) if host else None,
        }


def _epoch(ts: str) -> float:
    return _dt.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S").replace(tzinfo=_dt.timezone.utc).timestamp()


def parse(text: str, gap_s: float = 15.0) -> list[Burst]:
    """Bursts of prefill/decode activity separated by more than ``gap_s`` quiet seconds."""
    bursts: list[Burst] = []
    for line in text.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        p, d = _PREFILL.search(line), _DECODE.search(line)
        if not (p or d):
            continue
        t = _epoch(m.group(1))
        if not bursts or t - bursts[-1].end > gap_s:
            bursts.append(Burst(start=t, end=t))
        b = bursts[-1]
        b.end = t
        if p:
            b.admitted += int(p.group(1))
            b.max_queue = max(b.max_queue, int(p.group(2)))
            b.first_prefill = t if b.first_prefill is None else b.first_prefill
            b.last_prefill = t
        else:
            s = _SHARED.search(line)
            b.decode.append((int(d.group(1)), float(d.group(2)), int(s.group(3)) if s else None))
            h = _HOST.search(line)
            if h:
                b.host.append((int(d.group(1)), float(h.group(1)), int(h.group(2))))
    return bursts


def profile_window(log_text: str, t_start: float, t_end: float) -> dict | None:
    """Summary of the activity logged between two epoch times (one workload's run), or None.
    Log timestamps are whole seconds in UTC (the GPU machine's clock)."""
    lines = [ln for ln in log_text.splitlines()
             if (m := _TS.match(ln)) and t_start - 1 <= _epoch(m.group(1)) <= t_end + 1]
    bursts = parse("\n".join(lines), gap_s=1e9)  # one window = one burst
    return bursts[0].summary() if bursts else None


def _texts(paths: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        if p.endswith((".tar.gz", ".tgz")):
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    if re.search(r"server-.*\.log$", m.name):
                        out.append((f"{p}:{m.name}", tar.extractfile(m).read().decode(errors="replace")))
        else:
            with open(p, errors="replace") as f:
                out.append((p, f.read()))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    report = {}
    for name, text in _texts(argv):
        rows = [b.summary() | {"start_utc": _dt.datetime.fromtimestamp(b.start, _dt.timezone.utc).strftime("%H:%M:%S"),
                               "dur_s": b.end - b.start} for b in parse(text)]
        report[name] = rows
        print(f"== {name}")
        print("| start (UTC) | s | admitted | arrival span s | max queue | peak running | full-batch step ms "
              "(median / best) | relay shared tok | relay host ms/step (plan reuse) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            host = f"{r['relay_host_ms']} ({r['relay_plan_reuse_pct']}%)" if r["relay_host_ms"] is not None else "-"
            print(f"| {r['start_utc']} | {r['dur_s']:.0f} | {r['admitted']} | {r['arrival_span_s']} | {r['max_queue']} | "
                  f"{r['peak_running']} | {r['full_batch_step_ms']} / {r['best_step_ms']} | {r['relay_shared_tokens']} "
                  f"| {host} |")
    print(json.dumps(report) if "--json" in sys.argv else "", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if a != "--json"]))
