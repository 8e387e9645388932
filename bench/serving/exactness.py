"""End-to-end exactness: the same prompts through relay and vanilla servers, greedy.

    python bench/serving/exactness.py collect --port 30000 --model-dir DIR --out relay.json
    python bench/serving/exactness.py compare vanilla.json relay.json [--json out.json]

``collect`` sends a burst of prompts that share a system prompt (two nested levels: a
global prompt, then one of two few-shot blocks, then a question) to ``/generate`` with
``input_ids`` (exact lengths), greedy, ``max_new_tokens`` tokens, and records the generated
ids with the top-k logprobs of every output position. Sent concurrently, so relay groups
form while they decode. ``compare`` reports the share of requests with identical greedy
outputs, the first position where each differing request diverges, and the max |logprob
difference| of the chosen tokens and of the top-k entries up to that divergence (after it
the two runs condition on different tokens and are not comparable).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import urllib.request


def make_prompts(n: int, system_len: int, fewshot_len: int, question_len: int, vocab: int, seed: int = 0,
                 blocks: int = 2) -> list[list[int]]:
    """``n`` token-id prompts: one global system prompt, then few-shot block ``i % blocks``, then
    a question of its own. With ``n // blocks >= RELAY_RADIX_MIN_GROUP_SIZE`` every block is a
    nested relay group under the global one."""
    rng = random.Random(seed)
    lo = 100  # skip specials and punctuation ids of the built-in tokenizers
    system = [rng.randrange(lo, vocab) for _ in range(system_len)]
    fewshots = [[rng.randrange(lo, vocab) for _ in range(fewshot_len)] for _ in range(blocks)]
    return [system + fewshots[i % blocks] + [rng.randrange(lo, vocab) for _ in range(question_len)]
            for i in range(n)]


def _generate(port: int, ids: list[int], max_new: int, top_k: int) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new,
                                                    "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": top_k, "logprob_start_len": len(ids) - 1}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    meta = out["meta_info"]
    toks = [t[1] for t in meta["output_token_logprobs"]]
    lps = [t[0] for t in meta["output_token_logprobs"]]
    tops = [[(e[1], e[0]) for e in pos] for pos in meta["output_top_logprobs"]]
    return {"output_ids": toks, "logprobs": lps, "top": tops}


def collect(port: int, n: int, system_len: int, fewshot_len: int, question_len: int, vocab: int,
            max_new: int, top_k: int, blocks: int = 2, waves: list[int] | None = None) -> list[dict]:
    """``waves``: sizes of request waves sent one after another, each all at once (default: one
    wave of ``n``). Why: a prompt first reaches the server in the wave that prefills it, and a
    prefill batch over a cached prompt takes relay's extend pool pass only from the second batch
    that prompt is seen in (``relay_radix.extend_plan``), so a later wave is what tests it."""
    prompts = make_prompts(n, system_len, fewshot_len, question_len, vocab, blocks=blocks)
    waves = waves or [n]
    assert sum(waves) == n, (waves, n)
    out, at = [], 0
    for w in waves:
        with cf.ThreadPoolExecutor(max_workers=w) as ex:
            out += list(ex.map(lambda p: _generate(port, p, max_new, top_k), prompts[at:at + w]))
        at += w
    return out


def compare(a: list[dict], b: list[dict]) -> dict:
    same = 0
    max_lp, max_top = 0.0, 0.0
    first_div = []
    for x, y in zip(a, b):
        n = min(len(x["output_ids"]), len(y["output_ids"]))
        div = next((i for i in range(n) if x["output_ids"][i] != y["output_ids"][i]), None)
        if div is None and len(x["output_ids"]) == len(y["output_ids"]):
            same += 1
        else:
            first_div.append(div if div is not None else n)
        upto = n if div is None else div + 1  # the diverging position's distribution is comparable
        for i in range(upto):
            max_lp = max(max_lp, abs(x["logprobs"][i] - y["logprobs"][i]))
            tx, ty = dict(x["top"][i]), dict(y["top"][i])
            for t in set(tx) & set(ty):
                max_top = max(max_top, abs(tx[t] - ty[t]))
    return {"requests": len(a), "identical_greedy": same, "identical_share": same / max(len(a), 1),
            "first_divergence_positions": sorted(first_div), "max_abs_logprob_diff_chosen": max_lp,
            "max_abs_logprob_diff_topk": max_top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--port", type=int, default=30000)
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--system-len", type=int, default=4096)
    c.add_argument("--fewshot-len", type=int, default=512)
    c.add_argument("--question-len", type=int, default=64)
    c.add_argument("--vocab", type=int, default=32000)
    c.add_argument("--max-new", type=int, default=32)
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--blocks", type=int, default=2, help="few-shot blocks (nested groups under the prompt)")
    c.add_argument("--waves", default="", help="comma list of wave sizes sent one after another (sum = --n)")
    c.add_argument("--out", required=True)
    m = sub.add_parser("compare")
    m.add_argument("a")
    m.add_argument("b")
    m.add_argument("--json")
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        res = collect(a.port, a.n, a.system_len, a.fewshot_len, a.question_len, a.vocab, a.max_new, a.top_k,
                      blocks=a.blocks, waves=[int(x) for x in a.waves.split(",")] if a.waves else None)
        with open(a.out, "w") as f:
            json.dump(res, f)
        print(f"collected {len(res)} requests -> {a.out}")
        return 0
    r = compare(json.load(open(a.a)), json.load(open(a.b)))
    print(json.dumps(r, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
