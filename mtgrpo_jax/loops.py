"""`scan`: `jax.lax.scan` that a planner can ask to unroll, so XLA's cost analysis sees every trip.

XLA's `cost_analysis()` counts a while loop's body once, whatever its trip count, so a program whose
decoder layers or logprob chunks run under `lax.scan` reports a fraction of its FLOPs and bytes. Code
whose scans should count in full (the layer scan, the chunked logprob scans) calls `loops.scan`;
inside `with unrolled_scans():` those scans are traced with `unroll=True` (no while loop is emitted)
and `mtgrpo plan` compiles such a variant for its cost only. Outside it they are ordinary scans.

The switch is a `jax.make_user_context`, part of the jit cache key: a function jitted once scanned and
then traced again under the switch is re-traced, never served the scanned program from the cache.
Only jax is imported here, so every room (`rl` included, which must not import `models`) may use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_UNROLL = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """While active, `scan` unrolls fully at trace time (for cost analysis; compile time grows with the trips)."""
    with _UNROLL(True):
        yield


def unrolling() -> bool:
    """Whether `scan` unrolls fully right now."""
    return bool(_UNROLL.value)


def scan(f, init, xs=None, length: int | None = None, *, reverse: bool = False):
    """`jax.lax.scan(f, init, xs, length, reverse=reverse)`, fully unrolled under `unrolled_scans()`."""
    return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=True if unrolling() else 1)
