"""Checkpoints loaded straight into their shardings on a device mesh, against the same
checkpoints loaded whole, run in its own process by the sharding tests (a process's
device count is fixed when JAX starts, so they launch this with forced CPU devices).

    python tests/load_worker.py OUT.json --meshes 1,8,1 2,2,2 --checkpoints DIR GGUF:0,29

A checkpoint may name the layers to keep after a colon. OUT.json says, for every
checkpoint, mesh and dtype, whether the values equal the whole load's (cast for bfloat16),
whether every param has the layout's sharding and the dtype, and q's shard shape.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from opd_jax import checkpoints, mesh  # noqa: E402

DTYPES = ("float32", "bfloat16")


def compare(spec: str, layers: tuple[int, ...] | None, shapes: list[tuple[int, ...]]) -> dict:
    """{mesh shape: {dtype: checks}} for one checkpoint."""
    config, whole = checkpoints.load(spec, layers=layers)
    results = {}
    for shape in shapes:
        placement = mesh.Placement(mesh.make_mesh(shape))
        for dtype in DTYPES:
            sharded_config, sharded = checkpoints.load(
                spec, dtype, layers=layers, shardings=placement.params
            )
            leaves = jax.tree.leaves(sharded)
            expected = [np.asarray(x.astype(dtype)) for x in jax.tree.leaves(whole)]
            results.setdefault(",".join(map(str, shape)), {})[dtype] = {
                "config_equal": sharded_config == config,
                "values_equal": all(
                    np.array_equal(np.asarray(x), y) for x, y in zip(leaves, expected, strict=True)
                ),
                "shardings_equal": jax.tree.leaves(jax.tree.map(lambda x: x.sharding, sharded))
                == jax.tree.leaves(placement.params(config)),
                "dtypes": sorted({str(x.dtype) for x in leaves}),
                "q_shard_shape": list(sharded["layers"]["q"].addressable_shards[0].data.shape),
                "q_shape": list(sharded["layers"]["q"].shape),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--meshes", nargs="+", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    args = parser.parse_args()
    meshes = [tuple(int(n) for n in shape.split(",")) for shape in args.meshes]
    results = {}
    for checkpoint in args.checkpoints:
        spec, _, kept = checkpoint.partition(":")
        layers = tuple(int(i) for i in kept.split(",")) if kept else None
        results[checkpoint] = compare(spec, layers, meshes)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
