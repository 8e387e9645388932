"""Serving benchmark on the GPU machine: relay vs vanilla SGLang on the same workloads, one call.

    bash bench/serving/run_serving.sh --model llama2-7b-mha --workloads core [--dry-run]

Steps: unpack the offline site (``.device/site312.tar.xz`` -> /tmp/site) and install this
project into it (so the ``sglang.srt.plugins`` entry point exists); materialize the built-in
model; then for each system (relay first, then vanilla): start the server, wait for
``/health`` (deadline, death detected), warm it with a few requests (FlashInfer JIT, relay
groups), run ``python -m sglang.benchmark.serving`` (or the frontend program) for each
workload under ``timeout``, stop the server. The second of relay/vanilla runs only the
workloads that the first one ran, so every number has its twin. Reference systems
(``REFERENCE_ONLY``: SGLang's Triton backend, relay with eager decode) run after them, only
their own workloads, and only where vanilla has the twin. Everything lands in ``$OUT``
(default ./out): ``results.json`` (all configs, commands, parsed results), ``summary.md``,
``logs.tar.gz`` and, with ``--save-jit-cache``, ``jit-cache.tar.xz``.

JIT cache: a fresh machine spends ~200 s compiling FlashInfer's kernels with nvcc before the
first server is healthy. ``--save-jit-cache`` packs the compiled FlashInfer modules (``.so``
only) and Triton's cache into ``$OUT/jit-cache.tar.xz``; put that file at
``.device/jit-cache.tar.xz`` and later calls install the modules as FlashInfer AOT modules
(``flashinfer/data/aot/<name>/<name>.so``, loaded without a build) and seed Triton's cache.

Time: the call must end inside the device's 10-minute limit, so the driver keeps a deadline
(``--budget-s`` from the wrapper's start) and skips a relay workload unless its vanilla twin
still fits after it; skipped workloads are recorded, never silently dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.append(str(HERE))  # summarize, nested_dataset
sys.path.append(str(REPO))  # relay_radix when not installed (CPU dry runs)

SITE = Path("/tmp/site")
WORK = Path("/tmp/relay_bench")  # cwd of every subprocess: keeps the repo root off sys.path
MODEL_CACHE = Path("/tmp/relay_models")
FLASHINFER_WS = Path("/tmp/fiws")

QUESTION_LEN = 128
OUTPUT_LEN = 256
COMMON_SERVER_ARGS = [
    "--sampling-backend", "pytorch", "--grammar-backend", "none",
    "--disable-piecewise-cuda-graph", "--mem-fraction-static", "0.85", "--log-level", "info",
]
# p99 TPOT SLO (ms) of the request-rate search, per model: about 3x the no-sharing TPOT at
# 128 requests (12.7 ms MHA, 9.3 ms GQA on H100) rounded, i.e. "interactive" decode speed.
DEFAULT_SLO_MS = {"llama2-7b-mha": 40.0, "llama3-8b-gqa": 25.0}
# The second server of a call starts with FlashInfer's JIT cache warm (~60 s measured, 163 s
# fresh); with its warm-up and the first server's stop, reserve this much for it.
SECOND_SERVER_EST_S = 110
TRITON_CACHE = Path("/tmp/triton-cache")
JIT_CACHE_TAR = REPO / ".device" / "jit-cache.tar.xz"
# A server that starts on a machine with no FlashInfer module compiled yet (no
# .device/jit-cache.tar.xz, nothing under FLASHINFER_WS) runs nvcc first: relay's first start on
# such a machine passed --server-timeout-s's 300 s (s14-call5: FlashInfer's JIT, Triton's
# compiles and two decode graphs per batch size), vanilla's took 139-163 s. That start may take
# this long instead (within the call's budget).
FRESH_JIT_START_S = 480


def start_limit_s(server_timeout_s: float, left_s: float, fresh_jit: bool) -> float:
    """Seconds to wait for a server's /health: ``--server-timeout-s``, raised to
    ``FRESH_JIT_START_S`` when FlashInfer has compiled nothing on this machine yet, and never past
    the call's budget (``left_s``) less 30 s for the stop."""
    want = max(server_timeout_s, FRESH_JIT_START_S) if fresh_jit else server_timeout_s
    return min(want, left_s - 30)


def flashinfer_modules_compiled() -> bool:
    """Whether FlashInfer has JIT modules on this machine (compiled here, or installed from
    ``.device/jit-cache.tar.xz`` as AOT modules of the site)."""
    return any(FLASHINFER_WS.glob(".cache/flashinfer/*/*/cached_ops/*/*.so")) or any(
        (SITE / "flashinfer" / "data" / "aot").glob("*/*.so"))

# The systems a call can start. relay and vanilla are twins: the second runs what the first
# ran. The others are references that run only the workloads named here, after the twins.
SYSTEMS = {
    "relay": "relay-radix: --attention-backend relay (Triton prefix + FlashInfer suffix), decode CUDA graphs",
    "vanilla": "SGLang as shipped: --attention-backend flashinfer, radix cache on",
    "triton": "SGLang as shipped with its Triton attention backend (reference row)",
    "relay-eager": "relay with --disable-cuda-graph: every decode step on the eager path",
    "relay-fi": "relay with --relay-kernel flashinfer: FlashInfer prefill over the groups + FlashInfer suffix decode",
    "relay-cap16": "relay with --relay-max-groups 16: more qualifying prefixes than groups (the cap keeps the 16 "
                   "saving the most reads)",
    "relay-1graph": "relay with --relay-plain-graphs 0: one decode graph per batch size, so steps with no group "
                    "replay the relay graph (empty prefix and merge launches)",
    # Run like relay (every workload asked), to isolate one feature's effect.
    "relay-nogate": "relay with --relay-gate 0: every qualifying group relayed, even where that is slower",
    "relay-noconsec": "relay with --relay-consecutive-alloc 0: long allocations take the lowest free slots",
    "relay-pool1": "relay with --relay-prefix-pool fa3 --relay-prefix-pool-min-rows 1: every group in one run of "
                   "slots on FlashInfer's FA3 over the pool, however small (exactness of that pass)",
    "relay-nopool": "relay with --relay-prefix-pool off: every group on the Triton prefix launch",
    "relay-noext": "relay with --relay-extend-pool off: prefill over cached prompts on SGLang's paged FA2 path",
}
REFERENCE_ONLY = {"triton": {"gsp8k_c128"}, "relay-eager": {"exact"},
                  "relay-fi": {"exact", "gsp8k_c128", "gsp16k_c128", "gsp2k_c64", "ctrl_c128", "nested_c128"},
                  "relay-cap16": {"gsp2k_32x4"}, "relay-1graph": {"nosh_c128", "ctrl_c128", "ctrl_c64"},
                  "relay-pool1": {"exact", "exact_groups"}}
# Systems launched through relay_radix.launch_server, with their own extra flags.
RELAY_SYSTEMS = {"relay": [], "relay-eager": ["--disable-cuda-graph"], "relay-fi": ["--relay-kernel", "flashinfer"],
                 "relay-cap16": ["--relay-max-groups", "16"], "relay-1graph": ["--relay-plain-graphs", "0"],
                 "relay-nogate": ["--relay-gate", "0"], "relay-noconsec": ["--relay-consecutive-alloc", "0"],
                 "relay-pool1": ["--relay-prefix-pool", "fa3", "--relay-prefix-pool-min-rows", "1"],
                 "relay-nopool": ["--relay-prefix-pool", "off"], "relay-noext": ["--relay-extend-pool", "off"]}
# Systems that are SGLang as shipped (plugins off), with their attention backend.
SGLANG_BACKEND = {"vanilla": "flashinfer", "triton": "triton"}
# Wall time of a run relative to vanilla's estimate (SGLang's Triton decode is 3-4x slower).
EST_FACTOR = {"triton": 3.5}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # gsp | rnd | nested | frontend | rate | exact | probe
    desc: str
    est_s: int  # wall time of one vanilla run on an H100 (MHA), client start included: the median of
    # the raw results' ``wall_s`` (sessions 5-17) + ~15%, so the budget skips a run rather than cut it
    sys_len: int = 0
    groups: int = 1
    per_group: int = 128
    conc: int | None = 128
    input_len: int = 0  # rnd only
    fewshot_len: int = 0  # nested only
    waves: str = ""  # exact only: wave sizes sent one after another (exactness.py --waves)
    control: str | None = None  # workload with the same shape and nothing shared

    @property
    def num_requests(self) -> int:
        return self.groups * self.per_group

    def expected_input_tokens(self) -> int:
        if self.kind == "rnd":
            return self.num_requests * self.input_len
        return self.num_requests * (self.sys_len + self.fewshot_len + QUESTION_LEN)


WORKLOADS = {w.name: w for w in [
    Workload("ctrl_c128", "gsp", "control: 0-token system prompt, 128 req, c128", 36, 0),
    Workload("gsp8k_c128", "gsp", "8K shared system prompt, 128 req, c128", 51, 8192, control="ctrl_c128"),
    Workload("gsp16k_c128", "gsp", "16K shared system prompt, 128 req, c128", 66, 16384, control="ctrl_c128"),
    Workload("ctrl_c64", "gsp", "control: 0-token system prompt, 128 req, c64", 36, 0, conc=64),
    Workload("gsp2k_c64", "gsp", "2K shared system prompt, 128 req, c64", 37, 2048, conc=64, control="ctrl_c64"),
    Workload("gsp8k_4x32", "gsp", "4 different 8K system prompts x 32 req, c128", 41, 8192, groups=4,
             per_group=32, control="ctrl_c128"),
    Workload("gsp2k_32x4", "gsp", "32 different 2K system prompts x 4 req, c128 (32 groups at once)", 43, 2048,
             groups=32, per_group=4, control="ctrl_c128"),
    Workload("nested_c128", "nested", "4K global prompt + 4 groups x (2K few-shot + 32 req), c128", 45,
             4096, groups=4, per_group=32, fewshot_len=2048, control="ctrl_c128"),
    # Too little sharing for relay to pay (relay_radix.gate): relay must decode plainly, at vanilla's speed.
    Workload("ctrl_c8", "gsp", "control: 0-token system prompt, 32 req, c8", 32, 0, per_group=32, conc=8),
    Workload("gsp1k_c8", "gsp", "1K shared system prompt, 32 req, c8 (the gate keeps relay off)", 33, 1024,
             per_group=32, conc=8, control="ctrl_c8"),
    Workload("nosh_c128", "rnd", "no sharing: random ids, 256 in / 256 out, 128 req, c128", 37,
             input_len=256),
    Workload("frontend8k", "frontend", "SGLang frontend program: 8K sgl.system + 128 questions (run_batch, 128 threads)",
             40, 8192),
    # exact kinds: ``groups`` few-shot blocks (nested groups under the prompt) x ``per_group`` requests.
    Workload("exact", "exact", "exactness: 64 concurrent greedy requests, 4K prompt + 2 few-shot blocks, "
             "32 tokens with top-5 logprobs", 25, 4096, fewshot_len=512, groups=2, per_group=32, conc=64),
    Workload("exact_groups", "exact", "exactness, many nested groups: 64 concurrent greedy requests, 1K prompt "
             "+ 16 few-shot blocks of 1K (17 groups), 32 tokens with top-5 logprobs", 25, 1024, fewshot_len=1024,
             groups=16, per_group=4, conc=64),
    Workload("exact_prefill", "exact", "exactness of prefill over a cached prompt: 64 greedy requests, 8K prompt, "
             "sent in waves of 1, 31 and 32 (the last wave's prefill batches take relay's extend pool pass), "
             "32 tokens with top-5 logprobs", 30, 8192, groups=1, per_group=64, conc=64, waves="1,31,32"),
    Workload("probe8k", "probe", "TTFT probe: 8K shared prompt, 128 req at once, per-stage timestamps "
             "(needs --server-args --enable-metrics)", 40, 8192),
    Workload("probe16k", "probe", "TTFT probe: 16K shared prompt, 128 req at once, per-stage timestamps "
             "(needs --server-args --enable-metrics)", 59, 16384),
    Workload("rate8k", "rate", "8K shared prompt, Poisson arrivals: highest rate with p99 TPOT <= SLO", 140, 8192,
             conc=None, control="ctrl_c128"),
]}
# Each preset fits one device call (~9 min) with both systems on a fresh machine (~4 min of it
# is fixed: site, two server starts, FlashInfer JIT). Most important first: a workload that no
# longer fits is skipped (and recorded), so the tail of a list is what a slow call loses.
PRESETS = {
    "core": ["exact", "gsp8k_c128", "gsp16k_c128", "ctrl_c128"],
    "more": ["gsp2k_c64", "ctrl_c64", "gsp8k_4x32", "nested_c128"],
    "gate": ["gsp1k_c8", "ctrl_c8"],
    "extra": ["frontend8k", "nosh_c128"],
    "rate": ["rate8k"],
    "groups": ["gsp2k_32x4", "ctrl_c128"],
    "exact_groups": ["exact_groups"],
}
PRESETS["all"] = [n for p in ("core", "more", "extra", "rate") for n in PRESETS[p]]
DEFAULT_RATES = (4.0, 8.0, 16.0, 32.0, 64.0)


def exactness_key(workload: str, system: str) -> str:
    """Result key of one exactness comparison against vanilla: ``exactness`` for relay on the
    ``exact`` workload (the key older result files use), else ``exactness_<system>`` and/or
    ``@<workload>`` suffixes (``exactness@exact_groups``, ``exactness_relay-fi``)."""
    return ("exactness" + ("" if system == "relay" else f"_{system}")
            + ("" if workload == "exact" else f"@{workload}"))


def exactness_key_parts(key: str) -> tuple[str, str]:
    """``(workload, system)`` of a key :func:`exactness_key` made (files of every session)."""
    head, _, workload = key.partition("@")
    _, _, system = head.partition("_")
    return workload or "exact", system or "relay"


def select_workloads(spec: str) -> list[Workload]:
    """``core,nested_c128`` -> workloads (presets expanded, order kept, duplicates dropped)."""
    names: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        for name in PRESETS.get(part, [part]):
            if name not in WORKLOADS:
                raise SystemExit(f"unknown workload {name!r}; presets: {', '.join(PRESETS)}; "
                                 f"workloads: {', '.join(WORKLOADS)}")
            if name not in names:
                names.append(name)
    return [WORKLOADS[n] for n in names]


# Workloads whose runs are repeated by ``--repeat`` (the others run once: a repeat of a fixed
# prompt set would find it in the radix cache).
REPEATABLE_KINDS = ("gsp", "rnd")  # their prompts come from the seed; nested / frontend prompts do not


def repeat_order(todo: list[Workload], repeats: int) -> list[tuple[int, Workload]]:
    """``(repeat, workload)`` in run order: every workload once, then the repeatable ones again,
    round by round, so drift over a server's life spreads over all workloads and the budget cuts
    repeats before any first run."""
    order = [(0, w) for w in todo]
    for rep in range(1, max(1, repeats)):
        order += [(rep, w) for w in todo if w.kind in REPEATABLE_KINDS]
    return order


def rate_num_requests(rate: float) -> int:
    """Requests of one rate point: ~8 s of arrivals, longer than a request's life at the SLO
    (256 tokens x 20-40 ms), so the running batch reaches its steady size."""
    return int(min(512, max(32, round(rate * 8))))


def next_rate(rates: list[float], results: dict[float, bool]) -> float | None:
    """Next rate to try when searching the highest passing rate (pass is monotone in rate).

    Start in the middle; go up while passing, down while failing; None when decided.
    """
    rates = sorted(rates)
    if not results:
        return rates[len(rates) // 2]
    passed = [r for r in rates if results.get(r) is True]
    failed = [r for r in rates if results.get(r) is False]
    lo = max(passed) if passed else None
    hi = min(failed) if failed else None
    candidates = [r for r in rates if r not in results and (lo is None or r > lo) and (hi is None or r < hi)]
    if not candidates:
        return None
    return candidates[0] if lo is not None else candidates[-1]


def bench_cmd(w: Workload, *, port: int, model_dir: str, out_file: Path, tag: str,
              dataset_path: Path | None = None, rate: float | None = None, repeat: int = 0) -> list[str]:
    """The ``sglang.benchmark.serving`` (or frontend program) command of one run.

    ``repeat`` (``--repeat``): the i-th run of a workload on one server draws its prompts with seed
    42 + i, so a repeat does not find the previous run's questions in the radix cache."""
    if w.kind == "exact":
        cfg = Path(model_dir) / "config.json"  # absent only in --dry-run
        vocab = json.loads(cfg.read_text())["vocab_size"] if cfg.exists() else 32000
        return [sys.executable, str(HERE / "exactness.py"), "collect", "--port", str(port),
                "--n", str(w.num_requests), "--system-len", str(w.sys_len), "--fewshot-len", str(w.fewshot_len),
                "--question-len", "64", "--vocab", str(vocab), "--max-new", "32", "--blocks", str(w.groups),
                *(["--waves", w.waves] if w.waves else []), "--out", str(out_file)]
    if w.kind == "probe":
        return [sys.executable, str(HERE / "ttft_probe.py"), "--port", str(port), "--model-dir", model_dir,
                "--system-len", str(w.sys_len), "--question-len", str(QUESTION_LEN),
                "--output-len", str(OUTPUT_LEN), "--num-requests", str(w.num_requests),
                "--out", str(out_file), "--tag", tag]
    if w.kind == "frontend":
        return [sys.executable, str(HERE / "frontend_program.py"), "--port", str(port),
                "--system-len", str(w.sys_len), "--question-len", str(QUESTION_LEN),
                "--num-questions", str(w.num_requests), "--output-len", str(OUTPUT_LEN),
                "--threads", str(w.conc), "--output-file", str(out_file), "--tag", tag]
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--host", "127.0.0.1", "--port", str(port), "--tokenizer", model_dir,
           "--output-file", str(out_file), "--tag", tag, "--disable-tqdm", "--seed", str(42 + repeat),
           "--ready-check-timeout-sec", "30", "--output-details"]
    if w.kind in ("gsp", "rate"):
        per_group = rate_num_requests(rate) if w.kind == "rate" else w.per_group
        cmd += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(w.groups),
                "--gsp-prompts-per-group", str(per_group), "--gsp-system-prompt-len", str(w.sys_len),
                "--gsp-question-len", str(QUESTION_LEN), "--gsp-output-len", str(OUTPUT_LEN),
                "--gsp-range-ratio", "1.0", "--num-prompts", str(w.groups * per_group)]
    elif w.kind == "rnd":
        cmd += ["--dataset-name", "random-ids", "--random-input-len", str(w.input_len),
                "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio", "1.0",
                "--num-prompts", str(w.num_requests)]
    elif w.kind == "nested":
        cmd += ["--dataset-name", "custom", "--dataset-path", str(dataset_path),
                "--num-prompts", str(w.num_requests), "--sharegpt-output-len", str(OUTPUT_LEN)]
    else:
        raise ValueError(w.kind)
    if w.kind == "rate":
        cmd += ["--request-rate", str(rate)]
    elif w.conc:
        cmd += ["--max-concurrency", str(w.conc)]
    return cmd


def server_cmd(system: str, model: str, model_dir: str, port: int, relay_flags: list[str],
               extra: list[str]) -> list[str]:
    common = COMMON_SERVER_ARGS + ["--host", "127.0.0.1", "--port", str(port)] + extra
    if system in RELAY_SYSTEMS:  # through our launcher: resolves the model name, adds relay flags
        return [sys.executable, "-m", "relay_radix.launch_server", "--model-path",
                f"relay-radix/{model}", "--attention-backend", "relay",
                "--radix-cache-backend", "relay"] + relay_flags + RELAY_SYSTEMS[system] + common
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir,
            "--load-format", "dummy", "--attention-backend", SGLANG_BACKEND[system]] + common


def gpu_util_in_window(csv_path: Path, t0: float, t1: float) -> dict:
    """Mean GPU utilization (nvidia-smi ``timestamp, utilization.gpu`` lines, local time) over
    ``[t0, t1]`` (epoch seconds) and over its busy part (samples above 0%: the client's start
    and the drain's tail are idle for both systems alike)."""
    vals = []
    for line in csv_path.read_text(errors="replace").splitlines():
        stamp, _, util = line.partition(",")
        try:
            ts = _dt.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            u = float(util)
        except ValueError:
            continue
        if t0 <= ts <= t1:
            vals.append(u)
    busy = [v for v in vals if v > 0]
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else None  # noqa: E731
    return {"samples": len(vals), "mean": mean(vals), "mean_busy": mean(busy),
            "share_below_90": round(sum(v < 90 for v in busy) / len(busy), 3) if busy else None}


def check_input_tokens(expected: int, got: int | None) -> tuple[bool, float | None]:
    """(ok, relative error): more than 2% off means prompts are not the lengths asked for."""
    if not got or not expected:
        return False, None
    err = (got - expected) / expected
    return abs(err) <= 0.02, err


def _tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a run's log."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _slim(record: dict) -> dict:
    """A benchmark record's scalars, plus each request's time to first token (``ttfts_ms``, in
    request order, from ``--output-details``): the TTFT tail is read from it."""
    out = {k: v for k, v in record.items() if k != "server_info" and not isinstance(v, list)}
    if record.get("ttfts"):
        out["ttfts_ms"] = [round(t * 1e3, 1) for t in record["ttfts"]]
    return out


def _drop_bulky_details(path: Path, records: list[dict]) -> None:
    """Rewrite a benchmark JSONL (its parsed ``records``, changed in place) without the generated
    texts and per-token latencies that ``--output-details`` adds (hundreds of KB per run in the
    call's log archive)."""
    for rec in records:
        for key in ("generated_texts", "itls"):
            rec.pop(key, None)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


class Driver:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = a.t0 or time.time()
        self.deadline = self.t0 + a.budget_s
        self.out = Path(a.out)
        self.model = a.model
        self.workloads = select_workloads(a.workloads)
        # In the order given: vanilla first compiles FlashInfer's JIT kernels (decode and
        # prefill) for both servers of the call; relay first measures relay for sure.
        asked = list(dict.fromkeys(x for x in a.systems.split(",") if x))
        unknown = [x for x in asked if x not in SYSTEMS]
        if unknown:
            raise SystemExit(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
        self.systems = [x for x in asked if x not in REFERENCE_ONLY]  # the twins
        self.references = [x for x in asked if x in REFERENCE_ONLY]
        self.env = dict(os.environ)
        self.model_dir = str(MODEL_CACHE / self.model)
        self.server = None
        self.util_proc = None  # nvidia-smi sampler (--gpu-util)
        self.current = ""  # system whose server is (or was last) running
        self.results: dict = {
            "model": self.model, "workloads_requested": a.workloads,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "driver_argv": sys.argv, "server_args_extra": a.server_args, "budget_s": a.budget_s,
            "slo_p99_tpot_ms": a.slo_ms, "repeat": a.repeat, "rates": a.rates, "rates_for": a.rates_for, "question_len": QUESTION_LEN,
            "output_len": OUTPUT_LEN, "workloads": {w.name: dataclasses.asdict(w) for w in self.workloads},
            "server_cmds": {}, "server_env": {}, "server_start_s": {}, "warmup_s": {},
            "server_info": {}, "server_log_errors": {}, "runs": [], "rate_search": {},
            "systems": {x: SYSTEMS[x] for x in asked}, "skipped": [], "errors": [],
        }

    # ---------------------------------------------------------------- helpers
    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def sh(self, cmd: list[str], *, timeout: float, log: Path | None = None, check=True) -> int:
        self.log("$ " + shlex.join(cmd))
        if self.a.dry_run:
            return 0
        WORK.mkdir(parents=True, exist_ok=True)
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            rc = subprocess.run(cmd, cwd=WORK, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=max(1, timeout), start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            rc = 124  # subprocess.run has killed it
        finally:
            if log:
                out.close()
        if check and rc != 0:
            raise RuntimeError(f"command failed (rc={rc}): {shlex.join(cmd)}")
        return rc

    def save(self) -> None:
        """Write results.json and summary.md now (also after every run: a kill keeps them)."""
        if self.a.dry_run:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        try:
            import summarize

            (self.out / "summary.md").write_text(summarize.markdown([self.results]))
        except Exception as e:  # the summary must never cost the raw results
            self.log(f"summary failed: {e!r}")

    def pack_logs(self) -> None:
        if self.a.dry_run or not WORK.exists():
            return
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(WORK.glob("*")):
                if p.is_file() and p.suffix in (".log", ".jsonl", ".txt"):
                    tar.add(p, arcname=p.name)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        a = self.a
        self.env.update(PYTHONPATH=str(SITE), PYTHONUNBUFFERED="1", FLASHINFER_WORKSPACE_BASE=str(FLASHINFER_WS),
                        RELAY_RADIX_MODEL_CACHE=str(MODEL_CACHE), TRITON_CACHE_DIR=str(TRITON_CACHE),
                        PATH="/usr/local/cuda/bin:" + os.environ.get("PATH", ""))
        if not a.dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
            WORK.mkdir(parents=True, exist_ok=True)
            for p in WORK.glob("*"):
                if p.is_file():
                    p.unlink()
            # sglang.benchmark.serving caches generated-shared-prefix prompts under a key that
            # omits the tokenizer's vocabulary: drop prompts of another model from a warm machine.
            for p in (Path.home() / ".cache/sglang/benchmark").glob("gen_shared_prefix_*"):
                p.unlink()
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout
            except OSError:
                smi = ""
            self.results["gpu"] = smi.strip()
            self.results["device"] = smi.split(",")[0].strip() or "unknown"
        site_tar = REPO / ".device" / "site312.tar.xz"
        stamp = SITE / ".relay_site_stamp"
        want = f"{site_tar.stat().st_size}:{int(site_tar.stat().st_mtime)}" if site_tar.exists() else "?"
        if a.dry_run or not (stamp.exists() and stamp.read_text() == want):
            self.sh(["rm", "-rf", str(SITE)], timeout=60)
            self.sh(["mkdir", "-p", str(SITE)], timeout=10)
            self.sh(["tar", "-C", str(SITE), "-xJf", str(site_tar)], timeout=180)
            if not a.dry_run:
                stamp.write_text(want)
        self.sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                 "--no-build-isolation", "--upgrade", "--target", str(SITE), str(REPO)], timeout=180,
                log=WORK / "pip-install.log")
        if str(SITE) not in sys.path:
            sys.path.insert(0, str(SITE))
        if JIT_CACHE_TAR.exists():
            self.install_jit_cache()
        self.sh([sys.executable, "-c", "import sys; from relay_radix.models import materialize; "
                 f"print(materialize({self.model!r}, {str(MODEL_CACHE)!r}))"], timeout=120,
                log=WORK / "materialize.log")
        if not a.dry_run:
            probe = ("import json, importlib.metadata as m\nv = {}\n"
                     "for p in ('sglang', 'torch', 'flashinfer-python', 'triton', 'transformers', 'relay-radix'):\n"
                     "    try: v[p] = m.version(p)\n    except Exception: v[p] = None\nprint(json.dumps(v))")
            r = subprocess.run([sys.executable, "-c", probe], env=self.env, cwd=WORK, capture_output=True, text=True)
            self.results["versions"] = json.loads(r.stdout or "{}") | {"python": sys.version.split()[0]}
            from relay_radix.models import load_config

            self.results["model_config"] = load_config(self.model)
        if a.gpu_util and not a.dry_run:
            # Kernel-busy share of the GPU, sampled by the driver: a decode loop that waits on the
            # host (CPU-bound steps) shows as utilization below ~100% while requests decode.
            self.util_log = open(WORK / "gpu-util.csv", "w")
            self.util_proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=self.util_log, stderr=subprocess.DEVNULL, start_new_session=True)
        if any(w.kind == "nested" for w in self.workloads):
            w = WORKLOADS["nested_c128"]
            self.sh([sys.executable, str(HERE / "nested_dataset.py"), "--model", self.model,
                     "--out", str(WORK / "nested.data"), "--global-len", str(w.sys_len),
                     "--num-groups", str(w.groups), "--fewshot-len", str(w.fewshot_len),
                     "--per-group", str(w.per_group), "--question-len", str(QUESTION_LEN)], timeout=120,
                    log=WORK / "nested-dataset.log")

    def install_jit_cache(self) -> None:
        """Unpack ``.device/jit-cache.tar.xz``: FlashInfer modules as AOT modules of the site's
        flashinfer (loaded without nvcc), Triton's cache as the servers' TRITON_CACHE_DIR."""
        aot = SITE / "flashinfer" / "data" / "aot"
        self.sh(["mkdir", "-p", str(aot), str(TRITON_CACHE)], timeout=10)
        stage = WORK / "jit-cache"
        self.sh(["rm", "-rf", str(stage)], timeout=30)
        self.sh(["mkdir", "-p", str(stage)], timeout=10)
        self.sh(["tar", "-C", str(stage), "-xJf", str(JIT_CACHE_TAR)], timeout=120)
        self.sh(["cp", "-a", f"{stage}/aot/.", str(aot)], timeout=60, check=False)
        self.sh(["cp", "-a", f"{stage}/triton/.", str(TRITON_CACHE)], timeout=60, check=False)
        if not self.a.dry_run:
            mods = sorted(p.name for p in aot.iterdir() if p.is_dir())
            self.results["jit_cache_installed"] = mods
            self.log(f"jit cache: {len(mods)} FlashInfer modules installed as AOT")

    def save_jit_cache(self) -> None:
        """``$OUT/jit-cache.tar.xz``: every FlashInfer module compiled in this call (``.so``) and
        Triton's cache (see the module docstring)."""
        if self.a.dry_run:
            return
        stage = WORK / "jit-pack"
        subprocess.run(["rm", "-rf", str(stage)])
        (stage / "aot").mkdir(parents=True)
        for so in FLASHINFER_WS.glob(".cache/flashinfer/*/*/cached_ops/*/*.so"):
            if so.stem == so.parent.name:
                (stage / "aot" / so.parent.name).mkdir(exist_ok=True)
                subprocess.run(["cp", str(so), str(stage / "aot" / so.parent.name / so.name)])
        if TRITON_CACHE.exists():
            subprocess.run(["cp", "-a", str(TRITON_CACHE), str(stage / "triton")])
        tar = self.out / "jit-cache.tar.xz"
        subprocess.run(["tar", "-C", str(stage), "-cJf", str(tar), "aot"] + (["triton"] if (stage / "triton").exists() else []),
                       env=dict(os.environ, XZ_OPT="-9 -T0"))
        sizes = {p.name: p.stat().st_size for p in (stage / "aot").glob("*/*.so")}
        self.results["jit_cache_saved"] = {"bytes": tar.stat().st_size if tar.exists() else None, "modules": sizes}
        self.log(f"jit cache saved: {tar.stat().st_size if tar.exists() else 0} bytes, {len(sizes)} modules "
                 f"({sum(sizes.values())} bytes of .so)")

    # ----------------------------------------------------------------- server
    def start_server(self, system: str) -> bool:
        a = self.a
        relay_flags = []
        for flag in ("relay_kernel", "relay_min_group_size", "relay_min_prefix_tokens"):
            if getattr(a, flag) is not None:
                relay_flags += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
        cmd = server_cmd(system, self.model, self.model_dir, a.port, relay_flags, shlex.split(a.server_args))
        env = dict(self.env)
        if system in SGLANG_BACKEND and not a.vanilla_plugins:
            env["SGLANG_PLUGINS"] = "none"  # whitelist naming no plugin: SGLang exactly as shipped
        self.results["server_cmds"][system] = shlex.join(cmd)
        self.results["server_env"][system] = {k: v for k, v in env.items()
                                              if k.startswith(("RELAY_RADIX_", "SGLANG_", "FLASHINFER_"))}
        self.log(f"start {system}: {shlex.join(cmd)}")
        if a.dry_run:
            return True
        t = time.time()
        log = open(WORK / f"server-{system}.log", "w")
        self.server = subprocess.Popen(cmd, cwd=WORK, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        log.close()
        fresh = not flashinfer_modules_compiled()
        limit = start_limit_s(a.server_timeout_s, self.left(), fresh)
        if fresh:
            self.log(f"no FlashInfer module compiled on this machine yet: {system} may take up to {limit:.0f}s "
                     "to start (nvcc); start vanilla first on a fresh machine, or carry .device/jit-cache.tar.xz")
        while time.time() - t < limit:
            if self.server.poll() is not None:
                self.fail(f"{system} server died during start (rc={self.server.returncode})", system)
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            time.sleep(2)
        else:
            self.fail(f"{system} server not healthy after {limit:.0f}s", system)
            # relay_radix.plugin registers faulthandler on SIGUSR1 in every SGLang process:
            # the server log then shows where each process is stuck.
            try:
                os.killpg(self.server.pid, signal.SIGUSR1)
                time.sleep(3)
            except OSError:
                pass
            return False
        self.results["server_start_s"][system] = round(time.time() - t, 1)
        self.log(f"{system} server up after {time.time() - t:.0f}s")
        return self.warm_up(system)

    def warm_up(self, system: str) -> bool:
        """A few requests before timing: FlashInfer JIT, relay groups (>= 4 requests, >= 256 shared)."""
        from relay_radix.models import ENGLISH

        words = [w for w in ENGLISH if w.isalpha()]
        shared = " ".join(words[i % len(words)] for i in range(1024))
        batches = [
            ([" ".join(words[(i * 7 + j) % len(words)] for j in range(64)) for i in range(8)], 16),
            ([shared], 1),  # puts the prefix in the radix tree, so the next 8 share it while decoding
            ([f"{shared} " + " ".join(words[(i * 13 + j) % len(words)] for j in range(32)) for i in range(8)], 32),
        ]
        t = time.time()
        for texts, n in batches:
            body = json.dumps({"text": texts, "sampling_params": {
                "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{self.a.port}/generate", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=max(10, min(300, self.left() - 60))) as r:
                    json.load(r)
            except Exception as e:
                self.fail(f"{system} warm-up request failed: {e!r}", system)
                return False
        self.results["warmup_s"][system] = round(time.time() - t, 1)
        self.log(f"{system} warm-up done in {time.time() - t:.0f}s")
        return True

    def server_alive(self) -> bool:
        return self.a.dry_run or (self.server is not None and self.server.poll() is None)

    def stop_server(self, system: str) -> None:
        if self.server is None:
            return
        pgid = self.server.pid  # start_new_session: the server leads its own process group

        def group_gone(seconds: float) -> bool:
            end = time.time() + seconds
            while time.time() < end:
                self.server.poll()  # reap the leader, or it stays a zombie member of the group
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return True
                time.sleep(0.5)
            return False

        for sig, seconds in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if group_gone(seconds):
                break
        self.server = None
        log = WORK / f"server-{system}.log"
        if log.exists():
            lines = [l for l in log.read_text(errors="replace").splitlines()
                     if "Traceback" in l or "Error" in l or "error:" in l]
            self.results["server_log_errors"][system] = lines[:20]
        time.sleep(3)  # let the driver release the GPU memory before the next server

    def fail(self, msg: str, system: str | None = None) -> None:
        self.log("!!! " + msg)
        self.results["errors"].append(msg)
        if system and (WORK / f"server-{system}.log").exists():
            tail = (WORK / f"server-{system}.log").read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail), flush=True)

    # -------------------------------------------------------------- benchmarks
    def run_one(self, system: str, w: Workload, rate: float | None = None, timeout: float | None = None,
                repeat: int = 0) -> dict:
        label = w.name if rate is None else f"{w.name}@{rate:g}"
        tag = f"{self.model}/{system}/{label}"
        fname = label + (f"-r{repeat}" if repeat else "")
        out_file = WORK / f"{system}-{fname}.jsonl"
        log = WORK / f"{system}-{fname}.log"
        cmd = bench_cmd(w, port=self.a.port, model_dir=self.model_dir, out_file=out_file, tag=tag,
                        dataset_path=WORK / "nested.data", rate=rate, repeat=repeat)
        timeout = min(timeout or 3 * self.est(system, w) + 30, self.left() - 15)
        run = {"system": system, "workload": w.name, "rate": rate, "repeat": repeat, "cmd": shlex.join(cmd),
               "timeout_s": round(timeout), "tag": tag}
        t = time.time()
        run["rc"] = rc = self.sh(cmd, timeout=timeout, log=log, check=False)
        run["wall_s"] = round(time.time() - t, 1)
        if self.a.dry_run:
            return run
        run["window_utc"] = [round(t, 1), round(time.time(), 1)]
        if self.util_proc is not None:
            run["gpu_util"] = gpu_util_in_window(WORK / "gpu-util.csv", *run["window_utc"])
        server_log = WORK / f"server-{system}.log"
        if server_log.exists():
            from server_log import profile_window

            # Arrival span, queue and the decode step at full batch, from the server's own log.
            run["server_profile"] = profile_window(server_log.read_text(errors="replace"), *run["window_utc"])
        if w.kind == "probe":
            if rc != 0 or not out_file.exists():
                self.fail(f"{tag}: TTFT probe failed, rc={rc}")
                print(_tail(log, 15), flush=True)
            else:
                run["probe"] = json.loads(out_file.read_text())["summary"]
                self.log(_tail(log, 2))
            self.results["runs"].append(run)
            self.save()
            return run
        if w.kind == "exact":
            if rc != 0 or not out_file.exists():
                self.fail(f"{tag}: exactness collection failed, rc={rc}")
            else:
                raw = self.results.setdefault("exact_raw", {}).setdefault(w.name, {})
                raw[system] = json.loads(out_file.read_text())
                from exactness import compare

                # Compare each system with vanilla once, when the later of the two has run.
                others = [x for x in raw if x != "vanilla"] if system == "vanilla" else [system]
                for other in others if "vanilla" in raw else []:
                    key = exactness_key(w.name, other)
                    self.results[key] = compare(raw["vanilla"], raw[other])
                    self.log(f"{key}: {other} vs vanilla: {self.results[key]}")
            self.results["runs"].append(run)
            self.save()
            return run
        records = [json.loads(l) for l in out_file.read_text().splitlines() if l.strip()] if out_file.exists() else []
        if records:
            if records[-1].get("itls") and w.kind in ("gsp", "rnd", "nested"):
                from decode_timeline import decode_timeline

                # Prefill ramp against full-batch decode, before the per-token latencies are dropped.
                run["timeline"] = decode_timeline(records[-1].get("ttfts") or [], records[-1]["itls"])
            _drop_bulky_details(out_file, records)
        if rc != 0 or not records:
            self.fail(f"{tag}: rc={rc}, {len(records)} result records (log tail below)")
            print(_tail(log, 15), flush=True)
        if records:
            rec = records[-1]
            if rec.get("server_info") and system not in self.results["server_info"]:
                self.results["server_info"][system] = rec["server_info"]
            run["result"] = _slim(rec)
            n = rate_num_requests(rate) * w.groups if rate is not None else w.num_requests
            expected = rec.get("expected_input_tokens") or (
                w.expected_input_tokens() * n // w.num_requests)
            ok, err = check_input_tokens(expected, rec.get("total_input_tokens"))
            run.update(expected_input_tokens=expected, input_tokens_ok=ok, input_tokens_rel_err=err)
            if not ok:
                self.fail(f"{tag}: INPUT LENGTH MISMATCH: total input tokens {rec.get('total_input_tokens')} "
                          f"vs {expected} requested ({err if err is None else f'{err:+.1%}'})")
            if rec.get("completed") != n:
                self.fail(f"{tag}: {rec.get('completed')} of {n} requests completed")
            self.log(f"{tag}: {rec.get('output_throughput', 0):.0f} tok/s, median TTFT "
                     f"{rec.get('median_ttft_ms') or 0:.0f} ms, median TPOT {rec.get('median_tpot_ms') or 0:.1f} ms, "
                     f"p99 TPOT {rec.get('p99_tpot_ms') or 0:.1f} ms, wall {run['wall_s']:.0f}s")
        self.results["runs"].append(run)
        self.save()
        return run

    def run_rate_search(self, system: str, w: Workload) -> None:
        slo = self.a.slo_ms
        rates = sorted(self.a.rates_for.get(system, self.a.rates))
        passed: dict[float, bool] = {}
        search = {"slo_p99_tpot_ms": slo, "tried": [], "sustainable_rate": None}
        self.results["rate_search"][system] = search
        stop_at = time.time() + 1.3 * w.est_s  # the budget planned for this workload
        while (rate := next_rate(rates, passed)) is not None:
            est = rate_num_requests(rate) / rate + 15
            if self.left() < est + 15 or (not self.a.dry_run and time.time() + est > stop_at):
                self.results["skipped"].append(f"{system}/{w.name}@{rate:g}: budget")
                break
            run = self.run_one(system, w, rate=rate, timeout=3 * est)
            if self.a.dry_run:  # pretend: pass at and below the middle rate
                passed[rate] = rate <= rates[len(rates) // 2]
                continue
            p99 = run.get("result", {}).get("p99_tpot_ms")
            n = rate_num_requests(rate) * w.groups
            ok = p99 is not None and p99 <= slo and run.get("result", {}).get("completed") == n
            passed[rate] = ok
            search["tried"].append({"rate": rate, "p99_tpot_ms": p99, "pass": ok})
            if not self.server_alive():
                break
        good = [r for r, ok in passed.items() if ok]
        search["sustainable_rate"] = max(good) if good else None
        search["bounded_above"] = bool(good) and max(good) < max(rates)
        self.log(f"{system} sustainable rate (p99 TPOT <= {slo} ms): {search['sustainable_rate']} req/s")
        self.save()

    @staticmethod
    def est(system: str, w: Workload) -> float:
        return w.est_s * EST_FACTOR.get(system, 1.0)

    def reference_todo(self, system: str, twins_ran: list[str]) -> list[Workload]:
        """A reference system's workloads: its own (REFERENCE_ONLY) among those asked, where
        vanilla has (or will have) the twin run."""
        return [w for w in self.workloads if w.name in REFERENCE_ONLY[system] and w.name in twins_ran]

    def run_cost(self, system: str, names: list[str]) -> float:
        """Time a later server of the call needs: its start and its runs of ``names``."""
        return SECOND_SERVER_EST_S + sum(self.est(system, WORKLOADS[n]) for n in names) if names else 0.0

    def later_cost(self, system: str, names: list[str]) -> float:
        """Time the systems after ``system`` need if it runs ``names``: the twin's runs (when
        ``system`` is the first twin), then the references' runs."""
        later = [(s, names) for s in self.systems[1:]] if self.systems[:1] == [system] else []
        if system in self.systems:
            later += [(r, [w.name for w in self.reference_todo(r, names)]) for r in self.references]
        return sum(self.run_cost(s, ns) for s, ns in later)

    def run_system(self, system: str, todo: list[Workload]) -> list[str]:
        """Start ``system``, run ``todo`` (``--repeat`` times) within the budget, stop. Returns the
        workloads that ran, once per run."""
        done: list[str] = []
        self.current = system
        if not self.start_server(system):
            self.stop_server(system)
            return done
        try:
            for rep, w in repeat_order(todo, self.a.repeat):
                label = w.name + (f" (repeat {rep})" if rep else "")
                # ``done`` lists every run (repeats too), so the reserve holds the twin's runs of each.
                reserve = self.later_cost(system, done + [w.name])
                need = self.est(system, w) + reserve + 20
                if not self.a.dry_run and self.left() < need:
                    msg = f"{system}/{label}: skipped, {self.left():.0f}s left < {need:.0f}s needed"
                    self.results["skipped"].append(msg)
                    self.log(msg)
                    continue
                if not self.server_alive():
                    self.fail(f"{system} server died; skipping {label}", system)
                    self.results["skipped"].append(f"{system}/{label}: server dead")
                    continue
                if w.kind == "rate":
                    self.run_rate_search(system, w)
                else:
                    self.run_one(system, w, repeat=rep)
                done.append(w.name)
        finally:
            self.stop_server(system)
            self.pack_logs()
        return done

    def main(self) -> int:
        self.log(f"model {self.model}; workloads {[w.name for w in self.workloads]}; systems {self.systems}; "
                 f"budget {self.a.budget_s}s")
        try:
            self.setup()
            todo = self.workloads
            twins_ran = [w.name for w in todo]
            for system in self.systems:
                ran = self.run_system(system, todo)
                if system == self.systems[0] and len(self.systems) > 1:
                    if not ran and not self.a.dry_run and not self.a.keep_going:
                        self.fail(f"{system} ran nothing: its twin skipped (--keep-going runs it anyway)")
                        break
                    if not self.a.dry_run:
                        todo = [w for w in todo if w.name in ran] or (todo if self.a.keep_going else [])
                if system == "vanilla" and not self.a.dry_run:
                    twins_ran = ran
            for system in self.references:
                refs = self.reference_todo(system, twins_ran)
                if not refs:
                    self.results["skipped"].append(f"{system}: none of {sorted(REFERENCE_ONLY[system])} "
                                                   "ran on vanilla in this call")
                    continue
                if not self.a.dry_run and self.left() < self.run_cost(system, [w.name for w in refs]):
                    self.results["skipped"].append(f"{system}: budget")
                    self.log(f"{system}: skipped, {self.left():.0f}s left")
                    continue
                self.run_system(system, refs)
        except BaseException as e:  # KeyboardInterrupt / SIGTERM too: keep what was measured
            self.fail(f"driver stopped: {e!r}")
            if self.server is not None:
                self.stop_server(self.current)
        finally:
            if self.util_proc is not None:
                self.util_proc.terminate()
                self.util_log.close()
            if self.a.save_jit_cache:
                self.save_jit_cache()
            self.results["total_s"] = round(time.time() - self.t0, 1)
            self.save()
            self.pack_logs()
        if not self.a.dry_run:
            print((self.out / "summary.md").read_text() if (self.out / "summary.md").exists() else "")
        self.log(f"done; errors: {len(self.results['errors'])}; results in {self.out}")
        return 1 if self.results["errors"] else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="presets: " + "; ".join(f"{k} = {','.join(v)}" for k, v in PRESETS.items()))
    ap.add_argument("--model", default="llama2-7b-mha", choices=sorted(DEFAULT_SLO_MS))
    ap.add_argument("--workloads", default="core", help="comma list of presets and workload names")
    ap.add_argument("--systems", default="relay,vanilla",
                    help="comma list, in start order: " + "; ".join(f"{k}: {v}" for k, v in SYSTEMS.items()))
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"))
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--budget-s", type=float, default=555,
                    help="deadline for all benchmarks, from --t0 (the device kills a command at 600 s)")
    ap.add_argument("--t0", type=float, default=None, help="start time (epoch s) of the call; default now")
    ap.add_argument("--server-timeout-s", type=float, default=300)
    ap.add_argument("--server-args", default="", help="extra SGLang server arguments for both systems")
    ap.add_argument("--relay-kernel", choices=["triton", "flashinfer"])
    ap.add_argument("--relay-min-group-size", type=int)
    ap.add_argument("--relay-min-prefix-tokens", type=int)
    ap.add_argument("--slo-ms", type=float, default=None, help="p99 TPOT SLO of rate8k (default per model)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each benchmark-client workload this many times per server (seed 42, 43, ...); "
                         "summarize.py pairs relay and vanilla runs by seed and shows the pair with the median ratio")
    ap.add_argument("--rates", type=_rate_list, default=list(DEFAULT_RATES))
    ap.add_argument("--rates-for", action="append", default=[], type=_system_rates, metavar="SYSTEM=R1,R2",
                    help="rates of one system's search (repeatable; others use --rates): vanilla and relay "
                         "sustain rates ~3x apart, so one list would spend runs far from either's limit")
    ap.add_argument("--vanilla-plugins", action="store_true", help="let vanilla load SGLang plugins too")
    ap.add_argument("--keep-going", action="store_true", help="run vanilla even if relay ran nothing")
    ap.add_argument("--gpu-util", action="store_true",
                    help="sample nvidia-smi utilization every 100 ms; each run gets its window's mean")
    ap.add_argument("--save-jit-cache", action="store_true",
                    help="pack the compiled FlashInfer modules and Triton's cache into $OUT/jit-cache.tar.xz")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    a.rates_for = dict(a.rates_for)
    unknown = set(a.rates_for) - set(SYSTEMS)
    if unknown:
        ap.error(f"--rates-for: unknown systems {sorted(unknown)}")
    if a.slo_ms is None:
        a.slo_ms = DEFAULT_SLO_MS[a.model]
    return a


def _rate_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _system_rates(text: str) -> tuple[str, list[float]]:
    system, sep, rates = text.partition("=")
    if not sep or not rates:
        raise argparse.ArgumentTypeError(f"{text!r}: write SYSTEM=R1,R2,...")
    return system, _rate_list(rates)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # unwinds through Driver.main: server stopped, results kept


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Driver(a).main()


if __name__ == "__main__":
    sys.exit(main())
