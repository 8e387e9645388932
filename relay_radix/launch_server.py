"""SGLang's server launcher with relay-radix on by default.

    python -m relay_radix.launch_server --model-path relay-radix/llama2-7b-mha [sglang args]

Takes the arguments of ``python -m sglang.launch_server`` and rewrites them (:func:`build_argv`):

- ``--attention-backend relay --radix-cache-backend relay`` are added unless an attention
  backend is given (``--attention-backend relay`` alone also gets ``--radix-cache-backend relay``);
- a relay launch captures decode CUDA graphs up to ``RELAY_DECODE_GRAPH_MAX_BS`` (512) rows
  unless a CUDA-graph batch-size flag is given (see :data:`RELAY_DECODE_GRAPH_MAX_BS`);
- a built-in model name (``relay-radix/llama2-7b-mha``, ``relay-radix/llama3-8b-gqa``) as
  ``--model-path``/``--tokenizer-path`` becomes its materialized folder, and then
  ``--load-format dummy`` is added unless a load format is given;
- the ``--relay-*`` flags below become environment variables (inherited by SGLang's scheduler
  processes) and are removed before SGLang parses the rest.

Then SGLang's plugins are loaded (relay-radix registers the ``relay`` backend through its
``sglang.srt.plugins`` entry point) and ``sglang.launch_server`` runs as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys

# flag -> (environment variable, allowed values or None)
RELAY_FLAGS = {
    "--relay-kernel": ("RELAY_RADIX_KERNEL", ("triton", "flashinfer")),
    "--relay-min-group-size": ("RELAY_RADIX_MIN_GROUP_SIZE", None),
    "--relay-min-prefix-tokens": ("RELAY_RADIX_MIN_PREFIX_TOKENS", None),
    "--relay-max-groups": ("RELAY_RADIX_MAX_GROUPS", None),
    "--relay-base-backend": ("RELAY_RADIX_BASE_BACKEND", None),
    "--relay-suffix": ("RELAY_RADIX_SUFFIX", ("flashinfer", "triton")),
    "--relay-plain-graphs": ("RELAY_RADIX_PLAIN_GRAPHS", ("0", "1")),
    "--relay-gate": ("RELAY_RADIX_GATE", ("0", "1")),
    "--relay-consecutive-alloc": ("RELAY_RADIX_CONSECUTIVE_ALLOC", None),
    "--relay-evict-for-runs": ("RELAY_RADIX_EVICT_FOR_RUNS", None),
    "--relay-prefix-pool": ("RELAY_RADIX_PREFIX_POOL", ("auto", "fa3", "off")),
    "--relay-prefix-pool-min-rows": ("RELAY_RADIX_PREFIX_POOL_MIN_ROWS", None),
    "--relay-extend-pool": ("RELAY_RADIX_EXTEND_POOL", ("auto", "fa3", "off")),
}
_INT_FLAGS = ("--relay-min-group-size", "--relay-min-prefix-tokens", "--relay-max-groups", "--relay-consecutive-alloc",
              "--relay-evict-for-runs", "--relay-prefix-pool-min-rows")
_MODEL_FLAGS = ("--model-path", "--model", "--tokenizer-path")

# Largest decode batch a relay launch captures in a CUDA graph (SGLang's default on an 80 GB GPU
# at TP < 4 is 256). Relay makes a decode step over many requests of one long prompt cheap, so
# the server runs such batches: at 30 req/s of an 8K-prompt workload (H100, MHA) the batch
# reached 264 rows, and those steps ran eagerly at about 45 ms against about 20 ms for a
# replayed 240-row graph (bench/results/raw/serving-h100-s12-call7-rate-relay-logs.tar.gz).
# Cost: the graphs of the extra sizes (both the relay and the plain graph per size).
RELAY_DECODE_GRAPH_MAX_BS = 512
_GRAPH_BS_FLAGS = ("--cuda-graph-max-bs", "--cuda-graph-max-bs-decode", "--cuda-graph-bs", "--cuda-graph-bs-decode",
                   "--cuda-graph-config", "--disable-cuda-graph")

HELP = """relay-radix launcher: python -m relay_radix.launch_server [sglang.launch_server args]

Relay defaults (added unless you pass --attention-backend):
  --attention-backend relay --radix-cache-backend relay
  --cuda-graph-max-bs-decode 512      (unless a --cuda-graph-* batch-size flag, --cuda-graph-config
                                       or --disable-cuda-graph is given: relay serves large decode
                                       batches of one prompt cheaply, so more sizes are captured)
Built-in dummy-weight models (folder materialized on first use; adds --load-format dummy):
  --model-path relay-radix/llama2-7b-mha | relay-radix/llama3-8b-gqa
Relay flags (removed before SGLang parses the rest; passed on as environment variables):
  --relay-kernel {triton,flashinfer}   RELAY_RADIX_KERNEL (default triton)
  --relay-min-group-size N             RELAY_RADIX_MIN_GROUP_SIZE (default 4)
  --relay-min-prefix-tokens N          RELAY_RADIX_MIN_PREFIX_TOKENS (default 256)
  --relay-max-groups N                 RELAY_RADIX_MAX_GROUPS: most groups at once (default 64)
  --relay-base-backend NAME            RELAY_RADIX_BASE_BACKEND: prefill/extend backend
                                       (default flashinfer on CUDA)
  --relay-suffix {flashinfer,triton}   RELAY_RADIX_SUFFIX: kernel for each request's own
                                       suffix (default flashinfer: SGLang's decode wrappers)
  --relay-plain-graphs {0,1}           RELAY_RADIX_PLAIN_GRAPHS: a plain decode graph per batch
                                       size for steps with no group (default 1)
  --relay-gate {0,1}                   RELAY_RADIX_GATE: relay only steps where it saves time
                                       (relay_radix/gate.py; default 1)
  --relay-consecutive-alloc N          RELAY_RADIX_CONSECUTIVE_ALLOC: allocations of >= N KV slots
                                       take the free window with the fewest breaks (default 1024;
                                       0 off)
  --relay-evict-for-runs N             RELAY_RADIX_EVICT_FOR_RUNS: such an allocation into a
                                       nearly full pool may evict up to N times its size more of
                                       the cache (LRU) to find a run (default 4; 0 off)
  --relay-prefix-pool {auto,fa3,off}   RELAY_RADIX_PREFIX_POOL: groups in one run of KV slots on
                                       FlashInfer's FA3 prefill over the pool (default auto: GQA
                                       models on Hopper)
  --relay-prefix-pool-min-rows N       RELAY_RADIX_PREFIX_POOL_MIN_ROWS: fewest members x GQA
                                       heads of a group it takes (default 512)
  --relay-extend-pool {auto,fa3,off}   RELAY_RADIX_EXTEND_POOL: prefill batches over cached prompts
                                       in runs of KV slots attend them on FlashInfer's FA3 over
                                       the pool, requests stacked (default auto: Hopper)

Front end: with bursts of long text prompts, add SGLang's --enable-dynamic-batch-tokenizer
(the launcher reminds you at start when neither it nor --tokenizer-worker-num > 1 is given).

SGLang's own arguments follow.
"""


def _split(arg: str) -> tuple[str, str | None]:
    """``--flag=value`` -> (``--flag``, ``value``); ``--flag`` -> (``--flag``, None)."""
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
        return flag, value
    return arg, None


def _value_of(argv: list[str], flags: tuple[str, ...]) -> tuple[int, str | None]:
    """(index, value) of the last occurrence of any of ``flags`` in argv; (-1, None) if absent."""
    found = (-1, None)
    for i, arg in enumerate(argv):
        flag, value = _split(arg)
        if flag in flags:
            if value is None:
                value = argv[i + 1] if i + 1 < len(argv) else None
            found = (i, value)
    return found


def build_argv(argv: list[str], resolve=None) -> tuple[list[str], dict[str, str]]:
    """Rewrite launcher arguments into SGLang arguments plus relay environment variables.

    ``resolve(name) -> path | None`` maps built-in model names to folders (default:
    :func:`relay_radix.models.resolve_model_path`). Returns ``(sglang_argv, env)``; ``argv`` is
    not modified. Raises ``ValueError`` on a malformed relay flag.
    """
    if resolve is None:
        from relay_radix.models import resolve_model_path as resolve

    env: dict[str, str] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, value = _split(argv[i])
        if flag not in RELAY_FLAGS:
            out.append(argv[i])
            i += 1
            continue
        if value is None:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        var, choices = RELAY_FLAGS[flag]
        if choices is not None and value not in choices:
            raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if flag in _INT_FLAGS:
            try:
                int(value)
            except ValueError:
                raise ValueError(f"{flag} {value!r} is not an integer") from None
        env[var] = value

    # Built-in model names -> materialized folders (in place, keeping the flag's spelling).
    resolved_model = False
    for j, arg in enumerate(list(out)):
        flag, value = _split(arg)
        if flag not in _MODEL_FLAGS:
            continue
        if value is not None:
            path = resolve(value)
            if path is not None:
                out[j] = f"{flag}={path}"
                resolved_model |= flag != "--tokenizer-path"
        elif j + 1 < len(out):
            path = resolve(out[j + 1])
            if path is not None:
                out[j + 1] = path
                resolved_model |= flag != "--tokenizer-path"
    if resolved_model and _value_of(out, ("--load-format",))[0] < 0:
        out += ["--load-format", "dummy"]

    idx, backend = _value_of(out, ("--attention-backend",))
    if idx < 0:
        out += ["--attention-backend", "relay"]
        backend = "relay"
    if backend == "relay" and _value_of(out, ("--radix-cache-backend",))[0] < 0:
        out += ["--radix-cache-backend", "relay"]
    if backend == "relay" and _value_of(out, _GRAPH_BS_FLAGS)[0] < 0:
        out += ["--cuda-graph-max-bs-decode", str(RELAY_DECODE_GRAPH_MAX_BS)]
    return out, env


def front_end_hint(argv: list[str]) -> str | None:
    """A launch-time hint when SGLang's front end would tokenize long prompts one at a time.

    SGLang's tokenizer manager tokenizes each text request on its event loop, one after another,
    and sends no first token until a burst is taken in: 128 prompts of 16K tokens took it 3.8-5.7 s
    on the H100 host, which then bounds relay's gain (README, "Where the time to first token goes").
    ``--enable-dynamic-batch-tokenizer`` (batched, on a thread) or ``--tokenizer-worker-num`` > 1
    (several processes) remove that queue. Returns None when one of them is set.
    """
    if _value_of(argv, ("--enable-dynamic-batch-tokenizer", "--skip-tokenizer-init"))[0] >= 0:
        return None
    workers = _value_of(argv, ("--tokenizer-worker-num",))[1]
    if workers is not None and workers.isdigit() and int(workers) > 1:
        return None
    return ("relay_radix.launch_server: SGLang's tokenizer manager will tokenize text prompts one at a "
            "time; with bursts of long prompts that, not decode, sets the time to first token (128 x 16K-token "
            "prompts: 3.8-5.7 s before the first token on an H100 host, 0.9-1.3 s with the flag). "
            "Add --enable-dynamic-batch-tokenizer for such workloads.")


def _check_relay_registered(argv: list[str]) -> None:
    """Fail early, with the cause, if ``relay`` was asked for but the plugin did not load."""
    if _value_of(argv, ("--attention-backend",))[1] != "relay":
        return
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    if "relay" not in ATTENTION_BACKEND_CHOICES:
        sys.exit(
            "relay_radix.launch_server: attention backend 'relay' is not registered. Is relay-radix "
            "installed with its entry point (pip install . / pip install -e .), and does "
            "SGLANG_PLUGINS (if set) include 'relay'? See the plugin-loading log above."
        )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = "-h" in argv or "--help" in argv
    if wants_help:
        print(HELP)
    try:
        sglang_argv, env = build_argv(argv)
    except ValueError as e:
        sys.exit(f"relay_radix.launch_server: {e}")
    os.environ.update(env)  # before any scheduler process is spawned
    for var, value in sorted(env.items()):
        print(f"relay_radix.launch_server: {var}={value}", file=sys.stderr)
    hint = front_end_hint(sglang_argv)
    if hint and not wants_help:
        print(hint, file=sys.stderr)

    from sglang.srt.plugins import load_plugins

    load_plugins()  # idempotent; sglang.launch_server calls it again
    if not wants_help:
        _check_relay_registered(sglang_argv)
    sys.argv = [sys.argv[0]] + sglang_argv
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
