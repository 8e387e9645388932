"""The plugin through SGLang's own loader: entry point, choices, registries, launch checks."""

from __future__ import annotations

import types

import pytest
import torch


@pytest.fixture(scope="module")
def plugins_loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()  # discovers relay through the installed entry point, as every SGLang process does
    return True


def test_entry_point_registers_relay(plugins_loaded):
    from importlib.metadata import entry_points

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.registry import get_radix_cache_factory
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("relay") == "relay_radix.plugin:register"
    assert "relay" in ATTENTION_BACKEND_CHOICES
    assert "relay" in ATTENTION_BACKENDS
    assert get_radix_cache_factory("relay") is not None


def test_command_line_accepts_relay_and_sets_its_tree(plugins_loaded):
    from sglang.srt.server_args import prepare_server_args

    from relay_radix.cpu_sim import tiny_model_dir

    args = prepare_server_args(["--model-path", tiny_model_dir(), "--device", "cpu",
                                "--attention-backend", "relay", "--skip-tokenizer-init"])
    assert args.attention_backend == "relay"
    assert args.radix_cache_backend == "relay"


@pytest.mark.parametrize("extra,needle", [
    (dict(page_size=16), "--page-size 16"),
    (dict(disable_radix_cache=True), "--disable-radix-cache"),
    (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
    (dict(kv_cache_dtype="fp8_e4m3"), "quantized KV"),
    (dict(speculative_algorithm="EAGLE"), "speculative decoding"),
    (dict(enable_dp_attention=True), "--enable-dp-attention"),
    (dict(enable_two_batch_overlap=True), "--enable-two-batch-overlap"),
])
def test_unsupported_settings_are_refused_with_advice(extra, needle):
    from relay_radix.support import RelayUnsupported, check_server_args

    args = types.SimpleNamespace(**{"attention_backend": "relay", "page_size": 1, **extra})
    with pytest.raises(RelayUnsupported, match="not supported") as e:
        check_server_args(args)
    assert needle in str(e.value)


def test_bad_relay_settings_fail_at_the_server_args_check(monkeypatch):
    """RELAY_RADIX_* are read in the launcher's ServerArgs check, not first in a spawned scheduler."""
    from relay_radix.support import check_server_args

    args = types.SimpleNamespace(attention_backend="relay", page_size=1)
    check_server_args(args)
    monkeypatch.setenv("RELAY_RADIX_MAX_GROUPS", "0")
    with pytest.raises(ValueError, match="RELAY_RADIX_MAX_GROUPS"):
        check_server_args(args)
    monkeypatch.setenv("RELAY_RADIX_MAX_GROUPS", "many")
    with pytest.raises(ValueError, match="not an integer"):
        check_server_args(args)


def test_model_checks_refuse_mla_sliding_window_and_fp8():
    from relay_radix.support import RelayUnsupported, check_model_runner

    def runner(**kw):
        mc = types.SimpleNamespace(is_encoder_decoder=False, hf_text_config=types.SimpleNamespace(),
                                   is_hybrid_swa=False, sliding_window_size=None, attention_chunk_size=None)
        base = dict(use_mla_backend=False, is_draft_worker=False, page_size=1, model_config=mc,
                    token_to_kv_pool=types.SimpleNamespace(dtype=torch.bfloat16))
        base.update(kw)
        return types.SimpleNamespace(**base)

    check_model_runner(runner())  # a plain dense model passes
    with pytest.raises(RelayUnsupported, match="MLA"):
        check_model_runner(runner(use_mla_backend=True))
    mixed = runner()
    mixed.model_config.dtype = torch.float16  # bf16 KV under an fp16 model (--kv-cache-dtype bf16)
    with pytest.raises(RelayUnsupported, match="with model dtype"):
        check_model_runner(mixed)
    with pytest.raises(RelayUnsupported, match="KV cache dtype"):
        check_model_runner(runner(token_to_kv_pool=types.SimpleNamespace(dtype=torch.float8_e4m3fn)))
    swa = runner()
    swa.model_config.hf_text_config = types.SimpleNamespace(sliding_window=4096)
    with pytest.raises(RelayUnsupported, match="sliding-window"):
        check_model_runner(swa)
    qwen_like = runner()  # a window that is configured but not used is fine
    qwen_like.model_config.hf_text_config = types.SimpleNamespace(sliding_window=4096, use_sliding_window=False)
    check_model_runner(qwen_like)


def test_radix_cache_factory_refuses_tree_variants():
    from relay_radix.radix_cache import relay_radix_cache_factory

    ctx = types.SimpleNamespace(disable_radix_cache=False, enable_hierarchical_cache=True,
                                is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False, params=None)
    with pytest.raises(ValueError, match="hierarchical"):
        relay_radix_cache_factory(ctx)


def test_config_from_env_validates(monkeypatch):
    from relay_radix.config import RelayConfig

    monkeypatch.setenv("RELAY_RADIX_MIN_GROUP_SIZE", "8")
    monkeypatch.setenv("RELAY_RADIX_KERNEL", "flashinfer")
    cfg = RelayConfig.from_env()
    assert (cfg.min_group_size, cfg.demote_group_size, cfg.kernel) == (8, 4, "flashinfer")
    assert cfg.plan_reuse is True and cfg.prefix_stream is True and cfg.max_groups == 64  # the defaults
    assert (cfg.plain_graphs, cfg.consecutive_alloc) == (True, 1024)
    monkeypatch.setenv("RELAY_RADIX_PLAIN_GRAPHS", "0")
    monkeypatch.setenv("RELAY_RADIX_CONSECUTIVE_ALLOC", "0")
    assert (RelayConfig.from_env().plain_graphs, RelayConfig.from_env().consecutive_alloc) == (False, 0)
    monkeypatch.setenv("RELAY_RADIX_CONSECUTIVE_ALLOC", "-1")
    with pytest.raises(ValueError, match="RELAY_RADIX_CONSECUTIVE_ALLOC"):
        RelayConfig.from_env()
    monkeypatch.delenv("RELAY_RADIX_CONSECUTIVE_ALLOC")
    assert RelayConfig.from_env().evict_for_runs == 4
    monkeypatch.setenv("RELAY_RADIX_EVICT_FOR_RUNS", "0")
    assert RelayConfig.from_env().evict_for_runs == 0
    monkeypatch.setenv("RELAY_RADIX_EVICT_FOR_RUNS", "-2")
    with pytest.raises(ValueError, match="RELAY_RADIX_EVICT_FOR_RUNS"):
        RelayConfig.from_env()
    monkeypatch.delenv("RELAY_RADIX_EVICT_FOR_RUNS")
    monkeypatch.setenv("RELAY_RADIX_PLAN_REUSE", "0")
    monkeypatch.setenv("RELAY_RADIX_PREFIX_STREAM", "0")
    assert (RelayConfig.from_env().plan_reuse, RelayConfig.from_env().prefix_stream) == (False, False)
    assert RelayConfig.from_env().prefix_launch() == dict(prefix_block_m=64, block_n=64, num_warps_prefix=4,
                                                          num_stages_prefix=3, prefix_slot_runs=None)
    monkeypatch.setenv("RELAY_RADIX_PREFIX_TILE", "128x128x8x2")
    monkeypatch.setenv("RELAY_RADIX_SLOT_RUNS", "0")
    assert RelayConfig.from_env().prefix_launch() == dict(prefix_block_m=128, block_n=128, num_warps_prefix=8,
                                                          num_stages_prefix=2, prefix_slot_runs=False)
    for bad in ("128x128", "96x64x4x3", "64x64x6x3", "64x64x4x9", "big"):
        monkeypatch.setenv("RELAY_RADIX_PREFIX_TILE", bad)
        with pytest.raises(ValueError, match="RELAY_RADIX_PREFIX_TILE"):
            RelayConfig.from_env()
    monkeypatch.delenv("RELAY_RADIX_PREFIX_TILE")
    monkeypatch.setenv("RELAY_RADIX_PREFIX_PROGRAMS", "2/1")
    assert RelayConfig.from_env().prefix_launch()["programs_per_sm"] == 2
    assert RelayConfig.from_env().prefix_launch()["concurrent_programs_per_sm"] == 1
    monkeypatch.setenv("RELAY_RADIX_PREFIX_PROGRAMS", "2")
    assert RelayConfig.from_env().prefix_launch()["concurrent_programs_per_sm"] is None
    for bad in ("0", "1/2", "two", "2/"):
        monkeypatch.setenv("RELAY_RADIX_PREFIX_PROGRAMS", bad)
        with pytest.raises(ValueError, match="RELAY_RADIX_PREFIX_PROGRAMS"):
            RelayConfig.from_env()
    monkeypatch.delenv("RELAY_RADIX_PREFIX_PROGRAMS")
    assert RelayConfig.from_env().prefix_pool == "auto" and RelayConfig.from_env().prefix_pool_min_rows == 512
    monkeypatch.setenv("RELAY_RADIX_PREFIX_POOL", "FA3")
    monkeypatch.setenv("RELAY_RADIX_PREFIX_POOL_MIN_ROWS", "1")
    assert (RelayConfig.from_env().prefix_pool, RelayConfig.from_env().prefix_pool_min_rows) == ("fa3", 1)
    for var, bad in (("RELAY_RADIX_PREFIX_POOL", "flashinfer"), ("RELAY_RADIX_PREFIX_POOL_MIN_ROWS", "0")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=var):
            RelayConfig.from_env()
        monkeypatch.delenv(var)
    monkeypatch.setenv("RELAY_RADIX_KERNEL", "cuda")
    with pytest.raises(ValueError, match="RELAY_RADIX_KERNEL"):
        RelayConfig.from_env()
    monkeypatch.setenv("RELAY_RADIX_KERNEL", "triton")
    monkeypatch.setenv("RELAY_RADIX_MIN_GROUP_SIZE", "1")
    with pytest.raises(ValueError, match="at least 2"):
        RelayConfig.from_env()


def test_suffix_kernel_choice(monkeypatch):
    """Suffixes default to FlashInfer decode when the base backend is FlashInfer (vanilla's
    kernel), to the Triton launch otherwise; a bad value is refused with the choices."""
    from relay_radix.config import RelayConfig

    for var in ("RELAY_RADIX_SUFFIX", "RELAY_RADIX_BASE_BACKEND", "RELAY_RADIX_KERNEL", "RELAY_RADIX_MIN_GROUP_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert RelayConfig.from_env().suffix_kernel() == "flashinfer"
    monkeypatch.setenv("RELAY_RADIX_BASE_BACKEND", "triton")
    assert RelayConfig.from_env().suffix_kernel() == "triton"
    monkeypatch.setenv("RELAY_RADIX_SUFFIX", "flashinfer")
    assert RelayConfig.from_env().suffix_kernel() == "flashinfer"
    monkeypatch.setenv("RELAY_RADIX_SUFFIX", "cuda")
    with pytest.raises(ValueError, match="RELAY_RADIX_SUFFIX='cuda': choose one of flashinfer, triton"):
        RelayConfig.from_env()


def test_flashinfer_suffix_needs_the_flashinfer_base():
    """The FlashInfer suffix path drives the wrapped backend's own decode wrappers: with another
    base backend (here SGLang's real torch_native class) it refuses and says what to set."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from relay_radix.suffix_decode import FlashInferSuffixDecode

    base = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    with pytest.raises(ValueError, match="RELAY_RADIX_SUFFIX=triton"):
        FlashInferSuffixDecode(base)


def test_flashinfer_kernel_needs_flashinfer_suffixes(monkeypatch):
    """The FlashInfer relay kernel merges onto FlashInfer's suffix decode state: asking for it
    with Triton suffixes is refused at backend creation, with what to set instead."""
    from relay_radix.plugin import create_relay_backend

    monkeypatch.setenv("RELAY_RADIX_KERNEL", "flashinfer")
    monkeypatch.setenv("RELAY_RADIX_SUFFIX", "triton")
    mc = types.SimpleNamespace(is_encoder_decoder=False, hf_text_config=types.SimpleNamespace(),
                               is_hybrid_swa=False, sliding_window_size=None, attention_chunk_size=None)
    runner = types.SimpleNamespace(device="cuda", use_mla_backend=False, is_draft_worker=False, page_size=1,
                                   model_config=mc, token_to_kv_pool=types.SimpleNamespace(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="RELAY_RADIX_KERNEL=flashinfer runs suffixes on FlashInfer"):
        create_relay_backend(runner)