"""GKD steps of a tiny model on a device mesh, run in its own process by the sharding and
multi-host tests (a process's device count is fixed when JAX starts, so the tests launch
this with forced CPU devices or under launch/local_multihost.sh).

    python tests/mesh_worker.py equivalence OUT.json --meshes 2,2,2 8,1,1   # vs one device
    python tests/mesh_worker.py gkd OUT_DIR [--restore_from DIR] [multi-host flags]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from opd_jax import (  # noqa: E402
    config,
    distill,
    model,
    parallel,
    rollout,
    sampling,
    sharding,
    train_checkpoint,
)

TEACHER = model.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
STUDENT = dataclasses.replace(TEACHER, n_layers=1)
BATCH, PROMPT, NEW = 8, 6, 5
CFG = distill.DistillConfig(divergence="jsd", learning_rate=1e-2, warmup_steps=0, vocab_chunk=2)
SAMPLING = sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0)


def host_batch(step: int) -> tuple[np.ndarray, ...]:
    """The whole batch of `step`, the same on every process: (prompt, valid, target, mask)."""
    rng = np.random.default_rng(step)
    lengths = rng.integers(1, PROMPT + 1, BATCH)
    valid = np.arange(PROMPT)[None] >= (PROMPT - lengths)[:, None]
    prompt = rng.integers(0, TEACHER.vocab_size, (BATCH, PROMPT)).astype(np.int32)
    target = rng.integers(0, TEACHER.vocab_size, (BATCH, NEW)).astype(np.int32)
    return prompt, valid, target, np.ones((BATCH, NEW), bool)


def gkd_steps(mesh, num_steps: int, state=None):
    """`num_steps` on-policy GKD steps (rollout, then update); mesh None is one device.

    Returns the final state and, per step, the sampled tokens and the loss.
    """
    optimizer = distill.make_optimizer(CFG, total_steps=100)
    teacher = model.init_params(TEACHER, jax.random.key(7))
    student = model.init_params(STUDENT, jax.random.key(0))
    mixture = rollout.MixtureConfig(on_policy_fraction=1.0)
    if mesh is None:
        state = state or distill.init_train_state(student, optimizer, seed=0)
        shardings, rows = None, slice(None)
        place = lambda arrays: tuple(jnp.asarray(a) for a in arrays)
    else:
        layout = parallel.Layout()
        teacher_sharding = parallel.param_shardings(TEACHER, mesh, layout.rules("teacher"))
        student_sharding = parallel.param_shardings(STUDENT, mesh, layout.rules("student"))
        teacher = parallel.place_params(teacher, teacher_sharding)
        if state is None:
            student = parallel.place_params(student, student_sharding)
            state = parallel.create_train_state(student, optimizer, 0, student_sharding)
        shardings = parallel.step_shardings(state, teacher_sharding, mesh)
        rows = parallel.process_rows(mesh, BATCH)
        place = lambda arrays: parallel.global_batch(arrays, mesh, BATCH)
    roll = rollout.make_rollout(STUDENT, TEACHER, mixture, SAMPLING, shardings)
    update = distill.make_update_step(STUDENT, TEACHER, CFG, optimizer, shardings)
    tokens, losses = [], []
    for step in range(int(state.step), int(state.step) + num_steps):
        arrays = place(tuple(a[rows] for a in host_batch(step)))
        batch, _ = roll(state, teacher, *arrays)
        state, metrics = update(state, teacher, batch)
        tokens.append(sharding.to_host(batch.completion_BxN))
        losses.append(float(metrics["loss"]))
    return state, tokens, losses


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def equivalence(out: pathlib.Path, meshes: list[tuple[int, ...]]) -> None:
    """Each mesh against one device: tokens, losses, params, and where params live."""
    ref_state, ref_tokens, ref_losses = gkd_steps(None, 2)
    ref_params = jax.device_get(ref_state.params)
    results = {}
    for shape in meshes:
        mesh = sharding.make_mesh(shape)
        state, tokens, losses = gkd_steps(mesh, 2)
        q = state.params["layers"]["q"]
        mu = state.opt_state[1][0].mu["layers"]["q"]
        results[str(shape)] = {
            "tokens_equal": all(
                np.array_equal(a, b) for a, b in zip(tokens, ref_tokens, strict=True)
            ),
            "loss_rel_diff": max(
                abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)
            ),
            "params_max_diff": _max_diff(sharding.to_host(state.params), ref_params),
            "q_spec": [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec],
            "q_shard_shape": list(q.addressable_shards[0].data.shape),
            "q_mu_spec_equal": mu.sharding.spec == q.sharding.spec,
            "embed_shard_shape": list(state.params["embed"].addressable_shards[0].data.shape),
            "step_replicated": state.step.sharding.is_fully_replicated,
        }
    out.write_text(json.dumps({"q_shape": list(ref_params["layers"]["q"].shape), **results}))


def gkd(out: pathlib.Path, restore_from: str | None, steps: int) -> None:
    """GKD steps on all processes' devices (one data axis); saves the final checkpoint to
    out/ckpt and this process's copy of the params to out/params_<process>.npz. With
    `restore_from`, starts from that checkpoint (written by any number of processes)."""
    mesh = sharding.make_mesh((-1, 1, 1))
    state = None
    if restore_from is not None:
        optimizer = distill.make_optimizer(CFG, total_steps=100)
        student_sharding = parallel.param_shardings(STUDENT, mesh)
        init = parallel.create_train_state(
            parallel.place_params(model.init_params(STUDENT, jax.random.key(0)), student_sharding),
            optimizer,
            0,
            student_sharding,
        )
        mngr = train_checkpoint.manager(restore_from)
        state = train_checkpoint.restore_latest(mngr, train_checkpoint.abstract(init), STUDENT)
    state, _, losses = gkd_steps(mesh, steps, state)
    train_checkpoint.save(train_checkpoint.manager(out / "ckpt"), int(state.step), state, STUDENT)
    params = sharding.to_host(state.params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(params)}
    np.savez(out / f"params_{jax.process_index()}.npz", **flat)
    summary = {"processes": jax.process_count(), "devices": jax.device_count(), "losses": losses}
    (out / f"summary_{jax.process_index()}.json").write_text(json.dumps(summary))


def main() -> None:
    parser = config.flag_parser(__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("equivalence", "gkd"))
    parser.add_argument("out")
    parser.add_argument("--restore_from", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--meshes", nargs="+", default=["8,1,1", "2,4,1", "2,2,2"])
    args = parser.parse_args()
    sharding.initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        auto_detect=args.distributed,
        timeout_s=args.distributed_timeout_s,
    )
    out = pathlib.Path(args.out)
    if args.mode == "equivalence":
        equivalence(out, [tuple(int(n) for n in m.split(",")) for m in args.meshes])
    else:
        out.mkdir(parents=True, exist_ok=True)
        gkd(out, args.restore_from, args.steps)


if __name__ == "__main__":
    main()
