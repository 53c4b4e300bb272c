"""Meshes, partition rules and the model's forward under them on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mtgrpo_jax.models import ModelConfig, Transformer, load_pretrained, save_pretrained
from mtgrpo_jax.parallel import batch_sharding, logical_to_spec, make_mesh, shard_model

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
    return make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def batch():
    ids = np.random.RandomState(0).randint(1, 96, size=(4, 8)).astype(np.int32)
    mask = np.ones((4, 8), bool)
    mask[0, :3] = False
    mask[2, :6] = False
    return ids, mask


def _model():
    return Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


def _unsharded(model, ids, mask):
    return np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask)))


def _on_mesh(model, mesh, ids, mask):
    """The model's forward as the trainer runs it: its (sharded) parameters as they are, the batch over
    (data, fsdp), the mesh active so that the model's activation constraints apply."""
    ids, mask = (jax.device_put(x, batch_sharding(mesh, 2)) for x in (ids, mask))
    with jax.set_mesh(mesh):
        return nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)


# The model's KV cache [L, B, S, Hkv, D]: batch over (data, fsdp), kv heads over tensor.
CACHE_SPEC = P(None, ("data", "fsdp"), None, "tensor", None)


def test_make_mesh(mesh):
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}  # fsdp=-1 absorbs the rest
    with pytest.raises(ValueError, match="data=2 x fsdp=2 x tensor=3 = 12 devices does not match the 8"):
        make_mesh(data=2, fsdp=2, tensor=3)
    with pytest.raises(ValueError, match="data=1 x fsdp=-1 x tensor=3 does not divide the 8"):
        make_mesh(tensor=3)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)


def test_partition_rules(mesh):
    q_proj = ("layers", "embed", "heads", "head_dim")
    assert logical_to_spec(q_proj, (2, 32, 4, 8), mesh, "train") == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(q_proj, (2, 32, 4, 8), mesh, "serve") == P(None, None, "tensor", None)
    # a dim the mesh axis does not divide stays replicated instead of failing
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 32, 1, 8), mesh, "train") == P(
        None, "fsdp", None, None
    )
    with pytest.raises(ValueError, match="unknown sharding layout 'pipeline'"):
        logical_to_spec(q_proj, (2, 32, 4, 8), mesh, "pipeline")


@pytest.mark.parametrize("layout", ["train", "serve"])
def test_sharded_forward_equals_unsharded(mesh, batch, layout):
    ids, mask = batch
    model = _model()
    reference = _unsharded(model, ids, mask)
    shard_model(model, mesh, layout)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    q = params[("layers", "q_proj")].get_value()
    if layout == "train":
        assert q.sharding.spec == P(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)  # a quarter of the tensor per device
        assert params[("lm_head",)].get_value().sharding.spec == P("fsdp", "tensor")
    else:
        assert q.sharding.spec == P(None, None, "tensor", None)  # replicated over data and fsdp
        assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)
    assert all(
        not v.get_value().sharding.is_fully_replicated
        for k, v in params.items()
        if k[-1] not in ("input_norm", "post_attn_norm", "final_norm")
    )
    logits = _on_mesh(model, mesh, ids, mask)
    assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")  # the model's own logits constraint
    np.testing.assert_allclose(np.asarray(logits)[mask], reference[mask], atol=1e-5)


def test_load_pretrained_into_mesh_and_reshard(mesh, batch, tmp_path):
    ids, mask = batch
    model = _model()
    reference = _unsharded(model, ids, mask)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype="float32", mesh=mesh, layout="train")
    embed = loaded.embed.get_value()
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in embed.addressable_shards} == {(48, 16)}
    np.testing.assert_array_equal(np.asarray(embed), np.asarray(model.embed.get_value()))
    shard_model(loaded, mesh, "serve")  # train -> serve reshard, values unchanged
    assert loaded.layers.down_proj.get_value().sharding.spec == P(None, "tensor", None)
    logits = _on_mesh(loaded, mesh, ids, mask)
    np.testing.assert_allclose(np.asarray(logits)[mask], reference[mask], atol=1e-5)


def test_cache_decode_under_mesh(mesh, batch):
    """The KV-cache path compiles and agrees under a mesh with serve-layout params and a sharded cache."""
    ids, mask = batch
    model = _model()
    reference = _unsharded(model, ids, mask)
    shard_model(model, mesh, "serve")
    cache = model.init_cache(4, 8, dtype=jnp.float32)
    cache = jax.device_put(cache, NamedSharding(mesh, CACHE_SPEC))
    positions = np.maximum(mask.cumsum(1) - 1, 0)

    @nnx.jit
    def prefill(model, ids, positions, cache, kv_mask):
        return model(ids, positions=positions, cache=cache, cache_index=0, kv_mask=kv_mask)

    with jax.set_mesh(mesh):
        logits, cache = prefill(model, jax.device_put(ids, batch_sharding(mesh)), positions, cache, mask)
    assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, CACHE_SPEC), 5)  # the model keeps that layout
    np.testing.assert_allclose(np.asarray(logits)[mask], reference[mask], atol=1e-5)


def test_divisible_spec_is_the_one_placement_rule():
    """One rule for parameters, activations and the rollout's caches: a dimension goes over its mesh axes
    when their product divides it, else it is replicated; size-1 and missing axes drop out; an axis is
    used once."""
    from mtgrpo_jax.parallel import divisible_spec

    sizes = {"data": 2, "fsdp": 2, "tensor": 2, "unused": 1}
    assert divisible_spec((8, 6, 4), (("data", "fsdp"), None, "tensor"), sizes) == P(("data", "fsdp"), None, "tensor")
    assert divisible_spec((6, 3), (("data", "fsdp"), "tensor"), sizes) == P(None, None)  # 4 does not divide 6
    assert divisible_spec((4, 4), (("data", "unused"), "data"), sizes) == P("data", None)  # data used once
    assert divisible_spec((4,), ("pipeline",), sizes) == P(None)
