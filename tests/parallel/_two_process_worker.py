"""One of the two processes of tests/parallel/test_distributed.py::test_two_processes_sharded_forward.

argv: coordinator_address process_id checkpoint_dir inputs.npz out.npy. Each process sees 4 fake CPU
devices; together they form the 8-device data 2 x fsdp 2 x tensor 2 mesh."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mtgrpo_jax.models import load_pretrained, save_pretrained  # noqa: E402
from mtgrpo_jax.parallel import batch_sharding, initialize_distributed, make_mesh  # noqa: E402


def main() -> None:
    coordinator, process_id, ckpt, inputs, out = sys.argv[1:6]
    assert initialize_distributed(coordinator, 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = load_pretrained(ckpt, dtype="float32", mesh=mesh)  # each process reads only its shards
    embed = nnx.state(model)["embed"].get_value()
    assert not embed.is_fully_addressable and len(embed.addressable_shards) == 4

    data = np.load(inputs)
    ids, mask = data["ids"], data["mask"]
    sharding = batch_sharding(mesh, 2)
    ids = jax.make_array_from_callback(ids.shape, sharding, lambda idx: ids[idx])
    mask = jax.make_array_from_callback(mask.shape, sharding, lambda idx: mask[idx])
    with jax.set_mesh(mesh):  # the model's forward across both processes' devices
        logits = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)
    logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    if jax.process_index() == 0:
        np.save(out, logits)
    save_pretrained(model, out + ".resaved")  # collective gather of the sharded params; process 0 writes
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
