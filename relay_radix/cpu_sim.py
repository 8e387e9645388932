"""Drive SGLang's real scheduling objects on the CPU, the way its scheduler does (tests and demo).

No server runs on a CPU machine (no CPU build of sglang-kernel on PyPI), so tests go to the
deepest level that does: real ``Req``/``ScheduleBatch`` objects, real ``ReqToTokenPool``,
``MHATokenToKVPool`` and allocator, and a real radix tree (``RelayRadixCache`` is SGLang's
``RadixCache`` subclassed). ``MiniScheduler`` calls the same methods, in the same order, as
``Scheduler``/``PrefillAdder``/``BatchResultProcessor`` for admission, prefill, decode,
finish, abort and retraction; model math is replaced by writing random K/V for every
allocated slot (what a forward pass would store).
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array

import torch


def tiny_model_dir(num_q_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 2) -> str:
    """A local Llama config folder (no weights) that SGLang's ModelConfig can read offline."""
    d = tempfile.mkdtemp(prefix="relay-tiny-")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": num_q_heads * head_dim, "intermediate_size": 64,
        "num_attention_heads": num_q_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim, "num_hidden_layers": num_layers, "vocab_size": 1000,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def server_args(model_dir: str, dtype: torch.dtype = torch.float32):
    """Global ServerArgs for a CPU process (SGLang reads them through get_server_args()).
    ``dtype``: the model dtype, which a real server also gives its KV pool (``--kv-cache-dtype auto``)."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    sa = ServerArgs(
        model_path=model_dir, device="cpu", attention_backend="torch_native",
        sampling_backend="pytorch", skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
    )
    set_global_server_args_for_scheduler(sa)
    return sa


class MiniScheduler:
    """Real SGLang pools + tree + batches, stepped by hand.

    ``overlap=True`` reproduces the overlap scheduler's ordering: a prefilled request's
    ``cache_unfinished_req`` (tree insert, KV dedup, ``last_node`` move) runs only after its
    first decode step was planned and launched.
    """

    def __init__(self, *, num_q_heads=4, num_kv_heads=2, head_dim=16, num_layers=2,
                 kv_size=8192, max_reqs=64, max_context=4096, dtype=torch.float32,
                 overlap=False, relay_config=None, seed=0):
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        from relay_radix.radix_cache import RelayRadixCache

        self.model_dir = tiny_model_dir(num_q_heads, num_kv_heads, head_dim, num_layers)
        self.server_args = server_args(self.model_dir, dtype)
        self.model_config = ModelConfig.from_server_args(self.server_args)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.num_layers, self.dtype = num_layers, dtype
        self.req_to_token_pool = ReqToTokenPool(
            size=max_reqs, max_context_len=max_context, device="cpu", enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(
            size=kv_size, page_size=1, dtype=dtype, head_num=num_kv_heads, head_dim=head_dim,
            layer_num=num_layers, device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(
            size=kv_size, dtype=dtype, device="cpu", kvcache=self.kv_pool, need_sort=False)
        self.tree = RelayRadixCache(
            CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                            token_to_kv_pool_allocator=self.allocator, page_size=1),
            config=relay_config)
        self.overlap = overlap
        self.running_batch = None  # the decode ScheduleBatch
        self._pending_cache: list = []  # overlap: prefilled, cache_unfinished_req not yet run
        self._gen = torch.Generator().manual_seed(seed)
        self._next_rid = 0

    # ---- requests ----------------------------------------------------------------------
    def new_req(self, token_ids, max_new_tokens: int = 64):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
        sp.normalize(None)
        rid = f"r{self._next_rid}"
        self._next_rid += 1
        return Req(rid, "", array("q", token_ids), sp, vocab_size=1000)

    def _fill_kv(self, locs: torch.Tensor) -> None:
        """Write random K/V at freshly allocated slots in every layer (the forward's store)."""
        n = locs.numel()
        if n == 0:
            return
        for layer in range(self.num_layers):
            k = torch.randn(n, self.num_kv_heads, self.head_dim, generator=self._gen).to(self.dtype)
            v = torch.randn(n, self.num_kv_heads, self.head_dim, generator=self._gen).to(self.dtype)
            self.kv_pool.k_buffer[layer][locs] = k
            self.kv_pool.v_buffer[layer][locs] = v

    @property
    def running(self) -> list:
        """Decoding requests in batch order."""
        return list(self.running_batch.reqs) if self.running_batch is not None else []

    def prefill(self, reqs, on_batch=None) -> None:
        """Admit ``reqs`` (PrefillAdder), run their prefill batch, merge it into the running
        batch, and cache them in the tree (now, or after the next decode in overlap mode).
        ``on_batch(batch)``: called where the scheduler launches the prefill batch (after
        ``prepare_for_extend`` and the forward's K/V store, before result processing)."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        for r in reqs:
            r.init_next_round_input(self.tree)  # match_prefix, may split nodes
            self.tree.inc_lock_ref(r.last_node)  # PrefillAdder._req_inc_lock_ref
            r.set_extend_range(len(r.prefix_indices), len(r.full_untruncated_fill_ids))
        batch = ScheduleBatch.init_new(
            reqs, self.req_to_token_pool, self.allocator, self.tree, self.model_config,
            self.overlap, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        self._fill_kv(batch.out_cache_loc)
        if on_batch is not None:
            on_batch(batch)
        for r in reqs:
            # The prefill samples the first output token; its KV is written by the next decode.
            r.output_ids.append(int(torch.randint(3, 999, (1,), generator=self._gen)))
        if self.overlap:
            self._pending_cache.extend(reqs)
        else:
            for r in reqs:
                self.tree.cache_unfinished_req(r)
        # Scheduler.get_next_batch_to_run: the finished prefill joins the running batch.
        if self.running_batch is None or self.running_batch.is_empty():
            self.running_batch = batch
        else:
            self.running_batch.merge_batch(batch)

    def decode_batch(self):
        """Scheduler.update_running_batch: prepare the running batch for one decode step."""
        batch = self.running_batch
        batch.prepare_for_decode()
        self._fill_kv(batch.out_cache_loc)
        return batch

    def after_decode(self, batch) -> None:
        """Result processing of a decode step: tokens appended; overlap's deferred caching."""
        for r in batch.reqs:
            r.output_ids.append(int(torch.randint(3, 999, (1,), generator=self._gen)))
        for r in self._pending_cache:
            self.tree.cache_unfinished_req(r)
        self._pending_cache.clear()

    def _drop(self, req) -> None:
        keep = [i for i, r in enumerate(self.running_batch.reqs) if r is not req]
        self.running_batch.filter_batch(keep_indices=keep)
        if req in self._pending_cache:
            self._pending_cache.remove(req)

    def finish(self, req) -> None:
        """A request finished (or was aborted): SGLang's release_kv_cache path."""
        from sglang.srt.mem_cache.common import release_kv_cache

        self._drop(req)
        release_kv_cache(req, self.tree)

    def retract(self, req) -> None:
        """Memory-pressure retraction: ScheduleBatch.release_req's steps."""
        from sglang.srt.mem_cache.common import release_kv_cache

        self._drop(req)
        release_kv_cache(req, self.tree, is_insert=False)
        req.reset_for_retract()

    def evict_all_unlocked(self) -> None:
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        self.tree.evict(EvictParams(num_tokens=self.allocator.size))


_DIST_READY = False


def init_cpu_distributed() -> None:
    """A 1-rank gloo process group: ForwardBatch.init_new asks SGLang's parallel state."""
    global _DIST_READY
    if _DIST_READY:
        return
    import socket

    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(tensor_model_parallel_size=1)
    _DIST_READY = True


def cpu_model_runner(sched: MiniScheduler, attn_backend=None):
    """The ModelRunner fields that attention backends and ForwardBatch.init_new read.

    A real ModelRunner cannot be built on a CPU machine from PyPI packages (it loads
    sglang-kernel's CUDA library: "Could not load any common_ops library", libcuda.so.1
    missing), so this carries SGLang's real pools, ModelConfig and ServerArgs under the
    attribute names ModelRunner uses.
    """
    import types

    return types.SimpleNamespace(
        device="cpu", req_to_token_pool=sched.req_to_token_pool, token_to_kv_pool=sched.kv_pool,
        token_to_kv_pool_allocator=sched.allocator, model_config=sched.model_config,
        server_args=sched.server_args, tp_size=1, page_size=1, use_mla_backend=False,
        is_draft_worker=False, attn_backend=attn_backend,
        ngram_embedding_manager=types.SimpleNamespace(enabled=False),
    )


def forward_batch(sched: MiniScheduler, batch, runner):
    """SGLang's ForwardBatch for a ScheduleBatch (the conversion TpModelWorker makes)."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch

    init_cpu_distributed()
    return ForwardBatch.init_new(batch, runner, capture_hidden_mode=CaptureHiddenMode.NULL,
                                 return_hidden_states_before_norm=False)
