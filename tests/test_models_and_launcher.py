"""CPU tests of the built-in models, the relay launcher's argv rewriting and the serving-bench tools."""

import json
import re
import tarfile
import time
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVING = REPO / "bench" / "serving"
sys.path.insert(0, str(SERVING))

import nested_dataset  # noqa: E402
import run_serving  # noqa: E402
import summarize  # noqa: E402
from relay_radix import launch_server  # noqa: E402
from relay_radix.models import (  # noqa: E402
    BUILTIN_MODELS, load_config, materialize, prompt_words, resolve_model_path, vocab_words)

MODELS = sorted(BUILTIN_MODELS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return {name: materialize(name, cache) for name in MODELS}


@pytest.fixture(scope="module")
def tokenizers(model_dirs):
    transformers = pytest.importorskip("transformers")
    return {name: transformers.AutoTokenizer.from_pretrained(path) for name, path in model_dirs.items()}


# ------------------------------------------------------------------------------------- models
def test_packaged_configs_have_the_documented_shapes():
    mha, gqa = load_config("llama2-7b-mha"), load_config("relay-radix/llama3-8b-gqa")
    for cfg in (mha, gqa):
        assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (32, 4096, 32)
    assert (mha["num_key_value_heads"], mha["intermediate_size"], mha["vocab_size"]) == (32, 11008, 32000)
    assert (gqa["num_key_value_heads"], gqa["intermediate_size"], gqa["vocab_size"]) == (8, 14336, 128256)
    assert gqa["rope_theta"] == 500000.0


@pytest.mark.parametrize("name", MODELS)
def test_vocab_is_distinct_and_english_first(name):
    words = vocab_words(name)
    assert len(words) == load_config(name)["vocab_size"] == len(set(words))
    assert words[:3] == ["<s>", "</s>", "<unk>"]
    assert words.index("the") < 100 and words.index("system") < 200
    assert all(w == w.lower() and " " not in w for w in words)


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_covers_vocab_and_round_trips(name, tokenizers):
    tok = tokenizers[name]
    assert len(tok) == load_config(name)["vocab_size"]
    rng = random.Random(1)
    ids = rng.choices(range(len(tok)), k=3000)  # special ids included, as gen_prompt draws them
    text = tok.decode(ids)
    assert tok.encode(text) == ids  # no BOS added: benchmark prompt lengths are exact
    assert all(tok.decode([i]).strip() for i in ids[:200])  # every id decodes to a visible word


@pytest.mark.parametrize("name", MODELS)
def test_prompt_lengths_are_exact(name, tokenizers):
    tok, words = tokenizers[name], prompt_words(name)
    rng = random.Random(2)
    for n in (1, 17, 128, 2048):
        assert len(tok.encode(" ".join(rng.choices(words, k=n)))) == n
    assert len(tok.encode("SYSTEM:hello world\nUSER: why\nASSISTANT:")) == 9  # frontend template: 6


def test_materialize_is_idempotent_and_rebuilds_stale(tmp_path):
    path = Path(materialize("llama2-7b-mha", tmp_path))
    tok_file = path / "tokenizer.json"
    mtime = tok_file.stat().st_mtime_ns
    assert materialize("relay-radix/llama2-7b-mha", tmp_path) == str(path)
    assert tok_file.stat().st_mtime_ns == mtime  # not rewritten
    assert json.loads((path / "config.json").read_text()) == load_config("llama2-7b-mha")
    (path / ".relay_radix_model.json").write_text("{}")  # as if made by another generator version
    assert materialize("llama2-7b-mha", tmp_path) == str(path)
    assert json.loads((path / ".relay_radix_model.json").read_text())["name"] == "llama2-7b-mha"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama2-7b-mha"]  # no temp folder left


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_RADIX_MODEL_CACHE", str(tmp_path))
    assert resolve_model_path("relay-radix/llama3-8b-gqa") == str(tmp_path / "llama3-8b-gqa")
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") is None
    assert resolve_model_path("relay-radix/nope") is None
    monkeypatch.chdir(tmp_path)  # a local folder named like a built-in model wins over the bare name
    assert resolve_model_path("llama3-8b-gqa") is None
    with pytest.raises(KeyError):
        materialize("nope", tmp_path)


# ----------------------------------------------------------------------------------- launcher
def fake_resolve(name):
    return {"relay-radix/llama2-7b-mha": "/cache/llama2-7b-mha"}.get(name)


def test_launcher_defaults_to_relay_with_builtin_model():
    argv, env = launch_server.build_argv(["--model-path", "relay-radix/llama2-7b-mha", "--port", "30000"],
                                         resolve=fake_resolve)
    assert argv == ["--model-path", "/cache/llama2-7b-mha", "--port", "30000", "--load-format", "dummy",
                    "--attention-backend", "relay", "--radix-cache-backend", "relay",
                    "--cuda-graph-max-bs-decode", str(launch_server.RELAY_DECODE_GRAPH_MAX_BS)]
    assert env == {}


@pytest.mark.parametrize("given", [["--cuda-graph-max-bs", "128"], ["--cuda-graph-max-bs-decode=96"],
                                   ["--cuda-graph-bs", "1", "2", "4"], ["--disable-cuda-graph"],
                                   ["--cuda-graph-config", '{"decode": {"max_bs": 64}}']])
def test_launcher_keeps_a_given_decode_graph_size(given):
    """Relay's larger decode-graph default applies only when the user chose no graph sizes, and
    never to another attention backend."""
    argv, _ = launch_server.build_argv(["--model-path", "/m"] + given, resolve=fake_resolve)
    assert "--cuda-graph-max-bs-decode" not in argv or "--cuda-graph-max-bs-decode=96" in given
    assert argv[: 2 + len(given)] == ["--model-path", "/m"] + given
    argv, _ = launch_server.build_argv(["--model-path", "/m", "--attention-backend", "flashinfer"], resolve=fake_resolve)
    assert not any(a.startswith("--cuda-graph") for a in argv)


def test_launcher_relay_flags_become_env_and_leave_argv():
    argv, env = launch_server.build_argv(
        ["--relay-kernel", "flashinfer", "--model", "relay-radix/llama2-7b-mha", "--relay-min-group-size=8",
         "--relay-min-prefix-tokens", "512", "--load-format", "auto", "--relay-base-backend", "triton",
         "--relay-max-groups=16", "--relay-evict-for-runs", "0"],
        resolve=fake_resolve)
    assert env == {"RELAY_RADIX_KERNEL": "flashinfer", "RELAY_RADIX_MIN_GROUP_SIZE": "8",
                   "RELAY_RADIX_MIN_PREFIX_TOKENS": "512", "RELAY_RADIX_BASE_BACKEND": "triton",
                   "RELAY_RADIX_MAX_GROUPS": "16", "RELAY_RADIX_EVICT_FOR_RUNS": "0"}
    assert not any(a.startswith("--relay") for a in argv)
    assert argv[:4] == ["--model", "/cache/llama2-7b-mha", "--load-format", "auto"]  # user's format kept
    assert argv.count("--load-format") == 1


def test_launcher_respects_a_given_backend():
    argv, _ = launch_server.build_argv(["--model-path=/m", "--attention-backend", "flashinfer"], resolve=fake_resolve)
    assert argv == ["--model-path=/m", "--attention-backend", "flashinfer"]  # no relay, no dummy
    argv, _ = launch_server.build_argv(["--model-path", "/m", "--attention-backend=relay"], resolve=fake_resolve)
    assert argv[-4:-2] == ["--radix-cache-backend", "relay"]
    argv, _ = launch_server.build_argv(["--model-path", "/m", "--radix-cache-backend", "custom"], resolve=fake_resolve)
    assert argv.count("--radix-cache-backend") == 1 and "custom" in argv


@pytest.mark.parametrize("bad", [["--relay-kernel", "cuda"], ["--relay-min-group-size", "four"],
                                 ["--relay-min-prefix-tokens"], ["--relay-kernel", "--port"],
                                 ["--relay-min-prefix-tokens=-"], ["--relay-min-group-size=2.5"]])
def test_launcher_rejects_bad_relay_flags(bad):
    with pytest.raises(ValueError):
        launch_server.build_argv(["--model-path", "/m"] + bad, resolve=fake_resolve)


def test_launcher_front_end_hint_only_without_a_parallel_tokenizer():
    hint = launch_server.front_end_hint(["--model-path", "/m", "--attention-backend", "relay"])
    assert hint is not None and "--enable-dynamic-batch-tokenizer" in hint
    for given in (["--enable-dynamic-batch-tokenizer"], ["--tokenizer-worker-num", "4"],
                  ["--tokenizer-worker-num=2"], ["--skip-tokenizer-init"]):
        assert launch_server.front_end_hint(["--model-path", "/m"] + given) is None, given
    assert launch_server.front_end_hint(["--model-path", "/m", "--tokenizer-worker-num", "1"]) is not None


def test_launcher_tokenizer_path_alone_adds_no_dummy():
    argv, _ = launch_server.build_argv(["--model-path", "/real", "--tokenizer-path", "relay-radix/llama2-7b-mha"],
                                       resolve=fake_resolve)
    assert argv[:4] == ["--model-path", "/real", "--tokenizer-path", "/cache/llama2-7b-mha"]
    assert "--load-format" not in argv


# ------------------------------------------------------------------------------ nested dataset
def test_nested_dataset_lengths_and_sharing(tokenizers):
    spec = nested_dataset.NestedSpec(global_len=300, num_groups=3, fewshot_len=70, per_group=5, question_len=11)
    tok = tokenizers["llama2-7b-mha"]
    rows = nested_dataset.build_rows(prompt_words("llama2-7b-mha"), spec)
    assert len(rows) == 15
    prompts = [r["conversations"][0]["content"] for r in rows]
    ids = [tok.encode(p) for p in prompts]
    assert all(len(x) == 300 + 70 + 11 == r["prompt_len"] for x, r in zip(ids, rows))
    assert len({tuple(x[:300]) for x in ids}) == 1  # one global prefix
    by_group = {}
    for x, r in zip(ids, rows):
        by_group.setdefault(r["group"], set()).add(tuple(x[:370]))
    assert sorted(by_group) == [0, 1, 2] and all(len(s) == 1 for s in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 3  # few-shot blocks differ by group
    assert len({tuple(x[370:]) for x in ids}) == 15  # every question differs
    assert rows == nested_dataset.build_rows(prompt_words("llama2-7b-mha"), spec)  # seeded


# ---------------------------------------------------------------------- benchmark commands
@pytest.fixture(scope="module")
def serving_module():
    return pytest.importorskip("sglang.benchmark.serving")


def _bench_dataset(serving_module, monkeypatch, cmd, tok):
    """Parse a bench_cmd with sglang.benchmark.serving's own CLI and load its dataset (no server)."""
    from sglang.benchmark.datasets import get_dataset

    captured = {}
    monkeypatch.setattr(serving_module, "run_benchmark", lambda args: captured.setdefault("args", args))
    monkeypatch.setattr(sys, "argv", ["serving"] + cmd[3:])
    serving_module.cli_main()
    args = captured["args"]
    random.seed(args.seed)
    import numpy as np

    np.random.seed(args.seed)
    return args, get_dataset(args, tok)


@pytest.mark.parametrize("name", ["ctrl_c64", "gsp2k_c64", "gsp8k_4x32", "nested_c128", "nosh_c128"])
def test_benchmark_commands_give_exact_input_lengths(name, serving_module, monkeypatch, tmp_path,
                                                     model_dirs, tokenizers):
    monkeypatch.setenv("HOME", str(tmp_path))  # the gsp prompt cache lives under ~/.cache
    w = run_serving.WORKLOADS[name]
    data = tmp_path / "nested.jsonl"
    if w.kind == "nested":
        rows = nested_dataset.build_rows(prompt_words("llama2-7b-mha"), nested_dataset.NestedSpec(
            global_len=w.sys_len, num_groups=w.groups, fewshot_len=w.fewshot_len, per_group=w.per_group,
            question_len=run_serving.QUESTION_LEN))
        nested_dataset.write_jsonl(rows, data)
    cmd = run_serving.bench_cmd(w, port=1, model_dir=model_dirs["llama2-7b-mha"], out_file=tmp_path / "o.jsonl",
                                tag="t", dataset_path=data)
    args, rows = _bench_dataset(serving_module, monkeypatch, cmd, tokenizers["llama2-7b-mha"])
    assert len(rows) == w.num_requests
    assert {r.output_len for r in rows} == {run_serving.OUTPUT_LEN}
    assert sum(r.prompt_len for r in rows) == w.expected_input_tokens()
    if w.kind != "rnd":  # the dataset's count is the tokenizer's count of the text sent
        tok = tokenizers["llama2-7b-mha"]
        assert all(len(tok.encode(r.prompt)) == r.prompt_len for r in rows[:8])
    assert args.max_concurrency == w.conc


def test_rate_command_and_search():
    w = run_serving.WORKLOADS["rate8k"]
    cmd = run_serving.bench_cmd(w, port=1, model_dir="/m", out_file=Path("o"), tag="t", rate=16.0)
    assert cmd[cmd.index("--request-rate") + 1] == "16.0" and "--max-concurrency" not in cmd
    assert cmd[cmd.index("--num-prompts") + 1] == str(run_serving.rate_num_requests(16.0)) == "128"
    rates = [4.0, 8.0, 16.0, 32.0, 64.0]
    for threshold in (0.0, 4.0, 8.0, 16.0, 32.0, 64.0):  # pass iff rate <= threshold
        seen = {}
        while (r := run_serving.next_rate(rates, seen)) is not None:
            assert r not in seen
            seen[r] = r <= threshold
        good = [r for r, ok in seen.items() if ok]
        assert (max(good) if good else 0.0) == threshold
        assert len(seen) <= 4


def test_select_workloads_and_input_check():
    assert [w.name for w in run_serving.select_workloads("core,gsp8k_c128,nosh_c128")] == \
        run_serving.PRESETS["core"] + ["nosh_c128"]
    with pytest.raises(SystemExit):
        run_serving.select_workloads("gsp9k")
    assert run_serving.check_input_tokens(1000, 1019)[0] and not run_serving.check_input_tokens(1000, 1021)[0]
    assert run_serving.check_input_tokens(1000, None) == (False, None)


def test_dry_run_prints_every_command(capsys, tmp_path):
    rc = run_serving.main(["--dry-run", "--workloads", "all", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "relay_radix.launch_server --model-path relay-radix/llama2-7b-mha --attention-backend relay" in out
    assert "sglang.launch_server --model-path /tmp/relay_models/llama2-7b-mha --load-format dummy " \
           "--attention-backend flashinfer" in out
    rc = run_serving.main(["--dry-run", "--systems", "vanilla,triton,relay-eager,relay-fi", "--workloads",
                           "exact,gsp8k_c128", "--out", str(tmp_path / "out")])
    refs = capsys.readouterr().out
    assert rc == 0
    assert "--attention-backend relay --radix-cache-backend relay --relay-kernel flashinfer" in refs
    assert "--tag llama2-7b-mha/relay-fi/gsp8k_c128" in refs and "relay-fi-exact.jsonl" in refs
    assert "--attention-backend triton" in refs and "--tag llama2-7b-mha/triton/gsp8k_c128" in refs
    assert "--attention-backend relay --radix-cache-backend relay --disable-cuda-graph" in refs
    assert "relay-eager-exact.jsonl" in refs and "relay-eager-gsp8k" not in refs
    # A reference system alone (no twins in the call) still runs its row.
    assert run_serving.main(["--dry-run", "--systems", "triton", "--workloads", "gsp8k_c128",
                             "--out", str(tmp_path / "out")]) == 0
    assert "--tag llama2-7b-mha/triton/gsp8k_c128" in capsys.readouterr().out
    for system in ("relay", "vanilla"):
        for name in run_serving.PRESETS["all"]:
            assert f"--tag llama2-7b-mha/{system}/{name}" in out or f"/{system}-{name}" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_rate_search_takes_each_systems_rates(capsys, tmp_path):
    """``--rates-for SYSTEM=...`` gives a system its own rate list (others keep ``--rates``)."""
    rc = run_serving.main(["--dry-run", "--systems", "relay,vanilla", "--workloads", "rate8k", "--rates", "5",
                           "--rates-for", "relay=30,33", "--rates-for", "vanilla=9.5,10,10.5",
                           "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    tags = set(re.findall(r"--tag llama2-7b-mha/(\S+)", out))
    assert {"relay/rate8k@33", "vanilla/rate8k@10"} <= tags, tags
    assert not any(t.endswith("@5") for t in tags), tags
    with pytest.raises(SystemExit):
        run_serving.main(["--dry-run", "--rates-for", "nosuch=1", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        run_serving.main(["--dry-run", "--rates-for", "relay", "--out", str(tmp_path / "out")])


def test_first_start_on_a_fresh_machine_may_take_longer(monkeypatch, tmp_path):
    """A server start that must compile FlashInfer first (no module on the machine yet) waits up to
    FRESH_JIT_START_S instead of --server-timeout-s, never past the call's budget less 30 s; a
    start that finds modules (compiled in FlashInfer's workspace, or installed as AOT modules from
    .device/jit-cache.tar.xz) keeps the given timeout."""
    fresh = run_serving.FRESH_JIT_START_S
    assert run_serving.start_limit_s(300, 1000, fresh_jit=True) == fresh
    assert run_serving.start_limit_s(300, 1000, fresh_jit=False) == 300
    assert run_serving.start_limit_s(600, 1000, fresh_jit=True) == 600  # a larger given timeout stands
    assert run_serving.start_limit_s(300, 200, fresh_jit=True) == 170  # the budget caps it
    monkeypatch.setattr(run_serving, "FLASHINFER_WS", tmp_path / "fiws")
    monkeypatch.setattr(run_serving, "SITE", tmp_path / "site")
    assert not run_serving.flashinfer_modules_compiled()
    aot = tmp_path / "site" / "flashinfer" / "data" / "aot" / "batch_decode_x"
    aot.mkdir(parents=True)
    (aot / "batch_decode_x.so").write_bytes(b"")
    assert run_serving.flashinfer_modules_compiled()
    (aot / "batch_decode_x.so").unlink()
    ops = tmp_path / "fiws" / ".cache" / "flashinfer" / "0.6.14" / "90a" / "cached_ops" / "sampling"
    ops.mkdir(parents=True)
    (ops / "sampling.so").write_bytes(b"")
    assert run_serving.flashinfer_modules_compiled()


def test_repeat_runs_each_client_workload_again_with_its_own_seed(capsys, tmp_path):
    """``--repeat 3``: first runs of every workload, then the seeded workloads twice more with
    seeds 43 and 44 (fresh prompts: a repeat must not hit the previous run's radix entries);
    exactness runs once."""
    order = run_serving.repeat_order(run_serving.select_workloads("exact,ctrl_c128,nosh_c128"), 3)
    assert [(r, w.name) for r, w in order] == [
        (0, "exact"), (0, "ctrl_c128"), (0, "nosh_c128"), (1, "ctrl_c128"), (1, "nosh_c128"),
        (2, "ctrl_c128"), (2, "nosh_c128")]
    assert run_serving.repeat_order(run_serving.select_workloads("nested_c128"), 3) == [
        (0, run_serving.WORKLOADS["nested_c128"])]  # a fixed prompt file: once
    rc = run_serving.main(["--dry-run", "--systems", "vanilla,relay", "--workloads", "ctrl_c128,exact",
                           "--repeat", "3", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    for system in ("vanilla", "relay"):
        cmds = [l for l in out.splitlines() if f"--tag llama2-7b-mha/{system}/ctrl_c128" in l]
        assert [re.search(r"--seed (\d+)", c).group(1) for c in cmds] == ["42", "43", "44"]
        assert f"{system}-ctrl_c128-r2.jsonl" in out
        assert sum(f"{system}-exact.jsonl" in l for l in out.splitlines()) == 1


# --------------------------------------------------------------------------------- summarize
def _record(tag, tok_s, tpot, total_input):
    return {"tag": tag, "backend": "sglang", "output_throughput": tok_s, "request_throughput": tok_s / 256,
            "median_ttft_ms": 100.0, "median_tpot_ms": tpot, "p99_tpot_ms": tpot * 1.5,
            "total_input_tokens": total_input, "completed": 128, "server_info": {"x": 1}, "itls": [[1.0]]}


def test_summarize_synthetic_jsonl(tmp_path):
    m = "llama2-7b-mha"
    exact = run_serving.WORKLOADS["gsp8k_c128"].expected_input_tokens()
    recs = [_record(f"{m}/relay/gsp8k_c128", 6000.0, 15.0, exact),
            _record(f"{m}/vanilla/gsp8k_c128", 1500.0, 60.0, int(exact * 1.05)),  # 5% off: flagged
            _record(f"{m}/relay/ctrl_c128", 8000.0, 12.0, 128 * 128),
            _record(f"{m}/vanilla/ctrl_c128", 8400.0, 12.5, 128 * 128),
            _record("not-ours", 1.0, 1.0, 1)]
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert summarize.main([str(src), "--out-dir", str(tmp_path / "res"), "--device", "NVIDIA H100 80GB HBM3",
                           "--no-plots"]) == 0
    md = (tmp_path / "res" / "serving-h100-80gb-hbm3.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| gsp8k_c128"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["6000", "1500", "4.00x", "23.44 / 5.86"]  # tok/s, req/s
    assert cells[8] == "– / –"  # no p99 TTFT in these records
    assert cells[11] == "4.00x"  # TPOT speedup 60 / 15
    assert cells[14:16] == ["1.20", "4.80"]  # relay 15 / vanilla control 12.5; vanilla 60 / 12.5
    assert cells[16:18] == ["– / –", "–"]  # raw JSONL carries no server log profile
    assert "vanilla MISMATCH +5.0%" in cells[18]
    assert cells[19] == "raw"  # both twins from the one record (raw.jsonl)
    ctrl = next(l for l in md.splitlines() if l.startswith("| ctrl_c128"))
    assert ctrl.rstrip().endswith("| exact | raw |")
    doc = json.loads((tmp_path / "res" / "serving-h100-80gb-hbm3.json").read_text())
    assert doc["device"] == "NVIDIA H100 80GB HBM3"
    assert {(t["workload"], t["relay"]["output_throughput"]) for t in doc["table"]} == {
        ("ctrl_c128", 8000.0), ("gsp8k_c128", 6000.0)}


def test_summarize_results_json_with_rate_search_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    m = "llama3-8b-gqa"
    runs = []
    for system, tpots in (("relay", {8.0: 12.0, 16.0: 14.0}), ("vanilla", {8.0: 22.0, 16.0: 40.0})):
        for rate, p99 in tpots.items():
            runs.append({"system": system, "workload": "rate8k", "rate": rate,
                         "result": _record("x", 1000.0, p99 / 1.5, 1)})
        runs.append({"system": system, "workload": "gsp16k_c128", "rate": None,
                     "result": _record("x", 3000.0 if system == "relay" else 2000.0, 20.0, 1)})
    call = {"model": m, "device": "NVIDIA H200", "date": "2026-11-24", "versions": {"sglang": "0.5.16"}, "runs": runs,
            "rate_search": {"relay": {"slo_p99_tpot_ms": 25.0, "sustainable_rate": 16.0, "bounded_above": False,
                                      "tried": [{"rate": 16.0, "p99_tpot_ms": 14.0, "pass": True}]},
                            "vanilla": {"slo_p99_tpot_ms": 25.0, "sustainable_rate": 8.0, "bounded_above": True,
                                        "tried": [{"rate": 16.0, "p99_tpot_ms": 40.0, "pass": False},
                                                  {"rate": 8.0, "p99_tpot_ms": 22.0, "pass": True}]}},
            "errors": ["something broke"]}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(call))
    assert summarize.main([str(src), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "serving-h200.md").read_text()
    assert "| 2026-11-24 | relay | 25.0 | 16 -> 14.0 | 16 (highest tried) |" in md
    assert "| 2026-11-24 | vanilla | 25.0 | 8 -> 22.0, 16 -> 40.0 (fail) | 8 |" in md
    assert ("All points of these calls together (same SLO): 2.0x at the grid's points (16 vs 8 req/s); "
            "at least 1.0x (relay passes 16, vanilla fails 16); relay passed the highest rate tried") in md
    assert "ERROR: something broke" in md
    assert (tmp_path / f"serving-h200-{m}.png").stat().st_size > 0
    assert (tmp_path / f"serving-h200-{m}-rate.png").stat().st_size > 0


def test_summarize_full_batch_step_over_the_control_step(tmp_path):
    def run(system, workload, tput, step):
        return {"system": system, "workload": workload, "rate": None, "result": _record("x", tput, 10.0, 1),
                "server_profile": {"full_batch_step_ms": step}}

    call = {"model": "llama2-7b-mha", "device": "NVIDIA H100 80GB HBM3", "runs": [
        run("relay", "gsp8k_c128", 6000.0, 15.0), run("vanilla", "gsp8k_c128", 1800.0, 65.0),
        run("relay", "ctrl_c128", 7900.0, 12.0), run("vanilla", "ctrl_c128", 7800.0, 12.5)]}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(call))
    assert summarize.main([str(src), "--out-dir", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "serving-h100-80gb-hbm3.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| gsp8k_c128 |"))
    assert "| 15.0 / 65.0 | 1.20 |" in row  # 15 ms over vanilla's 12.5 ms control step


def test_summarize_pairs_repeated_runs_by_seed(tmp_path):
    """Repeats (``--repeat``) pair by seed: the row is the same-seed pair with the median ratio
    (each run's own TPOT, not a mix), and a repeat only one twin ran is left out of the pairing.
    The second workload's throughputs are session 16 call 3's nosh_c128 (GQA-4): there the
    medians of 2 and 3 runs would compare different prompts (0.89x); the same-seed pairs are 1.00x."""
    def run(system, workload, rep, tput, tpot):
        return {"system": system, "workload": workload, "rate": None, "repeat": rep,
                "result": _record("x", tput, tpot, 128 * 128)}

    call = {"model": "llama3-8b-gqa", "device": "NVIDIA H100 80GB HBM3", "runs": [
        run("vanilla", "ctrl_c128", 0, 8000.0, 10.0), run("vanilla", "ctrl_c128", 1, 8600.0, 9.5),
        run("vanilla", "ctrl_c128", 2, 8400.0, 9.7), run("relay", "ctrl_c128", 0, 7900.0, 10.1),
        run("relay", "ctrl_c128", 1, 8700.0, 9.4), run("relay", "ctrl_c128", 2, 8300.0, 9.8),
        run("vanilla", "nosh_c128", 0, 8472.0, 11.4), run("vanilla", "nosh_c128", 1, 7542.0, 11.4),
        run("vanilla", "nosh_c128", 2, 8530.0, 11.4), run("relay", "nosh_c128", 0, 8521.0, 11.4),
        run("relay", "nosh_c128", 1, 7576.0, 11.3)]}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(call))
    assert summarize.main([str(src), "--out-dir", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "serving-h100-80gb-hbm3.md").read_text()

    def cells(prefix):
        return [c.strip() for c in next(l for l in md.splitlines() if l.startswith(prefix)).strip("|").split("|")]

    # ctrl: same-seed ratios 0.9875, 1.0115, 0.9881 -> the median pair is seed 44 (repeat 2).
    assert cells("| ctrl_c128 |")[2:5] == ["8300", "8400", "0.99x"]
    assert cells("| ctrl_c128 |")[9:11] == ["9.8", "9.7"]  # that pair's own TPOT
    assert cells("| nosh_c128 |")[2:5] == ["7576", "7542", "1.00x"]  # seeds 42, 43 only
    assert cells("| ctrl_c128 | 7900, 8700, 8300 |")[2:5] == ["8000, 8600, 8400", "0.99x, 1.01x, 0.99x", "0.99x"]
    assert cells("| nosh_c128 | 8521, 7576 |")[2:5] == ["8472, 7542, 8530", "1.01x, 1.00x", "1.00x"]
    doc = json.loads((tmp_path / "serving-h100-80gb-hbm3.json").read_text())
    assert {t["workload"]: t["relay"]["output_throughput"] for t in doc["table"]} == {
        "ctrl_c128": 8300.0, "nosh_c128": 7576.0}


def test_summarize_keeps_twins_of_one_call_and_references_with_their_own_vanilla(tmp_path):
    """Call A runs relay + vanilla; call B (later) runs vanilla + a reference system only. The
    main row stays A's pair (no ratio across calls); the reference row uses B's vanilla."""
    def run(system, tput):
        return {"system": system, "workload": "gsp8k_c128", "rate": None, "result": _record("x", tput, 10.0, 1)}

    m = "llama2-7b-mha"
    a = {"model": m, "device": "NVIDIA H100 80GB HBM3", "runs": [run("relay", 6000.0), run("vanilla", 2000.0)]}
    b = {"model": m, "device": "NVIDIA H100 80GB HBM3", "runs": [run("vanilla", 1500.0), run("relay-fi", 4500.0)]}
    paths = []
    for name, call in (("a", a), ("b", b)):
        paths.append(tmp_path / f"serving-{name}.json")
        paths[-1].write_text(json.dumps(call))
    assert summarize.main([str(p) for p in paths] + ["--out-dir", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "serving-h100-80gb-hbm3.md").read_text()
    row = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| gsp8k_c128 | 8K")).strip("|").split("|")]
    assert row[2:5] == ["6000", "2000", "3.00x"] and row[-1] == "a"
    ref = [c.strip() for c in next(l for l in md.splitlines() if "--relay-kernel flashinfer" in l).strip("|").split("|")]
    assert ref[2] == "4500" and ref[5] == "1500" and ref[7:9] == ["0.33x", "–"]  # B's vanilla; B ran no relay


def test_rate_searches_of_two_calls_merge_into_one_bracket():
    point = lambda rate, ok: {"rate": rate, "p99_tpot_ms": 1.0, "pass": ok}  # noqa: E731
    call_a = {"relay": {"slo_p99_tpot_ms": 40.0, "tried": [point(16, True), point(32, False)]},
              "vanilla": {"slo_p99_tpot_ms": 40.0, "tried": [point(8, True), point(16, False)]}}
    call_b = {"relay": {"slo_p99_tpot_ms": 40.0, "tried": [point(20, True), point(24, True), point(32, False)]},
              "vanilla": {"slo_p99_tpot_ms": 40.0, "tried": [point(12, False), point(20, False)]}}
    merged = summarize.merge_rate_searches([call_a, call_b])
    assert merged["relay"]["sustainable_rate"] == 24 and merged["vanilla"]["sustainable_rate"] == 8
    assert summarize.rate_ratio_bound(merged) == (
        "3.0x at the grid's points (24 vs 8 req/s); at least 2.0x (relay passes 24, vanilla fails 12); "
        "at most 4.0x (relay fails 32, vanilla passes 8)")
    # A pass above a failure (noise) does not count: passing is taken as monotone in the rate.
    noisy = summarize.merge_rate_searches([{"relay": {"slo_p99_tpot_ms": 40.0, "tried": [
        point(8, True), point(16, False), point(24, True)]}}])
    assert noisy["relay"]["sustainable_rate"] == 8
    with pytest.raises(ValueError, match="different SLOs"):
        summarize.merge_rate_searches([call_a, {"relay": {"slo_p99_tpot_ms": 25.0, "tried": []}}])


def test_gpu_util_in_window(tmp_path):
    import datetime as dt

    t = 1_800_000_000.0
    rows = [(t + 0.1 * i, u) for i, u in enumerate([0, 50, 100, 100, 80, 0])]
    lines = [f"{dt.datetime.fromtimestamp(ts).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, {u}" for ts, u in rows]
    path = tmp_path / "u.csv"
    path.write_text("\n".join(lines + ["[N/A], x", ""]))
    got = run_serving.gpu_util_in_window(path, t - 1, t + 0.45)  # the last sample is outside
    assert got == {"samples": 5, "mean": 66.0, "mean_busy": 82.5, "share_below_90": 0.5}
    assert run_serving.gpu_util_in_window(path, t + 10, t + 20)["mean"] is None


# ------------------------------------------------------- driver end to end against a fake server
FAKE_SERVER = r'''
"""Stands in for an SGLang server: the HTTP endpoints the driver, benchmark and frontend use."""
import json, re, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

port, model_path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "die":
    sys.exit(3)
started = time.time()
count = lambda text: len(re.findall(r"\w+|[^\w\s]+", text))  # the Whitespace pre-tokenizer


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.reply({}, 200 if time.time() - started > 1 else 503)
        if self.path == "/v1/models":
            return self.reply({"data": [{"id": model_path}]})
        if self.path == "/get_model_info":
            return self.reply({"model_path": model_path})
        if self.path == "/server_info":
            return self.reply({"fake": True, "argv": sys.argv})
        self.reply({}, 404)

    def do_POST(self):
        received = time.time()
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(json.dumps({"n": len(req["text"]) if isinstance(req["text"], list) else 1,
                          "max_new_tokens": req["sampling_params"].get("max_new_tokens")}), flush=True)
        n = req["sampling_params"].get("max_new_tokens") or 0
        texts = req["text"] if isinstance(req["text"], list) else [req["text"]]
        outs = [{"text": " ".join(["the"] * n), "meta_info": {
            "prompt_tokens": count(t), "completion_tokens": n, "cached_tokens": 0, "e2e_latency": 0.01}}
            for t in texts]
        if not req.get("stream"):
            return self.reply(outs if isinstance(req["text"], list) else outs[0])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        first_sent = None
        for k in range(1, n + 1, max(1, n // 8)):
            chunk = {"text": " ".join(["the"] * k), "meta_info": {"completion_tokens": k}}
            first_sent = first_sent or time.time()
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.002)
        # SGLang's stage timestamps (meta_info with --enable-metrics), as ttft_probe.py reads them.
        outs[0]["meta_info"].update(request_received_ts=received, api_server_dispatch_finish_ts=received + 0.001,
                                    response_sent_to_client_ts=first_sent or time.time())
        self.wfile.write(f"data: {json.dumps(outs[0])}\n\ndata: [DONE]\n\n".encode())
        self.close_connection = True


ThreadingHTTPServer.request_queue_size = 1024  # 128 clients connect at once
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_driver(tmp_path, monkeypatch, model_dirs):
    """A run_serving.Driver whose servers are FAKE_SERVER and whose setup skips the device site."""
    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER)
    monkeypatch.setattr(run_serving, "WORK", tmp_path / "work")
    monkeypatch.setattr(run_serving, "MODEL_CACHE", Path(model_dirs["llama2-7b-mha"]).parent)
    monkeypatch.setenv("HOME", str(tmp_path))

    def setup(self):
        run_serving.WORK.mkdir()
        self.results.update(device="Fake GPU", versions={"sglang": "fake"})
        w = run_serving.WORKLOADS["nested_c128"]
        nested_dataset.write_jsonl(nested_dataset.build_rows(prompt_words(self.model), nested_dataset.NestedSpec(
            global_len=w.sys_len, num_groups=w.groups, fewshot_len=w.fewshot_len, per_group=w.per_group,
            question_len=run_serving.QUESTION_LEN)), run_serving.WORK / "nested.data")

    monkeypatch.setattr(run_serving.Driver, "setup", setup)

    def make(*argv, mode="ok"):
        monkeypatch.setattr(run_serving, "server_cmd", lambda system, model, model_dir, port, *_: [
            sys.executable, str(fake), str(port), model_dir, mode])
        a = run_serving.parse_args(["--port", str(_free_port()), "--out", str(tmp_path / "out"), *argv])
        return run_serving.Driver(a)

    return make


def test_driver_end_to_end_with_fake_server(fake_driver, tmp_path):
    d = fake_driver("--workloads", "nested_c128,frontend8k,rate8k", "--rates", "64", "--budget-s", "3000")
    assert d.main() == 0, d.results["errors"]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["errors"] == [] and res["skipped"] == []
    ran = {(r["system"], r["workload"]) for r in res["runs"]}
    assert ran == {(s, w) for s in ("relay", "vanilla") for w in ("nested_c128", "frontend8k", "rate8k")}
    for run in res["runs"]:
        assert run["rc"] == 0 and run["input_tokens_ok"], run
        assert run["result"]["completed"] == (run_serving.rate_num_requests(64) if run["rate"] else 128)
        if run["workload"] != "frontend8k":  # sglang.benchmark.serving --output-details: every request's TTFT
            assert len(run["result"]["ttfts_ms"]) == run["result"]["completed"]
            assert all(t > 0 for t in run["result"]["ttfts_ms"])
        if run["workload"] == "nested_c128":  # the decode timeline, from the per-token latencies
            t = run["timeline"]
            assert t["requests"] == 128 and t["median_tpot_ms"] > 0 and sum(t["tokens_per_bin"]) > 0
    kept = [json.loads(l) for l in (run_serving.WORK / "relay-nested_c128.jsonl").read_text().splitlines()]
    assert kept and "ttfts" in kept[-1] and "generated_texts" not in kept[-1] and "itls" not in kept[-1]
    assert res["rate_search"]["relay"]["sustainable_rate"] == 64.0
    assert set(res["warmup_s"]) == set(res["server_start_s"]) == {"relay", "vanilla"}
    assert res["server_info"]["relay"]["fake"] is True
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"server-relay.log", "server-vanilla.log", "relay-nested_c128.log", "vanilla-frontend8k.jsonl"} <= names
    server_log = (run_serving.WORK / "server-relay.log").read_text().splitlines()
    warm = [json.loads(l) for l in server_log[:3]]  # the warm-up batches
    assert warm == [{"n": 8, "max_new_tokens": 16}, {"n": 1, "max_new_tokens": 1}, {"n": 8, "max_new_tokens": 32}]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| nested_c128 |" in md and "| frontend8k |" in md
    assert "Median TPOT against the decode step" in md
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device sends back


def test_driver_runs_the_ttft_probe_and_summarize_shows_it(fake_driver, tmp_path):
    d = fake_driver("--workloads", "probe8k", "--systems", "relay,vanilla", "--budget-s", "3000",
                    "--server-args=--enable-metrics --enable-dynamic-batch-tokenizer")
    assert d.main() == 0, d.results["errors"]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["system"], r["workload"]) for r in res["runs"]] == [("relay", "probe8k"), ("vanilla", "probe8k")]
    for run in res["runs"]:
        stages, points = run["probe"]["stages"], run["probe"]["points"]
        assert stages["ttft"]["n"] == stages["receive"]["n"] == 128
        assert 0 <= stages["receive"]["median_ms"] <= stages["ttft"]["median_ms"] <= stages["ttft"]["p99_ms"]
        assert stages["tokenize_dispatch"]["median_ms"] == pytest.approx(1.0, abs=0.01)
        order = ["request_received_ts", "api_server_dispatch_finish_ts", "response_sent_to_client_ts",
                 "first_chunk", "done"]
        assert [points[k]["first_s"] for k in order] == sorted(points[k]["first_s"] for k in order)
        assert all(points[k]["n"] == 128 for k in order)
    assert summarize.main([str(tmp_path / "out" / "results.json"), "--out-dir", str(tmp_path / "sum"),
                           "--suffix", "dyntok", "--no-plots"]) == 0
    md = (tmp_path / "sum" / "serving-fake-gpu-dyntok.md").read_text()
    assert "both servers with `--enable-metrics --enable-dynamic-batch-tokenizer`" in md
    rows = [l for l in md.splitlines() if l.startswith("| probe8k |")]
    assert [r.split(" | ")[1] for r in rows] == ["relay", "vanilla"]


def test_driver_reference_systems_run_only_their_workloads(fake_driver, tmp_path):
    d = fake_driver("--systems", "vanilla,relay,triton,relay-eager", "--workloads", "ctrl_c128,gsp8k_c128",
                    "--budget-s", "3000")
    assert d.main() == 0, d.results["errors"]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ran = [(r["system"], r["workload"]) for r in res["runs"]]
    # twins first (vanilla, relay: both workloads), then triton's reference row only; relay-eager
    # runs only the exactness workload, which this call did not ask for: recorded as skipped.
    assert ran == [("vanilla", "ctrl_c128"), ("vanilla", "gsp8k_c128"), ("relay", "ctrl_c128"),
                   ("relay", "gsp8k_c128"), ("triton", "gsp8k_c128")]
    assert any(s.startswith("relay-eager: none of ['exact']") for s in res["skipped"])
    assert set(res["server_start_s"]) == {"vanilla", "relay", "triton"}
    md = (tmp_path / "out" / "summary.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| gsp8k_c128 | SGLang as shipped with its Triton"))
    assert row.count("|") == 10


def test_jit_cache_round_trip(fake_driver, tmp_path, monkeypatch):
    """--save-jit-cache packs FlashInfer's compiled modules (module .so only) and Triton's cache;
    a later call installs them as FlashInfer AOT modules of the site."""
    ws, site, triton_cache = tmp_path / "fiws", tmp_path / "site", tmp_path / "triton-cache"
    ops = ws / ".cache/flashinfer/0.6.14/90a/cached_ops"
    for name in ("batch_decode_a", "batch_prefill_b"):
        (ops / name).mkdir(parents=True)
        (ops / name / f"{name}.so").write_bytes(name.encode() * 100)
        (ops / name / "kernel.cuda.o").write_bytes(b"o" * 100)  # build objects stay behind
    (triton_cache / "abc").mkdir(parents=True)
    (triton_cache / "abc" / "k.cubin").write_bytes(b"cubin")
    for attr, val in (("FLASHINFER_WS", ws), ("SITE", site), ("TRITON_CACHE", triton_cache)):
        monkeypatch.setattr(run_serving, attr, val)
    d = fake_driver("--save-jit-cache")
    run_serving.WORK.mkdir()
    d.out.mkdir(parents=True)
    d.save_jit_cache()
    tar_path = d.out / "jit-cache.tar.xz"
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
    assert {"aot/batch_decode_a/batch_decode_a.so", "aot/batch_prefill_b/batch_prefill_b.so",
            "triton/abc/k.cubin"} <= names
    assert not any(n.endswith(".o") for n in names)
    assert set(d.results["jit_cache_saved"]["modules"]) == {"batch_decode_a.so", "batch_prefill_b.so"}
    import shutil

    shutil.rmtree(triton_cache)
    monkeypatch.setattr(run_serving, "JIT_CACHE_TAR", tar_path)
    d.install_jit_cache()
    so = site / "flashinfer/data/aot/batch_prefill_b/batch_prefill_b.so"
    assert so.read_bytes() == b"batch_prefill_b" * 100
    assert (triton_cache / "abc" / "k.cubin").read_bytes() == b"cubin"
    assert d.results["jit_cache_installed"] == ["batch_decode_a", "batch_prefill_b"]


def test_driver_detects_server_death(fake_driver, tmp_path):
    d = fake_driver("--workloads", "ctrl_c64", mode="die")
    assert d.main() == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any("died during start" in e for e in res["errors"])
    assert res["runs"] == [] and "vanilla" not in res["server_cmds"]  # relay failed: no vanilla twin


def test_stop_server_ends_the_whole_process_group(fake_driver, tmp_path):
    import os
    import subprocess

    d = fake_driver()
    run_serving.WORK.mkdir()
    pid_file = tmp_path / "grandchild.pid"
    d.server = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")], start_new_session=True)
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    d.stop_server("relay")
    assert d.server is None
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)


def test_server_log_profile_of_a_burst():
    """Arrival span, queue and full-batch decode step from SGLang's own log lines (format of
    0.5.16's scheduler: one Decode line per 40 steps; a step costs running / gen throughput)."""
    import server_log

    from relay_radix.metrics import format_host

    # relay's host figures as the decode log filter writes them: 40 steps, 0.2 / 0.4 ms per step
    host_a = format_host(0.002, 0.006, 40, 40)
    host_b = format_host(0.004, 0.012, 40, 30)
    lines = [
        "[2026-11-23 20:06:34] Prefill batch, #new-seq: 1, #new-token: 8320, #cached-token: 0, token usage: 0.02, "
        "#running-req: 0, #queue-req: 3, #pending-token: 0, cuda graph: False, input throughput (token/s): 1.0",
        "[2026-11-23 20:06:36] Prefill batch, #new-seq: 2, #new-token: 256, #cached-token: 16384, token usage: 0.09, "
        "#running-req: 126, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 8492.22",
        "[2026-11-23 20:06:37] Decode batch, #running-req: 64, #token: 1, token usage: 0.2, cuda graph: True, "
        "gen throughput (token/s): 3200.00, #queue-req: 0, relay: groups 1, members 64, shared 8192 tok, KV read 1/2 GB (-50%)",
        "[2026-11-23 20:06:38] Decode batch, #running-req: 128, #token: 1, token usage: 0.3, cuda graph: True, "
        "gen throughput (token/s): 8000.00, #queue-req: 0, relay: groups 1, members 128, shared 8192 tok, KV read 1/2 GB (-50%), "
        + host_a,
        "[2026-11-23 20:06:39] Decode batch, #running-req: 128, #token: 1, token usage: 0.3, cuda graph: True, "
        "gen throughput (token/s): 6400.00, #queue-req: 0, relay: groups 1, members 128, shared 8192 tok, KV read 1/2 GB (-50%), "
        + host_b,
        "[2026-11-23 20:06:40] Decode batch, #running-req: 120, #token: 1, token usage: 0.3, cuda graph: True, "
        "gen throughput (token/s): 10000.00, #queue-req: 0",
        "[2026-11-23 20:07:30] Decode batch, #running-req: 8, #token: 1, token usage: 0.3, cuda graph: True, "
        "gen throughput (token/s): 100.00, #queue-req: 0",  # next burst (after a quiet gap)
    ]
    text = "\n".join(lines)
    bursts = server_log.parse(text)
    assert len(bursts) == 2
    s = bursts[0].summary()
    assert (s["admitted"], s["arrival_span_s"], s["max_queue"], s["peak_running"]) == (3, 2.0, 3, 128)
    # Intervals with >= 0.9 * 128 running: 16 ms, 20 ms, 12 ms per step -> median 16, best 12.
    assert (s["full_batch_intervals"], s["full_batch_step_ms"], s["best_step_ms"]) == (3, 16.0, 12.0)
    assert s["relay_shared_tokens"] == [8192]
    assert (s["relay_host_ms"], s["relay_plan_reuse_pct"]) == (0.3, 88)  # medians of (0.2, 0.4) and (100, 75)
    w = server_log.profile_window(text, server_log._epoch("2026-11-23 20:06:38"), server_log._epoch("2026-11-23 20:06:39"))
    assert w["admitted"] == 0 and w["peak_running"] == 128  # +-1 s: lines of 20:06:37..40


def test_decode_timeline_splits_ramp_from_steady_decode():
    """Two requests decode at 10 ms per token; the second's prefill (its first token at 300 ms)
    stalls the first one's decode by 100 ms. The first request's TPOT carries the stall, the
    steady step (the median gap after the ramp) does not."""
    from decode_timeline import decode_timeline

    def itls(first_ms, n, stall_at_ms=None, stall_ms=0.0):
        now, out = first_ms, []
        for _ in range(n):
            gap = 10.0 + (stall_ms if stall_at_ms is not None and now < stall_at_ms <= now + 10.0 else 0.0)
            now += gap
            out.append(gap / 1e3)
        return out

    a = itls(100.0, 40, stall_at_ms=200.0, stall_ms=100.0)  # stalled once, at 200 ms
    b = itls(300.0, 40)
    r = decode_timeline([0.1, 0.3], [a, b], bin_ms=50.0)
    assert r["ramp_ms"] == [100.0, 300.0] and r["requests"] == 2
    assert r["steady_step_ms"] == pytest.approx(10.0)
    assert sorted([sum(a) * 1e3 / 40, sum(b) * 1e3 / 40]) == pytest.approx([10.0, 12.5])
    assert r["median_tpot_ms"] == pytest.approx(11.25)  # median of 12.5 and 10
    # a ran 10 ms steps then the 110 ms gap up to 220 ms, then 8 more steps to 300 ms: 10 tokens in the ramp.
    assert r["median_in_ramp_tokens"] == pytest.approx((10 + 0) / 2)
    assert sum(r["tokens_per_bin"]) == 80


def test_exactness_keys_round_trip():
    """summarize.py reads the workload and system back from the result key run_serving writes."""
    for w in (w for w in run_serving.WORKLOADS.values() if w.kind == "exact"):
        for system in run_serving.SYSTEMS:
            key = run_serving.exactness_key(w.name, system)
            assert run_serving.exactness_key_parts(key) == (w.name, system)
    assert run_serving.exactness_key("exact", "relay") == "exactness"  # the key of older files
