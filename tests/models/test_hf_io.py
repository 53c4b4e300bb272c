"""Hugging Face checkpoint I/O: exact round trips, transformers reading what we write, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mtgrpo_jax.models import ModelConfig, Transformer, load_pretrained, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _params(model):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_load_save_load_is_exact(tmp_path, dtype):
    cfg = ModelConfig(
        model_type="qwen3",
        head_dim=16,
        attention_bias=False,
        qk_norm=True,
        tie_word_embeddings=False,
        eos_token_id=[1, 2],
        **CFG,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(3), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    save_pretrained(model, tmp_path / "a")
    first = load_pretrained(tmp_path / "a", dtype=dtype)
    assert first.config == cfg
    _assert_same_params(model, first)
    save_pretrained(first, tmp_path / "b")
    second = load_pretrained(tmp_path / "b", dtype=dtype)
    _assert_same_params(first, second)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("qwen2", dict(tie_word_embeddings=True)),
        (
            "llama",
            dict(
                attention_bias=True,
                tie_word_embeddings=False,  # o_proj bias too
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 4.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
        ),
    ],
)
def test_transformers_loads_what_we_save(tmp_path, model_type, extra):
    cfg = ModelConfig(model_type=model_type, **CFG, **extra)
    model = Transformer(cfg, rngs=nnx.Rngs(4), dtype=jnp.float32, param_dtype=jnp.float32)
    for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_value(var.get_value() + 0.05)  # non-trivial norms and biases
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    ids = np.random.RandomState(0).randint(1, 97, size=(2, 6))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref).max() < 1e-4


def test_sharded_checkpoint_with_index(tmp_path):
    cfg = ModelConfig(**CFG)
    model = Transformer(cfg, rngs=nnx.Rngs(5), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / f).is_file() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_params(model, load_pretrained(tmp_path, dtype="float32"))
    save_pretrained(model, tmp_path)  # re-saving as one file removes the stale shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_checkpoints_name_the_culprit(tmp_path):
    model = Transformer(ModelConfig(**CFG), rngs=nnx.Rngs(6), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"

    save_file(
        {k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_pretrained(tmp_path)

    save_file({**tensors, name: tensors[name][:, :-1]}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=rf"tensor '{name}' in model.safetensors has shape \[16, 31\], expected \[16, 32\]"
    ):
        load_pretrained(tmp_path)

    save_file(
        {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"})
    )
    with pytest.raises(ValueError, match="unsupported architecture 'GemmaForCausalLM'"):
        load_pretrained(tmp_path)


def test_missing_directory_and_offline_hub_repo(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_pretrained(tmp_path / "does-not-exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Hub repo 'Qwen/Qwen2.5-0.5B-Instruct'"):
        load_pretrained("Qwen/Qwen2.5-0.5B-Instruct")


def test_mixed_precision_load(tmp_path):
    model = Transformer(ModelConfig(**CFG), rngs=nnx.Rngs(7), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, tmp_path)
    mixed = load_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
    assert mixed.layers.q_proj[...].dtype == jnp.float32 and mixed.dtype == jnp.bfloat16
    _assert_same_params(model, mixed)
    assert mixed.trunk(jnp.ones((1, 3), jnp.int32)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp33'"):
        load_pretrained(tmp_path, dtype="fp33")
