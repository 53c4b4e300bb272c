"""`ModelConfig`: the one description of a decoder that the NNX model, the weight I/O and the
sharding rules all read. It maps to and from Hugging Face `config.json` for the three supported
families (Qwen2/2.5, Qwen3, Llama 3.x); anything outside them fails loudly instead of silently
building a subtly different network."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_model"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (HF names, so configs read across 1:1).

    `attention_bias` is the bias of the q/k/v projections (always on for Qwen2; Llama and Qwen3 put
    the same flag on o_proj too, see `o_proj_bias`). `qk_norm` is Qwen3's per-head RMSNorm of q and k.
    `rope_scaling` is None or a dict with "rope_type" in ("default", "linear", "llama3") and that
    type's fields (HF's `rope_scaling` / the non-theta part of `rope_parameters`).
    """

    model_type: str = "qwen2"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            scaling = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_theta")}
            scaling["rope_type"] = rope_type
            object.__setattr__(self, "rope_scaling", None if rope_type == "default" else scaling)
        if isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", list(self.eos_token_id))

    # A dict field makes the generated hash fail; nnx needs a hashable static config for jit caching.
    def __hash__(self):
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def o_proj_bias(self) -> bool:
        """Llama and Qwen3 apply `attention_bias` to o_proj as well; Qwen2 never biases o_proj."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def eos_token_ids(self) -> list[int]:
        """`eos_token_id` as a list (HF allows an int, a list or nothing)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_params(self) -> int:
        h, d, i, l = self.hidden_size, self.head_dim, self.intermediate_size, self.num_hidden_layers
        nq, nkv = self.num_attention_heads, self.num_key_value_heads
        attn = h * d * (nq + 2 * nkv) + nq * d * h
        attn += d * (nq + 2 * nkv) if self.attention_bias else 0
        attn += h if self.o_proj_bias else 0
        attn += 2 * d if self.qk_norm else 0
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + l * per_layer + h + head

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Reads a Hugging Face `config.json` (a dict, the file, or the directory holding it).

        Accepts both the transformers<5 spelling (`rope_theta` + `rope_scaling`) and the v5 one
        (`rope_parameters`)."""
        where = "config"
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            where = str(path)
            hf = json.loads(path.read_text())
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        supported = sorted(ARCHITECTURES.values())
        bad_archs = [a for a in archs if a not in supported]
        if model_type not in SUPPORTED_MODEL_TYPES or bad_archs:
            culprit = bad_archs[0] if bad_archs else model_type
            raise ValueError(f"unsupported architecture {culprit!r} in {where} (supported: {', '.join(supported)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {where} (only silu)")
        if hf.get("mlp_bias", False):
            raise ValueError(f"unsupported mlp_bias=true in {where}")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"unsupported use_sliding_window=true in {where}")

        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope or hf.get("rope_scaling") or None
        num_heads = hf["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") if model_type != "qwen2" else None,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type != "llama")),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers needs to rebuild this model. Writes both rope spellings
        (`rope_parameters` for transformers>=5, `rope_theta`/`rope_scaling` for older readers)."""
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has q/k/v bias; attention_bias=False cannot be written as a Qwen2 config")
        if self.model_type != "qwen3" and self.qk_norm:
            raise ValueError(f"qk_norm exists only in qwen3, not {self.model_type}")
        if self.model_type == "qwen3" and not self.qk_norm:
            raise ValueError("qwen3 always has q/k norm; qk_norm=False cannot be written as a Qwen3 config")
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out


def tiny_config() -> ModelConfig:
    """The bundled ~1M-parameter Qwen2-type config (vocab 2048, tied embeddings) that the demo and
    the tests use with the bundled tiny tokenizer."""
    return ModelConfig.from_hf(_TINY_MODEL_DIR)
