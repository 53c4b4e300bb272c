"""NNX decoder models (Qwen2/2.5, Qwen3, Llama 3.x), Hugging Face weight I/O and tokenizers.

The contract other rooms code against (see each object's docstring)::

    cfg = ModelConfig(...) / ModelConfig.from_hf(path_or_dict) / tiny_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        remat="none" | "block" | <jax.checkpoint_policies name>, attention="auto" | "xla" | "splash" | "cudnn")
    logits = model(input_ids, positions=None, attention_mask=None)          # float32 [B, T, V]
    hidden = model.trunk(input_ids, positions=..., attention_mask=...)      # [B, T, H]
    logits = model.logits(hidden)                                          # float32 [B, T, V]
    cache = model.init_cache(batch_size, max_len, dtype=jnp.bfloat16)     # KVCache(k, v) [L, B, S, Hkv, D]
    logits, cache = model(ids, positions=pos, cache=cache, cache_index=idx, kv_mask=kv_mask)
    hidden, cache = model.trunk(ids, positions=pos, cache=cache, cache_index=idx, kv_mask=kv_mask)
    # one-token decoding (the rollout loop; see models/decode.py):
    weights = model.decode_weights(); prefix = model.decode_prefix(prefilled_cache, prompt_mask, dtype)
    logits, decode_cache = model.decode_step(weights, prefix, decode_cache, tokens, positions, slot, blocks=...)

Cache semantics: the T new tokens are written at slots [idx, idx+T); query t (slot idx+t) attends to
slot s iff s <= idx+t and kv_mask[b, s]. Without a cache, positions default to cumsum(mask)-1 (clipped
at 0) so left-padded prompts get the positions they would have unpadded; with a cache they default to
idx + arange(T), so pass them explicitly for left-padded batches.
"""

from mtgrpo_jax.models import decode
from mtgrpo_jax.models.attention import ATTENTION_IMPLEMENTATIONS, causal_attention, resolve_attention
from mtgrpo_jax.models.config import ModelConfig, tiny_config
from mtgrpo_jax.models.hf_io import load_pretrained, save_pretrained
from mtgrpo_jax.models.tokenizer import encode_prompt, load_tokenizer, prompt_text
from mtgrpo_jax.models.transformer import REMAT_CHOICES, KVCache, Transformer, remat_name

__all__ = [
    "decode",
    "ModelConfig",
    "Transformer",
    "KVCache",
    "load_pretrained",
    "save_pretrained",
    "load_tokenizer",
    "prompt_text",
    "encode_prompt",
    "tiny_config",
    "ATTENTION_IMPLEMENTATIONS",
    "causal_attention",
    "resolve_attention",
    "REMAT_CHOICES",
    "remat_name",
]
