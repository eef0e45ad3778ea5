"""The GKD train step on a device mesh: step time against one device, and memory per
device from an ahead-of-time compile for a TPU slice that need not be present.

    python -m benchmarks.sharded_step time                    # 8 forced CPU devices
    python -m benchmarks.sharded_step memory --topology v5e:2x2 --mesh 1,4,1 --mesh 1,2,2

`time` runs one on-policy GKD step (rollout at temperature 1, then the update) of a
small random model on a mesh over 1 device and on meshes over 8, in one process with 8
forced CPU devices; best of `--repeats` after a compile. CPU devices share the host's
cores, so this checks that sharding works and costs little, not that it speeds up.

`memory` lowers and compiles the rollout and the update of a 1B-class student and
teacher (Llama 3.2 1B shapes) against a described TPU topology with XLA's TPU compiler
(`jax.experimental.topologies`, which needs the `libtpu` package but no TPU), and prints
XLA's account of each device's memory. Without libtpu it says so and compiles the same
for 8 forced CPU devices instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEVICES = 8


def _force_cpu_devices(count: int) -> None:
    """Must run before JAX starts: a process's device count is fixed then."""
    if "jax" in sys.modules:
        raise RuntimeError("set the device count before importing jax")
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    )


def _mesh_arg(text: str) -> tuple[int, int, int]:
    data, fsdp, tensor = (int(n) for n in text.split(","))
    return data, fsdp, tensor


CFG_KWARGS = dict(divergence="jsd", vocab_chunk=128)


def _optimizer():
    from opd_jax import train_state

    return train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=1000)


def _gkd_functions(student_config, teacher_config, state, teacher_sharding, mesh, new_tokens):
    """The run's jitted rollout and update of one GKD step with this mesh's shardings."""
    from opd_jax import distill, gkd, sampling, update
    from opd_jax import mesh as mesh_lib

    cfg = distill.DistillConfig(**CFG_KWARGS)
    roles = update.Roles(student_config, teacher_config)
    frozen = {"teacher": teacher_sharding, "base": None}
    placement = mesh_lib.Layout().placement(mesh)
    shardings = update.step_shardings(state, frozen, placement)
    sample_cfg = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    mixture = gkd.MixtureConfig(on_policy_fraction=1.0)
    roll = update.make_rollout(roles, mixture, sample_cfg, shardings)
    return roll, update.make_update_step(roles, cfg, _optimizer(), shardings)


def _best_seconds(run: Callable[[], Any], repeats: int) -> float:
    import jax

    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - began)
    return min(times)


TIMED_TEACHER = dict(
    vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, mlp_dim=1024
)


def _time_mesh(shape: tuple[int, int, int], host: tuple, new_tokens: int, repeats: int):
    """(rollout seconds, update seconds) of the small model on a mesh of this shape."""
    import dataclasses

    import jax
    import numpy as np

    from opd_jax import mesh as mesh_lib
    from opd_jax import model, update

    teacher_config = model.ModelConfig(**TIMED_TEACHER)
    student_config = dataclasses.replace(teacher_config, n_layers=2)
    mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])
    placement = mesh_lib.Layout().placement(mesh)
    teacher_sharding = placement.params(teacher_config)
    student_sharding = placement.params(student_config)
    teacher = mesh_lib.place_params(
        model.init_params(teacher_config, jax.random.key(1)), teacher_sharding
    )
    student = mesh_lib.place_params(
        model.init_params(student_config, jax.random.key(0)), student_sharding
    )
    roles = update.Roles(student_config, teacher_config)
    state = update.create_state(roles, student, _optimizer(), 0, student_sharding)
    roll, update_step = _gkd_functions(
        student_config, teacher_config, state, teacher_sharding, mesh, new_tokens
    )
    arrays = mesh_lib.global_batch((*host, *host[:2]), mesh, host[0].shape[0])
    frozen = update.frozen_arrays(roles, student, teacher)
    batch, _ = roll(state, frozen, *arrays)
    roll_s = _best_seconds(lambda: roll(state, frozen, *arrays), repeats)
    holder = {"state": state}

    def one_update():
        holder["state"], metrics = update_step(holder["state"], frozen, batch)
        return metrics

    return roll_s, _best_seconds(one_update, repeats)


def time_steps(meshes: Sequence[tuple[int, int, int]], args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    B, P, N = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    host = (
        rng.integers(0, TIMED_TEACHER["vocab_size"], (B, P)).astype(np.int32),
        np.ones((B, P), bool),
        np.zeros((B, N), np.int32),
        np.ones((B, N), np.float32),
    )
    print(
        f"{B} prompts of {P} tokens, {N} new tokens; teacher {TIMED_TEACHER}, student 2 layers; "
        f"{jax.device_count()} CPU devices on {os.cpu_count()} cores\n"
    )
    print("| mesh (data, fsdp, tensor) | devices | rollout s | update s | step s | vs 1 device |")
    print("|---|---:|---:|---:|---:|---:|")
    baseline = None
    for shape in [(1, 1, 1), *meshes]:
        roll_s, update_s = _time_mesh(shape, host, N, args.repeats)
        step_s = roll_s + update_s
        baseline = baseline or step_s
        print(
            f"| {shape} | {int(np.prod(shape))} | {roll_s:.3f} | {update_s:.3f} | {step_s:.3f} "
            f"| {step_s / baseline:.2f}x |"
        )


LLAMA_1B = dict(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
)


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _memory_rows(config, mesh, batch: int, prompt_len: int, new_tokens: int) -> list[str]:
    """Table rows of XLA's memory account of the compiled rollout and update."""
    import jax
    import jax.numpy as jnp

    from opd_jax import mesh as mesh_lib
    from opd_jax import model, train_state, update

    params_sharding = mesh_lib.Layout().placement(mesh).params(config)
    abstract_params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    params = _abstract(abstract_params, params_sharding)
    optimizer = _optimizer()
    abstract_state = jax.eval_shape(lambda p: train_state.init_train_state(p, optimizer, 0), params)
    state = _abstract(
        abstract_state, update.state_shardings(abstract_state, optimizer, params_sharding)
    )
    roll, update_step = _gkd_functions(config, config, state, params_sharding, mesh, new_tokens)
    frozen = {"teacher": params, "base": None}
    rows = mesh_lib.batch_sharding(mesh)
    prompts = (
        jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch, prompt_len), bool, sharding=rows),
    )
    targets = (
        jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch, new_tokens), jnp.float32, sharding=rows),
    )
    shape = tuple(mesh.shape.values())
    lines = []
    for name, jitted, inputs in (
        ("rollout", roll, (state, frozen, *prompts, *targets, *prompts)),
        ("update", update_step, (state, frozen, train_state.DistillBatch(*prompts, *targets))),
    ):
        try:
            stats = jitted.lower(*inputs).compile().memory_analysis()
        except jax.errors.JaxRuntimeError as err:  # XLA refuses a program that cannot fit
            lines.append(f"| {shape} | {name} | does not fit: {str(err).splitlines()[0]} ||||")
            continue
        total = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        )
        lines.append(
            f"| {shape} | {name} | {_gib(stats.argument_size_in_bytes)} | "
            f"{_gib(stats.output_size_in_bytes)} | {_gib(stats.temp_size_in_bytes)} | "
            f"{_gib(total)} |"
        )
    return lines


def memory(meshes: Sequence[tuple[int, int, int]], args: argparse.Namespace) -> None:
    import math

    import jax

    from opd_jax import mesh as mesh_lib
    from opd_jax import model

    devices, where = _topology_devices(args.topology)
    config = model.ModelConfig(**LLAMA_1B, rope=model.RopeConfig(theta=500000.0))
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    print(
        f"{where}: student and teacher of Llama 3.2 1B shapes ({param_count / 1e9:.2f}B params "
        f"each, float32), {args.batch} prompts of {args.prompt_len} tokens + "
        f"{args.new_tokens} new, JSD over vocab chunks of 128\n"
    )
    print(
        "| mesh (data, fsdp, tensor) | step | arguments GiB | outputs GiB | temporaries GiB "
        "| total GiB per device |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for shape in meshes:
        mesh = mesh_lib.make_mesh(shape, devices=devices)
        for line in _memory_rows(config, mesh, args.batch, args.prompt_len, args.new_tokens):
            print(line, flush=True)


def _topology_devices(topology: str) -> tuple[list[Any], str]:
    """Abstract devices of a TPU slice, or the forced CPU devices when libtpu is missing."""
    import jax
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        return list(devices), f"TPU {topology} ({len(devices)} devices, compiled without a TPU)"
    except Exception as err:  # no libtpu, or a topology it does not know
        print(
            f"no TPU compiler for {topology!r} ({str(err).splitlines()[0]}); `pip install "
            f"libtpu` (the version `jax[tpu]=={jax.__version__}` pins) gives one. Compiling "
            f"for {jax.device_count()} CPU devices instead.\n"
        )
        return jax.devices(), f"{jax.device_count()} forced CPU devices"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("time", "memory"))
    parser.add_argument("--mesh", type=_mesh_arg, action="append", default=None)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _force_cpu_devices(DEVICES)
    if args.mode == "time":
        time_steps(args.mesh or [(8, 1, 1), (2, 4, 1), (2, 2, 2)], args)
    else:
        memory(args.mesh or [(1, 4, 1), (1, 2, 2), (2, 2, 1), (4, 1, 1)], args)


if __name__ == "__main__":
    main()
