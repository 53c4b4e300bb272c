"""GGUF (llama.cpp's file format) -> the Hugging Face layout `load_pretrained` reads.

`convert_gguf(FILE, OUT)` dequantises every tensor with the `gguf` package's reference NumPy kernels,
renames it to the HF name, writes `config.json` + safetensors (float32 or bfloat16), and carries the
tokenizer (vocabulary, merges, special tokens, chat template) over through transformers' own GGUF
tokenizer reader. Llama and Qwen2 architectures.

llama.cpp's converter permutes the rows of a Llama checkpoint's q and k projections so its rotary
kernel can rotate adjacent pairs (HF rotates the two halves of each head); this undoes that
permutation, as transformers does when it reads a GGUF. Qwen2 GGUFs are written unpermuted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_OUT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# GGUF tensor name -> HF name ("{i}": the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    """The HF tensor name of a GGUF tensor name (ValueError for one this converter does not know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in this converter")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (pair p, member m) go back to HF's
    (half m, index p). `weight` is [num_heads * head_dim, ...] (a weight or a bias)."""
    head_dim = weight.shape[0] // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def hf_config(reader) -> dict[str, Any]:
    """config.json for the GGUF's model (architecture metadata -> HF fields)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            "GGUF has a rope_freqs tensor (Llama 3.1-style rope scaling), which this converter does "
            "not map back to HF's rope_scaling; convert that model from its HF checkpoint instead"
        )

    def arch_field(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(arch_field("attention.head_count"))
    hidden = int(arch_field("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(arch_field("vocab_size", len(tokens) if tokens is not None else 0))
    if vocab <= 0:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    cfg: dict[str, Any] = {
        "architectures": [_HF_ARCH[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(arch_field("feed_forward_length")),
        "num_hidden_layers": int(arch_field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(arch_field("attention.head_count_kv", heads)),
        "rms_norm_eps": float(arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(arch_field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(arch_field("context_length", 2048)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    key_length = arch_field("attention.key_length")
    if key_length is not None and int(key_length) != hidden // heads:
        cfg["head_dim"] = int(key_length)
    scaling = arch_field("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(arch_field("rope.scaling.factor"))}
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf_key] = int(value)
    return cfg


def _convert_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer: bool = True,
) -> Path:
    """Writes the HF layout of a GGUF model into `out_dir` and returns it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_OUT_DTYPES)}, got {dtype!r}")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # a wrong or damaged file: say which, in one line
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    cfg = hf_config(reader)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    # Tensors are dequantised one at a time and written in shards, so memory holds at most a shard.
    out_dtype = _OUT_DTYPES[dtype]
    permute = cfg["model_type"] == "llama"
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(pending, out / fname, metadata={"format": "pt"})
        shards.append(fname)
        weight_map.update({name: fname for name in pending})
        pending, pending_bytes = {}, 0

    for t in reader.tensors:
        name = hf_name(t.name)
        # GGUF shapes list the fastest axis first; the dequantised array is in NumPy (row-major) order.
        weight = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))
        )
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            weight = unpermute_rotary_rows(weight, heads)
        weight = np.ascontiguousarray(weight.astype(out_dtype))
        if pending and pending_bytes + weight.nbytes > max_shard_bytes:
            flush()
        pending[name] = weight
        pending_bytes += weight.nbytes
        total += weight.nbytes
    flush()

    # One file: the plain name; several: HF's numbered names plus an index.
    if len(shards) == 1:
        (out / shards[0]).rename(out / "model.safetensors")
    else:
        renamed = {}
        for i, fname in enumerate(shards):
            new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (out / fname).rename(out / new)
            renamed[fname] = new
        index = {"metadata": {"total_size": total}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer:
        _convert_tokenizer(gguf_path, out)
    return out


def main(argv: list[str], prog: str = "mtgrpo convert") -> int:
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert a GGUF model (Llama or Qwen2 architecture) to the "
        "Hugging Face layout (config.json, safetensors, tokenizer).",
    )
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=sorted(_OUT_DTYPES), default="float32", help="dtype of the written weights")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    print(
        f"{prog}: wrote {cfg['architectures'][0]} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}, {args.dtype}) to {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0
