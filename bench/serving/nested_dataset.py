"""Nested-sharing dataset for ``sglang.benchmark.serving --dataset-name custom``.

Every prompt is ``<global system prompt>\\n\\n<few-shot block of its group>\\n\\n<question>``:
one global prefix shared by all requests, and inside it one few-shot block per group shared by
that group's requests (two nested levels of the radix tree). Prompts are made of the built-in
model's vocabulary words, one token each, so a prompt has exactly
``global_len + fewshot_len + question_len`` tokens under that model's tokenizer.

    python bench/serving/nested_dataset.py --model llama2-7b-mha --out nested.jsonl
    python -m sglang.benchmark.serving --dataset-name custom --dataset-path nested.jsonl \\
        --num-prompts 128 --sharegpt-output-len 256 ...

Each JSONL line is ``{"conversations": [{"role": "user", "content": PROMPT},
{"role": "assistant", "content": "ok"}], "group": G, "prompt_len": N}``: the custom dataset
reads the first two turns (user prompt, reference answer whose length
``--sharegpt-output-len`` overrides) and ignores the other keys.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class NestedSpec:
    global_len: int = 4096  # tokens of the system prompt shared by every request
    num_groups: int = 4  # few-shot groups
    fewshot_len: int = 2048  # tokens of each group's few-shot block
    per_group: int = 32  # requests per group
    question_len: int = 128  # tokens of each request's own question
    seed: int = 0

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.per_group

    @property
    def prompt_len(self) -> int:
        return self.global_len + self.fewshot_len + self.question_len


def build_rows(words: list[str], spec: NestedSpec) -> list[dict]:
    """The dataset rows, group by group; ``words`` must each be one token of the tokenizer."""
    if not words:
        raise ValueError("empty word list")
    rng = random.Random(spec.seed)

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    shared = text(spec.global_len)
    rows = []
    for g in range(spec.num_groups):
        fewshot = text(spec.fewshot_len)
        for _ in range(spec.per_group):
            parts = [p for p in (shared, fewshot, text(spec.question_len)) if p]
            rows.append({
                "conversations": [{"role": "user", "content": "\n\n".join(parts)},
                                  {"role": "assistant", "content": "ok"}],
                "group": g,
                "prompt_len": spec.prompt_len,
            })
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="built-in model name (its vocabulary makes the words)")
    ap.add_argument("--out", required=True)
    for field, default in asdict(NestedSpec()).items():
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=default)
    a = ap.parse_args(argv)
    from relay_radix.models import prompt_words

    spec = NestedSpec(**{k: getattr(a, k) for k in asdict(NestedSpec())})
    rows = build_rows(prompt_words(a.model), spec)
    write_jsonl(rows, a.out)
    print(f"wrote {a.out}: {len(rows)} requests x {spec.prompt_len} tokens "
          f"({spec.global_len} global + {spec.fewshot_len} few-shot x {spec.num_groups} groups "
          f"+ {spec.question_len} question)", file=sys.stderr)


if __name__ == "__main__":
    main()
