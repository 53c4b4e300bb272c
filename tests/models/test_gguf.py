"""`mtgrpo convert`: GGUF -> HF layout. A tiny random Llama / Qwen2 is written as llama.cpp writes it (q/k rows
permuted for Llama, one tensor Q8_0-quantised), converted, loaded by `load_pretrained`, and its logits compared
with transformers' model holding the same (dequantised) weights. The real SmolLM2 file is in tests/real/."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from mtgrpo_jax.models import load_pretrained  # noqa: E402
from mtgrpo_jax.models.gguf import convert_gguf, main, unpermute_rotary_rows  # noqa: E402

DIMS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=128,
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**DIMS, tie_word_embeddings=False, attention_bias=False))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**DIMS, tie_word_embeddings=True))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(DIMS["num_hidden_layers"])
    w.add_context_length(DIMS["max_position_embeddings"])
    w.add_embedding_length(DIMS["hidden_size"])
    w.add_feed_forward_length(DIMS["intermediate_size"])
    w.add_head_count(DIMS["num_attention_heads"])
    w.add_head_count_kv(DIMS["num_key_value_heads"])
    w.add_layer_norm_rms_eps(DIMS["rms_norm_eps"])
    w.add_rope_freq_base(DIMS["rope_theta"])
    w.add_vocab_size(DIMS["vocab_size"])
    # The embedding as Q8_0 (what SmolLM2's file holds); the reference model gets its dequantised value.
    emb = sd["model.embed_tokens.weight"]
    q8 = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    emb_deq = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0).reshape(emb.shape)
    hf.model.embed_tokens.weight.data = torch.from_numpy(emb_deq.copy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and arch == "llama":
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(DIMS["num_hidden_layers"]):
        for hf_suffix, g_suffix in names.items():
            t = sd.get(f"model.layers.{i}.{hf_suffix}")
            if t is None:
                continue
            if arch == "llama" and g_suffix in ("attn_q.weight", "attn_k.weight"):
                heads = DIMS["num_attention_heads"] if g_suffix == "attn_q.weight" else DIMS["num_key_value_heads"]
                t = llama_cpp_permute(t, heads)
            w.add_tensor(f"blk.{i}.{g_suffix}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf.eval()


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(4 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary_rows(llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_gguf_matches_the_hf_model(tmp_path, arch, dtype):
    path = tmp_path / "m.gguf"
    hf = _write_gguf(path, arch)
    out = convert_gguf(path, tmp_path / "hf", dtype=dtype, tokenizer=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] == (arch == "qwen2")
    assert cfg["attention_bias"] == (arch == "qwen2") and cfg["torch_dtype"] == dtype
    ids = np.random.default_rng(1).integers(0, DIMS["vocab_size"], size=(2, 12))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(load_pretrained(out, dtype="float32")(jnp.asarray(ids)))
    tol = 1e-4 if dtype == "float32" else 3e-2  # bfloat16 weights: 8 bits of mantissa
    np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)


def test_convert_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["--gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a readable GGUF file" in err and len(err.splitlines()) == 1
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), arch="gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["--gguf", str(tmp_path / "gpt2.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF architecture 'gpt2' is not supported" in capsys.readouterr().err
