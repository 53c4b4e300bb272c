"""The NNX decoder against transformers' own torch models, and the KV-cache path against the full forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtgrpo_jax.models import KVCache, ModelConfig, Transformer, load_pretrained, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
CASES = {
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_theta=5e5, rope_scaling=LLAMA3_SCALING),
    ),
}


def _left_padded_batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 97, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), bool)
    mask[0, :4] = False
    mask[1, :1] = False
    ids[~mask] = 0
    return ids, mask


def _hf_model(case, tmp_path):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
    with torch.no_grad():  # random-init norms are all ones and biases zero: perturb so they matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = _hf_model(case, tmp_path)
    ids, mask = _left_padded_batch()
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    model = load_pretrained(tmp_path, dtype="float32")
    assert model.config.model_type == hf.config.model_type
    assert model.config.qk_norm == (case == "qwen3_qk_norm")
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))  # default positions = cumsum(mask)-1
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    diff = np.abs(np.asarray(logits) - ref)[mask].max()
    assert diff < 1e-4, diff
    assert np.abs(ref).max() > 0.1  # not trivially zero


def test_llama3_scaling_changes_the_function(tmp_path):
    """Guards the parity test above: with the scaling dropped the logits must differ."""
    _hf_model("llama3_rope_scaling", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    ids, mask = _left_padded_batch()
    scaled = load_pretrained(tmp_path, dtype="float32")
    for key in ("rope_scaling", "rope_parameters"):
        cfg.pop(key, None)
    cfg["rope_theta"] = 5e5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = load_pretrained(tmp_path, dtype="float32")
    assert plain.config.rope_scaling is None
    a, b = (
        scaled(jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
        plain(jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
    )
    assert np.abs(np.asarray(a) - np.asarray(b))[mask].max() > 1e-3


def _small_model(dtype=jnp.float32, **kw):
    cfg = ModelConfig(**{**COMMON, "num_hidden_layers": 3, **kw})
    return Transformer(cfg, rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype)


def test_cache_prefill_and_decode_equal_full_forward():
    model = _small_model(tie_word_embeddings=False)
    ids, mask = _left_padded_batch()
    b, t = ids.shape
    steps = 4
    new_tokens = np.random.RandomState(1).randint(1, 97, size=(b, steps)).astype(np.int32)
    full_ids = np.concatenate([ids, new_tokens], 1)
    full_mask = np.concatenate([mask, np.ones((b, steps), bool)], 1)
    full = np.asarray(model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask)))

    @nnx.jit
    def step(model, tokens, positions, cache, index, kv_mask):
        return model(tokens, positions=positions, cache=cache, cache_index=index, kv_mask=kv_mask)

    max_len = t + steps + 3  # slack slots beyond the sequence must be ignored via kv_mask
    cache = model.init_cache(b, max_len, dtype=jnp.float32)
    assert isinstance(cache, KVCache) and cache.k.shape == (3, b, max_len, 2, 8)
    kv_mask = np.zeros((b, max_len), bool)
    kv_mask[:, :t] = mask
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    logits, cache = step(model, ids, positions, cache, jnp.int32(0), kv_mask)
    np.testing.assert_allclose(np.asarray(logits)[mask], full[:, :t][mask], atol=1e-5)
    next_pos = positions[:, -1] + 1
    for i in range(steps):
        kv_mask[:, t + i] = True
        logits, cache = step(model, new_tokens[:, i : i + 1], next_pos[:, None] + i, cache, jnp.int32(t + i), kv_mask)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t + i], atol=1e-5)


def test_decode_value_sum_cpu_and_accelerator_forms_agree(monkeypatch):
    """The decode step's probability-weighted value sums: the CPU form (a fused multiply-and-sum) and
    the accelerators' (a batched dot) give the einsum's numbers. CI has no accelerator, so the dot
    form is selected here by the backend name it checks."""
    from mtgrpo_jax.models import decode

    rng = np.random.default_rng(0)
    weights = rng.random((2, 3, 4, 2, 5)).astype(np.float32)  # [Bp, Hkv, n, G, S]
    prefix = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)  # [Bp, Hkv, S, D]: shared by n samples
    block = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)  # [Bp, Hkv, n, S, D]: per sample
    for backend in ("cpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        for values, spec in ((prefix, "bkngs,bksd->bkngd"), (block, "bkngs,bknsd->bkngd")):
            got = decode._value_sum(jnp.asarray(weights), jnp.asarray(values))
            np.testing.assert_allclose(np.asarray(got), np.einsum(spec, weights, values), rtol=1e-5, atol=1e-6)


def test_cache_chunked_prefill_equals_full_forward():
    """Several tokens at a non-zero cache index (chunked prefill / multi-token append)."""
    model = _small_model(model_type="qwen3", head_dim=8, attention_bias=False, qk_norm=True)
    ids = np.random.RandomState(2).randint(1, 97, size=(2, 10)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids)))
    cache = model.init_cache(2, 12, dtype=jnp.float32)
    kv_mask = np.zeros((2, 12), bool)
    kv_mask[:, :10] = True  # a slot may be marked valid early: causality comes from s <= idx + t
    out1, cache = model(ids[:, :6], cache=cache, cache_index=0, kv_mask=kv_mask)
    out2, cache = model(ids[:, 6:], cache=cache, cache_index=6, kv_mask=kv_mask)
    np.testing.assert_allclose(np.concatenate([out1, out2], 1), full, atol=1e-5)


def test_bf16_defaults_and_trunk_logits_split():
    model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    assert model.embed[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 2048, size=(2, 5)), jnp.int32)

    @nnx.jit
    def both(model, ids):
        hidden = model.trunk(ids)
        return hidden, model.logits(hidden), model(ids)

    hidden, logits, direct = both(model, ids)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 5, 128)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5, 2048)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(direct))
    assert np.isfinite(np.asarray(logits)).all()


def test_fully_padded_rows_stay_finite_and_do_not_leak():
    model = _small_model()
    ids, mask = _left_padded_batch()
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.isfinite(out).all()
    ids2 = ids.copy()
    ids2[~mask] = 5  # pad token contents must not change non-pad logits
    out2 = np.asarray(model(jnp.asarray(ids2), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out2[mask], out[mask], atol=1e-6)


def test_tiny_config_is_small_qwen2_and_remat_is_equivalent():
    cfg = tiny_config()
    assert cfg.model_type == "qwen2" and cfg.vocab_size == 2048 and cfg.tie_word_embeddings
    assert 1_000_000 <= cfg.num_params() <= 3_000_000
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.num_params()
    ids = jnp.ones((1, 4), jnp.int32)

    def loss(m):
        return m(ids).mean()

    g1 = nnx.jit(nnx.grad(loss))(model)
    model.remat = True
    g2 = nnx.jit(nnx.grad(loss))(model)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_hf_round_trip_and_bad_configs(tmp_path):
    for cfg in [
        tiny_config(),
        ModelConfig(
            model_type="llama",
            attention_bias=False,
            tie_word_embeddings=False,
            rope_scaling=LLAMA3_SCALING,
            eos_token_id=[1, 2],
        ),
        ModelConfig(model_type="qwen3", head_dim=64, attention_bias=False, qk_norm=True),
    ]:
        assert ModelConfig.from_hf(cfg.to_hf_dict()) == cfg
        hash(cfg)
    hf = tiny_config().to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps({**hf, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf({**hf, "model_type": "gpt2", "architectures": None})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf({**hf, "rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_key_value_heads 3"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
