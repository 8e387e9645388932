"""An SGLang frontend program against a running server: one long shared system prompt, many questions.

    python bench/serving/frontend_program.py --port 30000 --system-len 8192 --num-questions 128

The program is ``sgl.system(SYSTEM) + sgl.user(question) + sgl.assistant(sgl.gen(...))``, run over
all questions with ``run_batch`` (``--threads`` at a time; the frontend first caches the traced
common prefix, the system prompt, with one request). Prompts are made of the built-in tokenizers'
English words, one token each, so with SGLang's default chat template (``SYSTEM:``/``USER:``/
``ASSISTANT:`` prefixes, 2 tokens each) every prompt has exactly ``system_len + question_len + 6``
tokens. Generation ignores EOS, so every answer has ``--output-len`` tokens.

Prints the output tok/s and appends one JSON record (``--output-file``) with the keys that
``summarize.py`` reads from ``sglang.benchmark.serving`` outputs (no TTFT/TPOT: not streamed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

TEMPLATE_TOKENS = 6  # "system :", "user :", "assistant :" of SGLang's default chat template


def english_words() -> list[str]:
    from relay_radix.models import ENGLISH

    return [w for w in ENGLISH if w.isalpha()]


def make_text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choices(words, k=n))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SGLang frontend program benchmark (shared system prompt)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--system-len", type=int, default=8192)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--num-questions", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=128, help="programs in flight (concurrency)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-file", help="append one JSON record here")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)

    import sglang as sgl

    rng = random.Random(a.seed)
    words = english_words()
    system_prompt = make_text(rng, words, a.system_len)
    questions = [make_text(rng, words, a.question_len) for _ in range(a.num_questions)]

    @sgl.function
    def answer(s, question):
        s += sgl.system(system_prompt)
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=a.output_len, ignore_eos=True, temperature=0))

    backend = sgl.RuntimeEndpoint(f"http://{a.host}:{a.port}", chat_template_name="default")
    sgl.set_default_backend(backend)

    # Untimed warm-up: also caches the system prompt, as a long-running frontend would have.
    answer.run_batch([{"question": q} for q in questions[:4]], temperature=0, num_threads=4)

    t0 = time.perf_counter()
    states = answer.run_batch([{"question": q} for q in questions], temperature=0,
                              num_threads=a.threads)
    duration = time.perf_counter() - t0

    metas, errors = [], 0
    for st in states:
        err = st.error()
        meta = None if err else st.stream_executor.get_meta_info("answer", timeout=60)
        if meta:
            metas.append(meta)
        else:
            errors += 1
            print(f"program failed: {err!r}", file=sys.stderr)
    prompt_tokens = [m.get("prompt_tokens", 0) for m in metas]
    output_tokens = [m.get("completion_tokens", 0) for m in metas]
    e2e_ms = [1000 * m["e2e_latency"] for m in metas if m.get("e2e_latency") is not None]
    expected_prompt = a.system_len + a.question_len + TEMPLATE_TOKENS
    record = {
        "tag": a.tag,
        "backend": "sglang-frontend",
        "dataset_name": "frontend-program",
        "max_concurrency": a.threads,
        "duration": duration,
        "completed": len(metas),
        "errors_count": errors,
        "total_input_tokens": sum(prompt_tokens),
        "expected_input_tokens": expected_prompt * a.num_questions,
        "total_output_tokens": sum(output_tokens),
        "cached_tokens": sum(m.get("cached_tokens", 0) for m in metas),
        "request_throughput": len(metas) / duration,
        "output_throughput": sum(output_tokens) / duration,
        "mean_e2e_latency_ms": statistics.fmean(e2e_ms) if e2e_ms else None,
        "median_e2e_latency_ms": statistics.median(e2e_ms) if e2e_ms else None,
        "p99_e2e_latency_ms": percentile(e2e_ms, 99) if e2e_ms else None,
    }
    print(f"Successful requests:                     {len(metas)}")
    print(f"Benchmark duration (s):                  {duration:.2f}")
    print(f"Total input tokens:                      {sum(prompt_tokens)}")
    print(f"Total generated tokens:                  {sum(output_tokens)}")
    print(f"Request throughput (req/s):              {record['request_throughput']:.2f}")
    print(f"Output token throughput (tok/s):         {record['output_throughput']:.2f}")
    if metas and (min(prompt_tokens) != max(prompt_tokens) or prompt_tokens[0] != expected_prompt):
        print(f"WARNING prompt tokens {min(prompt_tokens)}..{max(prompt_tokens)}, expected {expected_prompt}")
    if a.output_file:
        with open(a.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if metas and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
