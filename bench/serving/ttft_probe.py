"""Where the time to first token goes in a burst: client and server timestamps per request.

    python bench/serving/ttft_probe.py --port 30000 --model-dir DIR --system-len 16384 \
        --num-requests 128 --out probe.json

Sends one burst shaped like ``sglang.benchmark.serving``'s generated-shared-prefix run (one
system prompt of ``--system-len`` words, then a ``--question-len``-word question, text
prompts, ``--output-len`` tokens, streamed, all requests at once) and records, per request,
the client's send and first-chunk times and the server's own stage timestamps, which SGLang
0.5.16 puts in ``meta_info`` when the server runs with ``--enable-metrics``:

    sent (client) -> request_received_ts (tokenizer manager picks the request up)
    -> api_server_dispatch_finish_ts (tokenized, sent to the scheduler)
    -> forward_entry_time (the scheduler puts it in a prefill batch)
    -> prefill_finished_time -> response_sent_to_client_ts (first chunk yielded)
    -> first chunk at the client.

All are wall-clock seconds on one machine. The scheduler's two (``forward_entry_time``,
``prefill_finished_time``, stages ``to_prefill``/``prefill``/``first_out``) are used when the
server sends them; SGLang 0.5.16 did not in the runs recorded so far, so those stages are absent
from their summaries. The summary gives each stage's median and p99
duration and, per timestamp, when the first and the last request reached it after the burst
was sent: a stage whose "last" is late while its durations are short is a queue in front of
it. The word-level tokenizer of the built-in models makes a decoded id list re-encode to the
same ids, so prompts have exactly the requested lengths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import aiohttp
from frontend_program import percentile  # this folder is sys.path[0] when run as a script

STAGES = [  # (name, start key, end key) over the per-request record
    ("receive", "sent", "request_received_ts"),
    ("tokenize_dispatch", "request_received_ts", "api_server_dispatch_finish_ts"),
    ("to_prefill", "api_server_dispatch_finish_ts", "forward_entry_time"),
    ("prefill", "forward_entry_time", "prefill_finished_time"),
    ("first_out", "prefill_finished_time", "response_sent_to_client_ts"),
    ("to_client", "response_sent_to_client_ts", "first_chunk"),
    ("ttft", "sent", "first_chunk"),
]
POINTS = ["request_received_ts", "api_server_dispatch_finish_ts", "forward_entry_time",
          "prefill_finished_time", "response_sent_to_client_ts", "first_chunk", "done"]


def make_prompts(tokenizer_dir: str, n: int, system_len: int, question_len: int, seed: int = 42) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    lo, hi = 100, tok.vocab_size  # past the specials and punctuation of the built-in vocabularies
    system = [rng.randrange(lo, hi) for _ in range(system_len)]
    return [tok.decode(system + [rng.randrange(lo, hi) for _ in range(question_len)]) for _ in range(n)]


async def one(session: aiohttp.ClientSession, url: str, text: str, output_len: int) -> dict:
    body = {"text": text, "stream": True,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}}
    rec: dict = {"sent": time.time()}
    last_meta: dict = {}
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "first_chunk" not in rec:
                rec["first_chunk"] = time.time()
            last_meta = chunk.get("meta_info", last_meta)
    rec["done"] = time.time()
    for k in ("request_received_ts", "api_server_dispatch_finish_ts", "forward_entry_time",
              "prefill_finished_time", "response_sent_to_client_ts", "queue_time", "completion_tokens"):
        if k in last_meta:
            rec[k] = last_meta[k]
    return rec


def summarize(recs: list[dict], t0: float) -> dict:
    """Stage durations (ms: median, p99) and arrival points (s after the burst: first, median, last)."""
    stages = {}
    for name, a, b in STAGES:
        d = [(r[b] - r[a]) * 1e3 for r in recs if a in r and b in r]
        if d:
            stages[name] = {"median_ms": round(statistics.median(d), 1), "p99_ms": round(percentile(d, 99), 1), "n": len(d)}
    points = {}
    for k in POINTS:
        t = [r[k] - t0 for r in recs if k in r]
        if t:
            points[k] = {"first_s": round(min(t), 3), "median_s": round(statistics.median(t), 3),
                         "last_s": round(max(t), 3), "n": len(t)}
    return {"stages": stages, "points": points}


async def run(a: argparse.Namespace) -> dict:
    prompts = make_prompts(a.model_dir, a.num_requests, a.system_len, a.question_len)
    url = f"http://127.0.0.1:{a.port}/generate"
    conn = aiohttp.TCPConnector(limit=0)  # no client-side cap: the whole burst goes out at once
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=a.timeout_s)) as s:
        # Prime: the system prompt enters the radix tree first, as in sglang.benchmark.serving's warm-up.
        await one(s, url, prompts[0], 4)
        t0 = time.time()
        recs = await asyncio.gather(*(one(s, url, p, a.output_len) for p in prompts))
    return {"args": vars(a), "burst_t0": t0, "summary": summarize(recs, t0), "requests": recs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model-dir", required=True, help="tokenizer folder (the built-in model's)")
    ap.add_argument("--system-len", type=int, default=16384)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = asyncio.run(run(a))
    with open(a.out, "w") as f:
        json.dump(res, f)
    s = res["summary"]
    print(f"{a.tag} stages (ms, median / p99):",
          ", ".join(f"{k} {v['median_ms']:.0f}/{v['p99_ms']:.0f}" for k, v in s["stages"].items()))
    print(f"{a.tag} points (s after burst, first / median / last):",
          ", ".join(f"{k} {v['first_s']:.2f}/{v['median_s']:.2f}/{v['last_s']:.2f}" for k, v in s["points"].items()))


if __name__ == "__main__":
    main()
