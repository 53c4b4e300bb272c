"""The rollout engine: batched generation with a KV cache, per-row stopping and log-probs.

One compiled program per (batch bucket, prompt bucket, n, max_new_tokens, sampling mode) does
everything on device:

1. prefill: one forward of the model over the left-padded prompts `[B, P]` (its public cached call)
   into a transient prompt-sized cache;
2. share: the prompt is prefilled once, not n times. The fast decode path keeps each prompt's
   keys/values once and reads them once per step for all n samples; its decode cache holds the B*n
   rows' M generated slots. (The model path repeats the prompt's k/v for its n samples into a
   cache of B*n rows and P + M slots.) The decode cache is preallocated by the engine and donated
   to the program, which hands it back: steady state holds one copy, and a call with the same
   shapes reuses it;
3. decode: a `lax.while_loop` that feeds one token per row, writes k/v in place
   (`dynamic_update_slice`), samples, and ends as soon as every row has produced a stop token or
   `max_new_tokens` tokens were produced. Rows that stopped keep running (static shapes) but are
   masked, padded and never restarted. With a blocked cache (`attention_block`) the loop is split
   into a few phases, and a phase's steps read only the cache blocks written so far.

The decode step is the model's public one-token step (`Transformer.decode_step`: a per-layer cache in
the layout a one-token step wants; see `mtgrpo_jax.models.decode` for why) or, with
`decode_impl="model"`, the model's general cached call over its `[L, B, S, Hkv, D]` cache.

Randomness: row r (= prompt i * n + sample j) draws the uniform of step t from
`fold_in(fold_in(key, r), t)`, so a row's samples depend only on the key, its row number and its
logits: not on the batch bucket, on other rows stopping, or on how a long request is chunked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mtgrpo_jax import parallel
from mtgrpo_jax.models import KVCache, decode
from mtgrpo_jax.rollout import sampling
from mtgrpo_jax.rollout.packing import pack_left_padded


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy; `top_k == 0` and `top_p == 1` disable those
    filters. Rows stop at any of `stop_token_ids` and, unless `ignore_eos`, at the tokenizer's and
    model's EOS ids; the stop token itself is part of the completion (mask True)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if not isinstance(self.n, (int, np.integer)) or self.n <= 0:
            raise ValueError(f"SamplingParams.n must be a positive integer, got {self.n!r}")
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes the engine pads to: prompt lengths (tokens) and batch sizes (prompts, before
    the n-fold expansion). A request larger than the largest batch bucket runs in chunks of it."""

    prompt_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

    def __post_init__(self):
        for name in ("prompt_lengths", "batch_sizes"):
            values = tuple(sorted({int(v) for v in getattr(self, name)}))
            if not values or values[0] <= 0:
                raise ValueError(
                    f"Buckets.{name} must be a non-empty set of positive integers, got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, values)

    @property
    def count(self) -> int:
        return len(self.prompt_lengths) * len(self.batch_sizes)

    @staticmethod
    def pick(values: tuple[int, ...], size: int) -> int:
        """The smallest of the (sorted) `values` that holds `size`."""
        for v in values:
            if v >= size:
                return v
        raise ValueError(f"{size} exceeds the largest bucket {values[-1]}")


@dataclasses.dataclass
class RolloutOutput:
    """What `RolloutEngine.generate` returns (host NumPy arrays). Rows are prompt-major: prompt i's
    samples are rows i*n .. i*n+n-1.

    tokens      int32 [N*n, M]  completion ids; pad id after a row finished
    mask        bool  [N*n, M]  completion tokens, including the stop token
    logprobs    float32 [N*n, M] log_softmax(logits / T) of the full distribution at each sampled
                token (log_softmax(logits) when greedy), whatever top-k / top-p did; 0 where masked
    lengths     int32 [N*n]     completion lengths (mask.sum(1))
    finish_reason  list[str]    "stop" (a stop/EOS token was produced) or "length"
    texts       list[str]       decoded completions (special tokens skipped); empty without tokenizer
    prompt_ids  int32 [N, P]    the prompts as fed to the model: left-padded to the prompt bucket
    prompt_mask bool  [N, P]    their real tokens
    prompt_lengths int32 [N]
    prompt_index   int32 [N*n]  which prompt each row continues
    num_truncated  prompts that were cut to the largest bucket (only with truncation enabled)
    num_decode_steps  decode forward passes run (summed over chunks); < M - 1 when all rows stop early
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str]
    texts: list[str]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    prompt_lengths: np.ndarray
    prompt_index: np.ndarray
    n: int
    num_truncated: int = 0
    num_decode_steps: int = 0


def to_serve_layout(state, mesh: jax.sharding.Mesh):
    """Moves an `nnx.State` (any layout, e.g. the FSDP "train" one) into the "serve" layout of
    `mtgrpo_jax.parallel` (tensor parallel only: no weight all-gathers inside the decode loop).

    Returns (state, seconds): the wall time of the transfer, blocked until every shard landed. A state
    already in the serve layout costs (almost) nothing."""
    start = time.perf_counter()
    moved = parallel.shard_state(state, mesh, "serve")
    jax.block_until_ready(moved)
    return moved, time.perf_counter() - start


def platform_attention_block(platform: str) -> int | None:
    """The default decode-cache block for a platform: 32 slots on CPU, one block elsewhere."""
    return 32 if platform == "cpu" else None


def kv_cache_bytes_per_row(cfg, positions: int, dtype) -> int:
    """Bytes of one row's KV cache over `positions` slots: layers x kv heads x head_dim x positions x
    dtype size x 2 (keys and values)."""
    return (
        cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * int(positions) * jnp.dtype(dtype).itemsize * 2
    )


def rollout_chunk_rows(
    cfg, budget_gib: float, *, positions: int, n: int, dtype, batch_sizes: Sequence[int] | None = None, shards: int = 1
) -> int:
    """Rows (= prompts x n: a prompt's n samples are never split) per rollout call whose KV cache fits
    `budget_gib` GiB per device, the cache being split over `shards` devices (the mesh's data x fsdp, times
    tensor when it divides the kv heads). With `batch_sizes` (the engine's batch buckets, in prompts) the
    prompt count is the largest bucket that fits, since a call's cache is allocated for its bucket.

    Raises ValueError when not even one prompt (or the smallest bucket) fits."""
    if not budget_gib > 0:
        raise ValueError(f"kv_cache_budget_gib must be > 0, got {budget_gib!r}")
    per_prompt = kv_cache_bytes_per_row(cfg, positions, dtype) * int(n) / max(int(shards), 1)
    prompts = int(budget_gib * 2**30 // per_prompt)
    if batch_sizes is not None:
        fitting = [b for b in sorted(batch_sizes) if b <= prompts]
        prompts = fitting[-1] if fitting else 0
    if prompts < 1:
        smallest = min(batch_sizes) if batch_sizes else 1
        raise ValueError(
            f"kv_cache_budget_gib={budget_gib} holds no rollout call: {smallest} prompt(s) x n={n} "
            f"samples x {positions} positions need {smallest * per_prompt / 2**30:.3g} GiB per device"
        )
    return prompts * int(n)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


class RolloutEngine:
    """Generates completions from an NNX `Transformer` (see the module docstring for the design).

    Args:
      model: `mtgrpo_jax.models.Transformer` (any family), or any module with the same cached-call
        contract; its current weights are read at every `generate`, so a trainer can keep updating it.
      tokenizer: HF tokenizer for `texts` and the EOS / pad ids; None gives empty `texts`.
      buckets: `Buckets`, or a dict with `prompt_lengths` / `batch_sizes`.
      mesh: optional (data, fsdp, tensor) mesh: batch over (data, fsdp), kv heads over tensor, and the
        weights moved into the "serve" layout at each call (`to_serve_layout`; a no-op when they
        already are, `last_reshard_seconds` records the cost).
      cache_dtype: KV cache dtype (default: the model's activation dtype). On CPU, a float32 cache
        under bf16 weights is faster than a bf16 one (XLA:CPU's bf16 batched attention dots are
        slow; `mtgrpo bench rollout --dtypes float32,bfloat16 --cache-dtype ...` measures it).
      truncate_prompts: if True, prompts longer than the largest prompt bucket keep their last
        tokens (counted in `num_truncated_prompts` and in each output); if False they raise ValueError.
      pad_token_id: id used for padding (default: tokenizer pad, else the first EOS id, else 0).
      decode_impl: "fast" (the model's one-token `decode_step`: per-layer cache in the layout a
        one-token step wants), "model" (the model's general cached call, `[L, B, S, Hkv, D]` cache), or
        "auto" (fast when the model has `decode_step`, i.e. is the project's Transformer).
      attention_block: slots per block of the fast path's generated-token cache (None: one
        block). Decoding runs in up to `max_phases` loops, each reading only the blocks written so
        far instead of the whole static-length cache. Default "auto": `platform_attention_block()`,
        32 on CPU, where attention over small blocks also runs nearer the memory bandwidth than over
        one long block (`mtgrpo bench rollout` reports the slots read); None on accelerators, where
        many small dots per step would cost more launches than they save.
      max_phases: the most decode loops one program holds (each is compiled; default 4).
      kv_cache_budget_gib: KV cache GiB per device one call may hold (None: no limit). Requests run in
        chunks of the largest batch bucket whose cache (rows x (prompt bucket + max_new_tokens)
        positions, see `rollout_chunk_rows`) fits; a prompt's n samples stay in one chunk, and since
        each row's randomness is keyed by its row number the results equal one big call's.
      attention_kernel: on a single x86-64 CPU device with AVX2 and a float32 cache, the fast path's
        attention runs as one compiled kernel per layer (`mtgrpo_jax.models.kernels`: the same math,
        streamed at nearer the memory bandwidth than XLA:CPU's small dots); False keeps XLA's ops.
        Ignored elsewhere.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        buckets: Buckets | dict | None = None,
        mesh=None,
        *,
        cache_dtype=None,
        truncate_prompts: bool = False,
        pad_token_id: int | None = None,
        decode_impl: str = "auto",
        attention_block: int | str | None = "auto",
        max_phases: int = 4,
        kv_cache_budget_gib: float | None = None,
        attention_kernel: bool = True,
    ):
        if buckets is None:
            buckets = Buckets()
        elif isinstance(buckets, dict):
            buckets = Buckets(**buckets)
        elif not isinstance(buckets, Buckets):
            raise TypeError(f"buckets must be a Buckets or a dict, got {type(buckets).__name__}")
        if decode_impl not in ("auto", "fast", "model"):
            raise ValueError(f"decode_impl must be 'auto', 'fast' or 'model', got {decode_impl!r}")
        fast = hasattr(model, "decode_step")  # the one-token decode methods of mtgrpo_jax.models.Transformer
        if decode_impl == "fast" and not fast:
            raise ValueError(f"decode_impl='fast' needs mtgrpo_jax.models.Transformer, got {type(model).__name__}")
        self.decode_impl = ("fast" if fast else "model") if decode_impl == "auto" else decode_impl
        if attention_block == "auto":
            attention_block = platform_attention_block(
                (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
            )
        if attention_block is not None and (not isinstance(attention_block, (int, np.integer)) or attention_block <= 0):
            raise ValueError(f"attention_block must be a positive integer, None or 'auto', got {attention_block!r}")
        if not isinstance(max_phases, (int, np.integer)) or max_phases <= 0:
            raise ValueError(f"max_phases must be a positive integer, got {max_phases!r}")
        if kv_cache_budget_gib is not None and not kv_cache_budget_gib > 0:
            raise ValueError(f"kv_cache_budget_gib must be > 0 or None, got {kv_cache_budget_gib!r}")
        self.kv_cache_budget_gib = kv_cache_budget_gib
        self.attention_block = None if attention_block is None else int(attention_block)
        self.max_phases = int(max_phases)
        self.attention_kernel = bool(attention_kernel)
        self.model = model
        self.tokenizer = tokenizer
        self.buckets = buckets
        self.mesh = mesh
        self.config = model.config
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        self.truncate_prompts = truncate_prompts
        eos = set(self.config.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            eos.add(int(tok_eos))
        self.eos_token_ids = tuple(sorted(eos))
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)
        if mesh is not None:
            sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
            batch_devices = math.prod(sizes.get(a, 1) for a in parallel.BATCH_AXES)
            # Rows are b * n, so checking the buckets b keeps every prefill and decode batch divisible.
            bad = [b for b in buckets.batch_sizes if b % batch_devices]
            if bad:
                raise ValueError(
                    f"batch buckets {bad} are not multiples of the mesh's data x fsdp size {batch_devices}"
                )
        self.num_compiles = 0  # programs traced; each trace is one XLA compilation
        self.num_truncated_prompts = 0
        self.last_reshard_seconds = 0.0
        self._graphdef = nnx.graphdef(model)
        self._cache = None  # ((rows, prompt bucket, max_new_tokens, n), cache): the one preallocated decode cache
        self._program = jax.jit(
            self._run,
            static_argnames=("n", "max_new_tokens", "greedy", "top_k", "use_top_p"),
            donate_argnames=("cache",),
        )

    # ------------------------------------------------------------------ public API
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams | None = None, key: jax.Array | None = None
    ) -> RolloutOutput:
        """Samples `params.n` completions for each prompt (lists of token ids, unpadded).

        Deterministic for a given key: row r = prompt i * n + sample j draws its randomness from
        fold_in(key, r), so results do not depend on the bucket or on chunking. Greedy needs no key."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if key is None:
            if not params.greedy:
                raise ValueError("generate needs a PRNG key when temperature > 0")
            key = jax.random.key(0)
        prompts = self._check_prompts(prompt_ids)
        prompts, truncated = self._fit_prompts(prompts)
        n, m = int(params.n), int(params.max_new_tokens)
        p_bucket = Buckets.pick(self.buckets.prompt_lengths, max(len(p) for p in prompts))
        max_batch = self.buckets.batch_sizes[-1]
        if self.kv_cache_budget_gib is not None:
            max_batch = (
                rollout_chunk_rows(
                    self.config,
                    self.kv_cache_budget_gib,
                    positions=p_bucket + m,
                    n=n,
                    dtype=self.cache_dtype,
                    batch_sizes=self.buckets.batch_sizes,
                    shards=self._cache_shards(),
                )
                // n
            )
        stop_ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids)))
        bad = [t for t in stop_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        # A vocabulary-sized mask: any stop list is data of one fixed shape, never a new program.
        stop_mask = np.zeros((self.config.vocab_size,), bool)
        stop_mask[stop_ids] = True

        ids_all, mask_all = pack_left_padded(prompts, p_bucket, self.pad_token_id)

        state = self._serving_state()
        outs, steps = [], 0
        for start in range(0, len(prompts), max_batch):
            count = min(max_batch, len(prompts) - start)
            b_bucket = Buckets.pick(self.buckets.batch_sizes, count)
            ids = np.full((b_bucket, p_bucket), self.pad_token_id, np.int32)
            mask = np.zeros((b_bucket, p_bucket), bool)
            ids[:count], mask[:count] = ids_all[start : start + count], mask_all[start : start + count]
            mask[count:, -1] = True  # padding rows get one token so that their softmax is defined
            cache = self._take_cache(b_bucket, n, p_bucket, m)
            with self._mesh_context():
                result, cache = self._program(
                    state,
                    cache,
                    self._put_batch(ids),
                    self._put_batch(mask),
                    key,
                    jnp.int32(start * n),
                    jnp.int32(count * n),
                    jnp.float32(params.temperature),
                    jnp.float32(params.top_p),
                    jnp.asarray(stop_mask),
                    n=n,
                    max_new_tokens=m,
                    greedy=params.greedy,
                    top_k=int(params.top_k),
                    use_top_p=params.top_p < 1.0,
                )
            self._cache = ((b_bucket * n, p_bucket, m, n), cache)
            # to_host, not device_get: in a multi-process run the rows are spread over every process.
            tokens, logprobs, lengths, stopped, n_steps = parallel.to_host(result)
            used = count * n
            outs.append((tokens[:used], logprobs[:used], lengths[:used], stopped[:used]))
            steps += int(n_steps)

        tokens, logprobs, lengths, stopped = (np.concatenate(x) for x in zip(*outs))
        texts = []
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(
                [t[:l].tolist() for t, l in zip(tokens, lengths)], skip_special_tokens=True
            )
        return RolloutOutput(
            tokens=tokens.astype(np.int32),
            mask=np.arange(m)[None, :] < lengths[:, None],
            logprobs=logprobs.astype(np.float32),
            lengths=lengths.astype(np.int32),
            finish_reason=["stop" if s else "length" for s in stopped],
            texts=texts,
            prompt_ids=ids_all,
            prompt_mask=mask_all,
            prompt_lengths=mask_all.sum(1).astype(np.int32),
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), n),
            n=n,
            num_truncated=truncated,
            num_decode_steps=steps,
        )

    # ------------------------------------------------------------------ host-side helpers
    def _check_prompts(self, prompt_ids) -> list[list[int]]:
        if prompt_ids is None or len(prompt_ids) == 0:
            raise ValueError("generate got an empty prompt list")
        vocab = self.config.vocab_size
        prompts = []
        for i, p in enumerate(prompt_ids):
            if isinstance(p, str):
                raise TypeError(f"prompt {i} is a string; pass token ids (tokenizer(...).input_ids)")
            p = [int(t) for t in np.asarray(p).reshape(-1)]
            if not p:
                raise ValueError(f"prompt {i} is empty (every prompt needs at least one token)")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            prompts.append(p)
        return prompts

    def _fit_prompts(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        limit = self.buckets.prompt_lengths[-1]
        long = [i for i, p in enumerate(prompts) if len(p) > limit]
        if not long:
            return prompts, 0
        if not self.truncate_prompts:
            i = long[0]
            raise ValueError(
                f"prompt {i} has {len(prompts[i])} tokens, more than the largest prompt bucket "
                f"({limit}); add a bucket or construct the RolloutEngine with truncate_prompts=True"
            )
        self.num_truncated_prompts += len(long)
        return [p[-limit:] if len(p) > limit else p for p in prompts], len(long)

    def _cache_shards(self) -> int:
        """Devices one decode cache is split over: rows over data x fsdp, kv heads over tensor when divisible."""
        if self.mesh is None:
            return 1
        # rows: the batch buckets are checked to be multiples of data x fsdp, so any multiple stands for them
        spec = self._sharding(2, 0, math.prod(self.mesh.axis_sizes), 1).spec
        sizes = parallel.mesh_axis_sizes(self.mesh)
        return math.prod(sizes[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))

    def _serving_state(self):
        state = nnx.state(self.model)
        if self.mesh is None:
            return state
        state, self.last_reshard_seconds = to_serve_layout(state, self.mesh)
        return state

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put_batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = self._sharding(x.ndim, 0, x.shape[0]).spec
        # every process holds the same prompts; each supplies its own shards (no cross-process check)
        return parallel.host_to_global(x, NamedSharding(self.mesh, spec))

    def _cache_layout(self, prompts: int, n: int, p: int, m: int):
        """(shapes, shardings) pytrees of the decode cache for this implementation and shape (prompts
        of n samples, prompt bucket p, max_new_tokens m): prompts (rows) over (data, fsdp), kv heads over
        tensor when it divides them; shardings None without a mesh. The fast path's cache holds the m
        generated slots only (the prompts' k/v stay in a per-prompt prefix)."""
        cfg = self.config
        length = p + m
        if self.decode_impl == "fast":  # per layer, per block: k [Bp, Hkv, n, D, C], v [Bp, Hkv, n, C, D]
            k_shape, v_shape = self.model.decode_cache_shapes(prompts, n, m, self.attention_block)
            shapes = decode.DecodeCache((k_shape,) * cfg.num_hidden_layers, (v_shape,) * cfg.num_hidden_layers)
            batch_dim, batch, head_dim, ndim = 0, prompts, 1, 5
        else:  # the model's [L, R, S, Hkv, D]
            shape = (cfg.num_hidden_layers, prompts * n, length, cfg.num_key_value_heads, cfg.head_dim)
            shapes = KVCache(shape, shape)
            batch_dim, batch, head_dim, ndim = 1, prompts * n, 3, 5
        if self.mesh is None:
            return shapes, None
        sharding = self._sharding(ndim, batch_dim, batch, head_dim)
        return shapes, jax.tree.map(lambda _: sharding, shapes, is_leaf=_is_shape)

    def _sharding(self, ndim: int, batch_dim: int, batch: int, head_dim: int | None = None) -> NamedSharding:
        """Dim `batch_dim` (size `batch`) over (data, fsdp) and dim `head_dim` (kv heads) over what the serve
        layout gives kv heads, each when the mesh axes divide it (`parallel.divisible_spec`)."""
        shape, axes = [1] * ndim, [None] * ndim
        shape[batch_dim], axes[batch_dim] = batch, parallel.BATCH_AXES
        if head_dim is not None:
            shape[head_dim], axes[head_dim] = self.config.num_key_value_heads, parallel.LAYOUTS["serve"]["kv_heads"]
        return NamedSharding(self.mesh, parallel.divisible_spec(shape, axes, parallel.mesh_axis_sizes(self.mesh)))

    def _take_cache(self, prompts: int, n: int, p: int, m: int):
        """The preallocated cache for this shape (reused; it is donated to the program), else a fresh
        one. Only one cache is held, so memory stays bounded by the largest shape in use."""
        held, self._cache = self._cache, None  # the held buffer is about to be donated, or dropped
        if held is not None and held[0] == (prompts * n, p, m, n):
            return held[1]
        del held
        shapes, shardings = self._cache_layout(prompts, n, p, m)
        make = jax.jit(
            lambda: jax.tree.map(lambda s: jnp.zeros(s, self.cache_dtype), shapes, is_leaf=_is_shape),
            out_shardings=shardings,
        )
        return make()

    def _phases(self, m: int) -> list[tuple[int, tuple[int, int | None]]]:
        """The decode loops of one program: (t_end, (first_block, blocks)) each. Step t writes
        generated slot t (t < m - 1); a phase runs the steps t < t_end, whose slots lie in blocks
        [first_block, blocks), and reads blocks [0, blocks). The blocks are split into at most
        `max_phases` runs."""
        if self.decode_impl != "fast" or m < 2:
            return [(m, (0, None))]
        ends = np.cumsum(decode.block_sizes(m, self.attention_block))  # exclusive end slot per block
        last = int(np.searchsorted(ends, m - 2, side="right"))
        groups = np.array_split(np.arange(last + 1), min(self.max_phases, last + 1))
        return [(int(ends[g[-1]]), (int(g[0]), int(g[-1]) + 1)) for g in groups]

    # ------------------------------------------------------------------ the device program
    def _run(
        self,
        state,
        cache,
        prompt_ids,
        prompt_mask,
        key,
        row_offset,
        valid_rows,
        temperature,
        top_p,
        stop_mask,
        *,
        n: int,
        max_new_tokens: int,
        greedy: bool,
        top_k: int,
        use_top_p: bool,
    ):
        self.num_compiles += 1  # Python side effect: runs once per trace, i.e. once per compilation
        model = nnx.merge(self._graphdef, state)
        b, p = prompt_ids.shape
        rows, m = b * n, max_new_tokens
        _, cache_shardings = self._cache_layout(b, n, p, m)
        if cache_shardings is None:
            constrain = lambda c: c  # noqa: E731
        else:
            constrain = lambda c: jax.lax.with_sharding_constraint(c, cache_shardings)  # noqa: E731

        # 1. prefill the b distinct prompts once, into a transient prompt-sized cache.
        positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
        prompt_cache = model.init_cache(b, p, dtype=self.cache_dtype)
        if self.decode_impl == "fast":
            # The head on the last position only: `[B, P, V]` float32 logits would be 80 GB for 128 prompts
            # of 1024 tokens at a 152k vocabulary (XLA does not push the slice through the head matmul).
            hidden, prompt_cache = model.trunk(
                prompt_ids, positions=positions, cache=prompt_cache, cache_index=jnp.int32(0), kv_mask=prompt_mask
            )
            last_logits = model.logits(hidden[:, -1:])[:, 0]
        else:
            logits, prompt_cache = model(
                prompt_ids, positions=positions, cache=prompt_cache, cache_index=jnp.int32(0), kv_mask=prompt_mask
            )
            last_logits = logits[:, -1, :]
        last_logits = jnp.repeat(last_logits, n, axis=0)  # left padding: the last slot is a real token

        # 2. share each prompt's k/v with its n samples. Fast path: one copy per prompt, read once
        # per step for all n samples; model path: repeated into the donated cache, in place.
        if self.decode_impl == "fast":
            prefix = model.decode_prefix(prompt_cache, prompt_mask, self.cache_dtype)
            if self.mesh is not None:
                layer = self._sharding(4, 0, b, 1)
                prefix = jax.lax.with_sharding_constraint(
                    prefix, decode.Prefix((layer,) * len(prefix.k), (layer,) * len(prefix.v), self._sharding(2, 0, b))
                )
            weights = model.decode_weights(positions=p + m)  # a row's positions stay below p + m
        else:

            def share(full, part):
                part = jnp.repeat(part, n, axis=1).astype(full.dtype)
                return jax.lax.dynamic_update_slice(full, part, (0, 0, 0, 0, 0))

            cache = KVCache(share(cache.k, prompt_cache.k), share(cache.v, prompt_cache.v))
        cache = constrain(cache)

        row_mask = jnp.repeat(prompt_mask, n, axis=0)
        prompt_len = jnp.sum(row_mask, axis=1, dtype=jnp.int32)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_offset + jnp.arange(rows))

        def draw(step_logits, step):
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(row_keys)
            return sampling.sample(
                step_logits, u, temperature, greedy_decode=greedy, top_k=top_k, top_p=top_p, use_top_p=use_top_p
            )

        def is_stop(tok):
            return stop_mask[tok]

        def forward(cache, tok, t, blocks):
            if self.decode_impl == "fast":
                return model.decode_step(
                    weights,
                    prefix,
                    cache,
                    tok,
                    prompt_len + t,
                    t,
                    blocks=blocks[1],
                    first_block=blocks[0],
                    attention_kernel=self.attention_kernel,
                )
            kv_mask = jnp.concatenate([row_mask, jnp.ones((rows, m), bool)], axis=1)
            step_logits, cache = model(
                tok[:, None], positions=(prompt_len + t)[:, None], cache=cache, cache_index=p + t, kv_mask=kv_mask
            )
            return step_logits[:, 0], cache

        # 3. decode. Token t is sampled from the logits after feeding token t-1 (token 0 from prefill),
        # so the loop runs at most m - 1 forward passes and stops once every row has stopped.
        tok, lp = draw(last_logits, 0)
        tokens = jnp.full((rows, m), self.pad_token_id, jnp.int32).at[:, 0].set(tok)
        logprobs = jnp.zeros((rows, m), jnp.float32).at[:, 0].set(lp)
        lengths = jnp.ones((rows,), jnp.int32)

        def cond(carry, t_end):
            t, _, _, _, done, _, _ = carry
            return (t + 1 < m) & (t < t_end) & ~jnp.all(done)

        def body(carry, blocks):
            t, cache, tokens, logprobs, done, tok, lengths = carry
            step_logits, cache = forward(cache, tok, t, blocks)
            new_tok, new_lp = draw(step_logits, t + 1)
            new_tok = jnp.where(done, self.pad_token_id, new_tok)
            new_lp = jnp.where(done, 0.0, new_lp)
            tokens = jax.lax.dynamic_update_slice(tokens, new_tok[:, None], (0, t + 1))
            logprobs = jax.lax.dynamic_update_slice(logprobs, new_lp[:, None], (0, t + 1))
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | is_stop(new_tok)
            return t + 1, constrain(cache), tokens, logprobs, done, new_tok, lengths

        done = is_stop(tok) | (jnp.arange(rows) >= valid_rows)  # bucket padding rows never hold the loop
        carry = (jnp.int32(0), cache, tokens, logprobs, done, tok, lengths)
        # One loop per phase; a phase's steps read only the cache blocks written so far.
        for t_end, blocks in self._phases(m):
            carry = jax.lax.while_loop(
                functools.partial(cond, t_end=t_end), functools.partial(body, blocks=blocks), carry
            )
        t, cache, tokens, logprobs, _, _, lengths = carry
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        return (tokens, logprobs, lengths, is_stop(last), t), cache
