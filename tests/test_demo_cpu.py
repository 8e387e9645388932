"""The README's main job on a machine without a GPU (``python -m relay_radix.demo``): relay groups
form over SGLang's real radix cache and save KV reads, the gate keeps the last small steps
plain, outputs equal SGLang's ``torch_native`` backend, and nothing stays pinned."""

from relay_radix.demo import run_cpu_demo


def test_cpu_demo_relays_saves_bytes_and_matches_torch_native(capsys):
    r = run_cpu_demo(steps=12)
    out = capsys.readouterr().out
    assert r["max_rel_err"] < 1e-5 and r["leaked"] == 0, r
    # 32 requests on a 2K prompt (16 under a nested 1K few-shot block) relay from the first step.
    assert r["relayed_steps"] >= 8 and r["saved_bytes"] > 0.8 * r["vanilla_bytes"], r
    assert "L0:[0,2048)x32, L1:[2048,3072)x16" in out  # the nested group, as the plan holds it
    # With few requests left, relaying would not save time on an H100: the gate decodes plainly.
    assert r["gated_steps"] >= 1 and "gated: faster unshared" in out, r
