"""`mtgrpo bench rollout`: tokens/s of the rollout engine against transformers' `generate`.

Both sides run the same random-init Qwen2-shaped model (ours is written with `save_pretrained` and
read back by transformers from the safetensors), the same prompts, the same n, the same number of new
tokens (stopping disabled on both sides so each row produces exactly `max_new_tokens`), multinomial
sampling at temperature 1 over the full vocabulary (transformers' default top_k=50 switched off).
Both sides compute in float32 by default: torch on CPU with `torch.set_num_threads(2)`, ours with
float32 parameters, activations and KV cache (on an x86-64 CPU with AVX2, the decode step's attention
is then the compiled kernel of `mtgrpo_jax.models.kernels`; `setup.cpu_attention_kernel` says whether
it ran). `--dtypes float32,bfloat16` also measures ours with
bf16 weights and activations (the library default; same weights rounded) around the same float32
reference; its KV cache stays float32 (`--cache-dtype`), because XLA:CPU's bf16 batched attention
dots are slow while its bf16 x bf16 -> f32 matmuls are faster than float32 ones.
`--reference-dtype bfloat16` runs transformers in bf16 instead (faster than float32 on a CPU with
AVX512-BF16), for a bf16-against-bf16 comparison.

Reported per size:
- tokens_per_s: new tokens / wall time of one `generate` call (compilation excluded, prefill
  included), averaged over a run just before and a run just after the reference (the CPU is shared
  with other processes; both runs are reported too).
- reference_tokens_per_s: the same for transformers, timed on the second of two identical calls
  (torch sets up its CPU kernels per shape on first use), over the full length: at 100M parameters the
  longest part of the benchmark. `--ref-new-tokens K` times only K tokens per row and extrapolates
  (prefill + measured steps + the remaining steps at the mean of the last measured ones). Later steps
  of transformers' growing cache are slower than earlier ones, so the extrapolation flatters the
  reference and is flagged `reference_extrapolated`.
- decode roofline: bytes one decode step must read (all weights + the KV cache the step reads,
  averaged over the steps: each prompt's k/v once for its n samples, and only the generated-token
  blocks written so far) over the read bandwidth (a 512 MiB row-sum), compared with the measured
  decode-step time; and the
  same step's FLOPs over the measured matmul rate (a 2048^3 matmul). At 512 rows a CPU decode step is
  compute bound, so the second fraction is the one that can approach 1. Both hardware figures are
  measured before and after each size, and the better one is used.

The CPU is shared with other processes; both sides are measured back to back in one run, so the
ratio is the meaningful number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

SIZES = {
    # ~10M parameters: Qwen2 layout (tied embeddings, qkv bias, GQA).
    "10m": dict(
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # ~100M parameters.
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
    # Qwen2.5-0.5B shape (for accelerators).
    "0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1000000.0,
    ),
}


def _config(name: str):
    from mtgrpo_jax.models import ModelConfig

    if name not in SIZES:
        raise ValueError(f"unknown size {name!r} (known: {', '.join(SIZES)})")
    return ModelConfig(model_type="qwen2", max_position_embeddings=4096, eos_token_id=0, bos_token_id=0, **SIZES[name])


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> tuple[float, float]:
    """(read, copy) bytes/s over a `mib` MiB float32 array, best of `repeats`.

    Read = a row-sum (what a decode step mostly does: stream weights and cache); copy = a fused
    elementwise copy (read + write, slower: fresh output pages are faulted in on every call)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 256, 1024), jnp.float32)
    rates = []
    for fn, moved in ((lambda a: jnp.sum(a, axis=1), x.nbytes), (lambda a: a * 1.0000001, 2 * x.nbytes)):
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(x))
            best = min(best, time.perf_counter() - t)
        rates.append(moved / best)
    return rates[0], rates[1]


def measure_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype` (float32 accumulation), best of `repeats`."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def mean_slots_read(engine, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(prompt slots, generated slots) one decode step of `engine` reads per row, averaged over
    the steps. The fast path reads each prompt's k/v once for its n samples (the caller divides the
    prompt bytes by n) and only the generated-token blocks written so far; the model path reads its
    whole static-length cache, prompt repeated per sample."""
    from mtgrpo_jax.models import decode

    if engine.decode_impl != "fast" or new_tokens < 2:
        return float(prompt_len), float(new_tokens)
    ends = np.cumsum(decode.block_sizes(new_tokens, engine.attention_block))
    slots, t = [], 0
    for t_end, (_, blocks) in engine._phases(new_tokens):
        while t + 1 < new_tokens and t < t_end:
            slots.append(int(ends[blocks - 1]))
            t += 1
    return float(prompt_len), float(np.mean(slots))


def _ours(model, prompts, n, new_tokens, seed, cache_dtype):
    """Compiles the engine's program for this shape and returns (`run(key)`, engine); `run` times
    one prefill-only call and one full call: (full seconds, prefill seconds, decode steps).

    Warm-up and the prefill timing use the same compiled program with every token as a stop token
    (the stop list is data), so the loop exits after the first sampled token: no second compile."""
    import dataclasses

    import jax

    from mtgrpo_jax.rollout import Buckets, RolloutEngine, SamplingParams

    engine = RolloutEngine(
        model,
        None,
        Buckets(prompt_lengths=(prompts.shape[1],), batch_sizes=(prompts.shape[0],)),
        cache_dtype=cache_dtype,
    )
    prompt_list = prompts.tolist()
    full = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    prefill_only = dataclasses.replace(full, stop_token_ids=tuple(range(model.config.vocab_size)))
    engine.generate(prompt_list, prefill_only, jax.random.key(seed))  # compile + warm up

    def run(key: int):
        start = time.perf_counter()
        engine.generate(prompt_list, prefill_only, jax.random.key(key))
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        out = engine.generate(prompt_list, full, jax.random.key(key))
        full_s = time.perf_counter() - start
        if not out.mask.all() or out.num_decode_steps != new_tokens - 1:
            raise RuntimeError("stopping was disabled, so every row must run to max_new_tokens")
        return full_s, prefill_s, out.num_decode_steps

    return run, engine


def _reference(model_dir, prompts, n, new_tokens, full_tokens, threads, dtype="float32"):
    """transformers' generate on CPU: (seconds for `full_tokens` (extrapolated when fewer were generated),
    measured seconds, prefill seconds, mean decode-step seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    hf.eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=0,
    )
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        torch.manual_seed(0)
        # Warm-up with the identical call: torch's CPU kernels set up per shape on first use (a cold
        # 32-row call was 6x slower than a warm one), and every decode step is a new shape.
        hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        start = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
        elapsed = time.perf_counter() - start
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens or out.shape[0] != ids.shape[0] * n:
        raise RuntimeError(f"reference produced {out.shape} tokens, expected {ids.shape[0] * n} x {new_tokens} new")
    prefill = stamps[0] - start  # the first logits processor call comes right after the prefill forward
    steps = np.diff(stamps)
    step = float(steps.mean()) if len(steps) else float("nan")
    if full_tokens == new_tokens:
        return elapsed, elapsed, prefill, step
    tail = steps[-max(1, len(steps) // 2) :].mean()
    return elapsed + (full_tokens - new_tokens) * tail, elapsed, prefill, step


def run_size(
    name: str,
    *,
    prompts: int,
    prompt_len: int,
    n: int,
    new_tokens: int,
    ref_new_tokens: int | None,
    dtypes: tuple[str, ...],
    cache_dtype: str,
    threads: int,
    reference_dtype: str = "float32",
    seed: int = 0,
    log=print,
) -> dict:
    """One size: ours (per dtype), then the reference, then ours again; the CPU is shared, so ours is
    averaged over both sides of the reference. The hardware figures are measured before and after
    (best of). The top-level numbers are those of `dtypes[0]`; every dtype is under `by_dtype`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtgrpo_jax.models import Transformer, save_pretrained

    cfg = _config(name)
    n_params = cfg.num_params()
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(1, cfg.vocab_size, size=(prompts, prompt_len)).astype(np.int64)
    rows = prompts * n
    total_new = rows * new_tokens
    bandwidth = measure_bandwidth()[0]
    matmul = {dt: measure_matmul_flops(dt) for dt in dtypes}

    model32 = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
    runners, before = {}, {}
    for dt in dtypes:
        model = model32
        if dt != "float32":  # the same weights, rounded
            model = Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dt), param_dtype=jnp.dtype(dt))
            nnx.update(model, jax.tree.map(lambda x: x.astype(dt), nnx.state(model32)))  # noqa: B023 (called here)
        runners[dt] = _ours(model, prompt_ids, n, new_tokens, seed, cache_dtype)
        before[dt] = runners[dt][0](seed + 1)
        log(
            f"[{name}] {n_params / 1e6:.1f}M params; ours {dt} (before the reference): "
            f"{total_new / before[dt][0]:.1f} tok/s ({before[dt][0]:.1f}s, of which prefill {before[dt][1]:.2f}s)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model32, tmp)
        ref_new_tokens = new_tokens if ref_new_tokens is None else min(ref_new_tokens, new_tokens)
        log(f"[{name}] reference: transformers generate, {rows} rows x {ref_new_tokens} new tokens")
        ref_s, ref_measured_s, ref_prefill_s, ref_step_s = _reference(
            tmp, prompt_ids, n, ref_new_tokens, new_tokens, threads, reference_dtype
        )
    ref_tps = total_new / ref_s
    log(
        f"[{name}] reference {ref_tps:.1f} tok/s ({ref_measured_s:.1f}s measured"
        + (f", extrapolated to {new_tokens} tokens: {ref_s:.1f}s)" if ref_new_tokens != new_tokens else ")")
    )

    bandwidth = max(bandwidth, measure_bandwidth()[0])
    # KV-cache bytes a decode step reads, averaged over the steps (one block layout per engine).
    engine0 = next(iter(runners.values()))[1]
    prompt_slots, gen_slots = mean_slots_read(engine0, prompt_len, new_tokens)
    shared = engine0.decode_impl == "fast"  # a prompt's k/v is read once for its n samples
    row_slots = (prompt_slots / n if shared else prompt_slots) + gen_slots
    cache_item = jnp.dtype(cache_dtype).itemsize
    cache_bytes = int(
        2 * cfg.num_hidden_layers * rows * row_slots * cfg.num_key_value_heads * cfg.head_dim * cache_item
    )
    matmul_params = n_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention_flops = int(
        4 * rows * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (prompt_slots + gen_slots)
    )
    step_flops = 2 * rows * matmul_params + attention_flops
    by_dtype = {}
    for dt in dtypes:
        run, engine = runners[dt]
        after = run(seed + 2)
        ours_s, prefill_s = (before[dt][0] + after[0]) / 2, (before[dt][1] + after[1]) / 2
        tps = total_new / ours_s
        log(
            f"[{name}] ours {dt} (after the reference): {total_new / after[0]:.1f} tok/s; mean {tps:.1f} tok/s "
            f"-> ratio {tps / ref_tps:.2f}x"
        )
        matmul[dt] = max(matmul[dt], measure_matmul_flops(dt))
        # Decode roofline: one step reads every weight and the whole static-length KV cache.
        weight_bytes = n_params * jnp.dtype(dt).itemsize
        step_s = (ours_s - prefill_s) / max(after[2], 1)
        roofline_s = (weight_bytes + cache_bytes) / bandwidth
        by_dtype[dt] = {
            "tokens_per_s": round(tps, 1),
            "ratio_vs_transformers": round(tps / ref_tps, 2),
            "tokens_per_s_before_after_reference": [
                round(total_new / before[dt][0], 1),
                round(total_new / after[0], 1),
            ],
            "seconds": round(ours_s, 2),
            "prefill_seconds": round(prefill_s, 2),
            "decode_step_ms": round(step_s * 1e3, 1),
            "decode_bytes_per_step": int(weight_bytes + cache_bytes),
            "decode_roofline_ms": round(roofline_s * 1e3, 1),
            "roofline_fraction": round(roofline_s / step_s, 3),
            "matmul_gflop_s": round(matmul[dt] / 1e9, 1),
            "matmul_peak_fraction": round(step_flops / step_s / matmul[dt], 3),
            "num_compiles": engine.num_compiles,
        }
    head = by_dtype[dtypes[0]]
    return {
        "params": n_params,
        "dtype": dtypes[0],
        "tokens_per_s": head["tokens_per_s"],
        "reference_tokens_per_s": round(ref_tps, 1),
        "ratio_vs_transformers": head["ratio_vs_transformers"],
        "roofline_fraction": head["roofline_fraction"],
        "matmul_peak_fraction": head["matmul_peak_fraction"],
        "decode_step_ms": head["decode_step_ms"],
        "reference_seconds": round(ref_s, 2),
        "reference_measured_new_tokens": ref_new_tokens,
        "reference_extrapolated": ref_new_tokens != new_tokens,
        "reference_prefill_seconds": round(ref_prefill_s, 2),
        "reference_decode_step_ms": round(ref_step_s * 1e3, 1),
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "decode_flops_per_step": int(step_flops),
        "cache_slots_read_per_row": round(row_slots, 1),
        "cache_dtype": cache_dtype,
        "by_dtype": by_dtype,
    }


def main(argv: list[str] | None = None, prog: str = "mtgrpo bench rollout") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10m,100m", help=f"comma-separated, from {', '.join(SIZES)} (default 10m,100m)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 8 prompts x 32 tokens, n=4, 16 new tokens, 10m only"
    )
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--ref-new-tokens",
        type=int,
        default=None,
        help="new tokens the reference really generates, the rest extrapolated (default: all; "
        "16 makes the 100M reference several times shorter but flatters it)",
    )
    ap.add_argument(
        "--dtypes",
        default="float32",
        help="our parameter/activation dtypes, comma-separated from float32,bfloat16; the first is "
        "the headline, the others are measured around the same reference (default float32)",
    )
    ap.add_argument(
        "--cache-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="our KV cache dtype (default float32: XLA:CPU's bf16 attention dots are slow)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    ap.add_argument(
        "--reference-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="transformers' compute dtype (default float32, the reference the 3x target is "
        "stated against; the weights are the float32 ones either way)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.prompts, args.prompt_len, args.n, args.new_tokens = "10m", 8, 32, 4, 16
    for name in ("prompts", "prompt_len", "n", "new_tokens", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.ref_new_tokens is not None and args.ref_new_tokens <= 0:
        ap.error("--ref-new-tokens must be positive")
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes:
        ap.error(f"--dtypes: unknown dtype {bad[0] if bad else args.dtypes!r} (known: float32, bfloat16)")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        ap.error(f"unknown size {unknown[0] if unknown else args.sizes!r} (known: {', '.join(SIZES)})")

    import jax

    from mtgrpo_jax.models import kernels

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    bandwidth, copy_bandwidth = measure_bandwidth()
    matmul = measure_matmul_flops(dtypes[0])
    log(
        f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; measured read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (copy {copy_bandwidth / 1e9:.1f} GB/s), "
        f"{dtypes[0]} matmul {matmul / 1e9:.0f} GFLOP/s; CPU attention kernel: {kernels.available()}"
    )
    results = {}
    for name in sizes:
        results[name] = run_size(
            name,
            prompts=args.prompts,
            prompt_len=args.prompt_len,
            n=args.n,
            new_tokens=args.new_tokens,
            ref_new_tokens=args.ref_new_tokens,
            dtypes=dtypes,
            cache_dtype=args.cache_dtype,
            threads=args.threads,
            reference_dtype=args.reference_dtype,
            log=log,
        )
    report = {
        "setup": {
            "prompts": args.prompts,
            "prompt_len": args.prompt_len,
            "n": args.n,
            "new_tokens": args.new_tokens,
            "temperature": 1.0,
            "dtypes": list(dtypes),
            "cache_dtype": args.cache_dtype,
            "reference": f"transformers generate, torch CPU {args.reference_dtype}",
            "torch_threads": args.threads,
            "device": jax.devices()[0].device_kind,
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "copy_bandwidth_gb_s": round(copy_bandwidth / 1e9, 2),
            "matmul_gflop_s": round(matmul / 1e9, 1),
            "cpu_attention_kernel": kernels.available(),
        },
        "sizes": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"\n{'size':>6} {'dtype':>9} {'params':>8} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} "
            f"{'step ms':>8} {'roofline':>9} {'matmul':>7}"
        )
        for name, r in results.items():
            for dt, d in r["by_dtype"].items():
                print(
                    f"{name:>6} {dt:>9} {r['params'] / 1e6:7.1f}M {d['tokens_per_s']:11.1f} "
                    f"{r['reference_tokens_per_s']:9.1f} {d['ratio_vs_transformers']:5.2f}x "
                    f"{d['decode_step_ms']:8.1f} {d['roofline_fraction']:9.1%} {d['matmul_peak_fraction']:7.1%}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
