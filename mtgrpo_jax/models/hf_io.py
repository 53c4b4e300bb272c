"""Hugging Face checkpoints <-> the NNX `Transformer`.

Loading never builds a full host copy of the model per device: each parameter is created with
`jax.make_array_from_callback`, whose callback reads exactly the slice a device owns from the
memory-mapped safetensors file(s) (safetensors' lazy `get_slice`). In a multi-host run every process
therefore reads only its own shards. Saving gathers one parameter at a time and writes the HF layout
(`model.safetensors` or `model-0000i-of-0000n.safetensors` + index, and `config.json`) so a trained
policy opens in `transformers.AutoModelForCausalLM`.

HF linear weights are `[out, in]`; ours are `[in, ..., out]` with heads as their own axis and layers
stacked. `_TensorMap.groups` records, for each HF axis, which of our axes it holds (major to minor), so
one routine can translate a slice of ours into a slice of theirs and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors' numpy reader can return it)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mtgrpo_jax.models.config import ModelConfig
from mtgrpo_jax.models.transformer import Transformer

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _TensorMap:
    path: tuple[str, ...]  # our nnx state path
    hf_name: str  # "{i}" is the layer index for stacked parameters
    groups: tuple[tuple[int, ...], ...]  # per HF axis: our (per-layer) axes it holds, major -> minor
    stacked: bool


def _tensor_maps(cfg: ModelConfig) -> list[_TensorMap]:
    a = "model.layers.{i}.self_attn."
    m = "model.layers.{i}.mlp."
    maps = [
        _TensorMap(("embed",), "model.embed_tokens.weight", ((0,), (1,)), False),
        _TensorMap(("final_norm",), "model.norm.weight", ((0,),), False),
        _TensorMap(("layers", "input_norm"), "model.layers.{i}.input_layernorm.weight", ((0,),), True),
        _TensorMap(("layers", "post_attn_norm"), "model.layers.{i}.post_attention_layernorm.weight", ((0,),), True),
        _TensorMap(("layers", "q_proj"), a + "q_proj.weight", ((1, 2), (0,)), True),  # [Nq*D, H] <- [H, Nq, D]
        _TensorMap(("layers", "k_proj"), a + "k_proj.weight", ((1, 2), (0,)), True),
        _TensorMap(("layers", "v_proj"), a + "v_proj.weight", ((1, 2), (0,)), True),
        _TensorMap(("layers", "o_proj"), a + "o_proj.weight", ((2,), (0, 1)), True),  # [H, Nq*D] <- [Nq, D, H]
        _TensorMap(("layers", "gate_proj"), m + "gate_proj.weight", ((1,), (0,)), True),
        _TensorMap(("layers", "up_proj"), m + "up_proj.weight", ((1,), (0,)), True),
        _TensorMap(("layers", "down_proj"), m + "down_proj.weight", ((1,), (0,)), True),
    ]
    if cfg.attention_bias:
        maps += [_TensorMap(("layers", f"{x}_bias"), a + f"{x}_proj.bias", ((0, 1),), True) for x in "qkv"]
    if cfg.o_proj_bias:
        maps.append(_TensorMap(("layers", "o_bias"), a + "o_proj.bias", ((0,),), True))
    if cfg.qk_norm:
        maps += [_TensorMap(("layers", f"{x}_norm"), a + f"{x}_norm.weight", ((0,),), True) for x in "qk"]
    if not cfg.tie_word_embeddings:
        maps.append(_TensorMap(("lm_head",), "lm_head.weight", ((1,), (0,)), False))
    return maps


def _hf_shape(tm: _TensorMap, ours: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(ours[a] for a in g) for g in tm.groups)


def _to_ours(tm: _TensorMap, hf: np.ndarray, ours_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The `index` slice (per-layer axes) of our tensor, read from an HF tensor or lazy HF slice.

    Each HF axis is sliced by its major-most group axis (contiguous in memory); the minor axes are read
    whole and cut after the reshape."""
    hf_index, inter_shape, inter_axes = [], [], []
    for g in tm.groups:
        major, minor = g[0], g[1:]
        s = index[major]
        inner = math.prod(ours_shape[x] for x in minor)
        hf_index.append(slice(s.start * inner, s.stop * inner))
        inter_shape += [s.stop - s.start] + [ours_shape[x] for x in minor]
        inter_axes += list(g)
    arr = np.asarray(hf[tuple(hf_index)]).reshape(inter_shape)
    arr = arr.transpose([inter_axes.index(x) for x in range(len(ours_shape))])
    majors = {g[0] for g in tm.groups}
    return arr[tuple(slice(None) if x in majors else index[x] for x in range(len(ours_shape)))]


def _to_hf(tm: _TensorMap, ours: np.ndarray) -> np.ndarray:
    order = [x for g in tm.groups for x in g]
    return np.ascontiguousarray(ours.transpose(order).reshape(_hf_shape(tm, ours.shape)))


# --------------------------------------------------------------------------- reading checkpoints
def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory, or a Hub repo id fetched through huggingface_hub (config + safetensors)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model directory {name!r} does not exist (and is not a Hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise OSError(
            f"could not fetch Hub repo {name!r} (no network or HF_HUB_OFFLINE=1, or not a public "
            f"repo?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single file or a sharded checkpoint with its index."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: ckpt / fname for name, fname in weight_map.items()}
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {ckpt}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="numpy") as h:
            out.update({name: f for name in h.keys()})
    return out


@contextlib.contextmanager
def _open_all(files: set[Path]) -> Iterator[dict[Path, Any]]:
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in sorted(files):
            if not f.is_file():
                raise FileNotFoundError(f"safetensors file {f} named in the index does not exist")
            handles[f] = stack.enter_context(safe_open(f, framework="numpy"))
        yield handles


def _as_dtype(dtype: str | Any) -> np.dtype:
    try:
        return jnp.dtype(_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})") from None


def load_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: str | Any = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    layout: str = "train",
    param_dtype: str | Any | None = None,
    remat: bool | str = "none",
    attention: str = "auto",
) -> Transformer:
    """Builds a `Transformer` from an HF checkpoint (local dir or Hub repo id).

    `dtype` is the activation dtype and, unless `param_dtype` says otherwise (e.g. float32 master
    weights for training with bf16 compute), the parameter dtype. With `mesh`, parameters are created
    directly in `layout` ("train" or "serve", see `mtgrpo_jax.parallel`); without, on the default device.
    `remat` and `attention` are the `Transformer`'s."""
    dtype = _as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else _as_dtype(param_dtype)
    ckpt = resolve_checkpoint(path_or_repo_id)
    cfg = ModelConfig.from_hf(ckpt)
    files = _weight_files(ckpt)
    model = nnx.eval_shape(
        lambda: Transformer(
            cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention
        )
    )
    graphdef, state = nnx.split(model)
    shardings = None
    if mesh is not None:
        from mtgrpo_jax.parallel.sharding import state_shardings

        shardings = nnx.to_flat_state(state_shardings(state, mesh, layout))
        shardings = {path: var.get_value() for path, var in shardings}
    maps = {tm.path: tm for tm in _tensor_maps(cfg)}
    flat = nnx.to_flat_state(state)
    if set(maps) != {path for path, _ in flat}:
        raise AssertionError(f"internal: tensor map {sorted(maps)} != model state {[p for p, _ in flat]}")

    expected = {}
    for tm in maps.values():
        var = dict(flat)[tm.path]
        per_layer = tuple(var.get_value().shape[1:] if tm.stacked else var.get_value().shape)
        names = [tm.hf_name.format(i=i) for i in range(cfg.num_hidden_layers)] if tm.stacked else [tm.hf_name]
        for name in names:
            expected[name] = _hf_shape(tm, per_layer)
    missing = [n for n in expected if n not in files]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt} is missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = [
        n
        for n in files
        if n not in expected
        and not n.endswith(_IGNORED_TENSOR_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if extra:
        raise ValueError(
            f"checkpoint {ckpt} has unexpected tensor {extra[0]!r} for a {cfg.model_type} model with "
            f"{cfg.num_hidden_layers} layers" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )

    with _open_all({files[n] for n in expected}) as handles:
        slices = {name: handles[files[name]].get_slice(name) for name in expected}
        for name, shape in expected.items():
            found = tuple(slices[name].get_shape())
            if found != shape:
                raise ValueError(
                    f"tensor {name!r} in {files[name].name} has shape {list(found)}, expected {list(shape)}"
                )

        def make(path, var):
            tm = maps[path]
            shape = tuple(var.get_value().shape)
            per_layer = shape[1:] if tm.stacked else shape

            def read(index: tuple[slice, ...]) -> np.ndarray:
                index = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))
                if not tm.stacked:
                    return _to_ours(tm, slices[tm.hf_name], per_layer, index).astype(param_dtype)
                layers = [
                    _to_ours(tm, slices[tm.hf_name.format(i=i)], per_layer, index[1:])
                    for i in range(index[0].start, index[0].stop)
                ]
                return np.stack(layers).astype(param_dtype)

            if shardings is None:
                full = tuple(slice(0, d) for d in shape)
                return var.copy(jnp.asarray(read(full)))
            return var.copy(jax.make_array_from_callback(shape, shardings[path], read))

        state = nnx.from_flat_state([(path, make(path, var)) for path, var in flat])
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- writing checkpoints
def _host_value(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes `config.json` and safetensors in the Hugging Face layout, in the parameters' dtype.

    Checkpoints above `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. In a multi-process run every process must call this (sharded
    parameters are gathered collectively); only process 0 writes."""
    cfg: ModelConfig = model.config
    out = Path(out_dir)
    writer = jax.process_index() == 0
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for tm in _tensor_maps(cfg):
        value = _host_value(flat[tm.path].get_value())
        tensors = (
            {tm.hf_name.format(i=i): _to_hf(tm, value[i]) for i in range(value.shape[0])}
            if tm.stacked
            else {tm.hf_name: _to_hf(tm, value)}
        )
        for name, t in tensors.items():
            if size + t.nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += t.nbytes
    if not writer:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous save with another sharding would confuse loaders
    hf_config = cfg.to_hf_dict()
    hf_config["torch_dtype"] = hf_config["dtype"] = str(np.dtype(model.param_dtype).name)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=metadata)
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata=metadata)
        weight_map.update({name: fname for name in shard})
        total += sum(t.nbytes for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
