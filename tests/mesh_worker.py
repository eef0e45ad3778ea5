"""GKD and OPSD steps of a tiny model on a device mesh, run in its own process by the sharding and
multi-host tests (a process's device count is fixed when JAX starts, so the tests launch
this with forced CPU devices or under launch/local_multihost.sh).

    python tests/mesh_worker.py equivalence OUT.json --meshes 2,2,2 8,1,1 [--kind opsd]
    python tests/mesh_worker.py gkd OUT_DIR [--restore_from DIR] [multi-host flags]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from opd_jax import (  # noqa: E402
    config,
    distill,
    gkd,
    loop,
    lora,
    mesh,
    model,
    opsd,
    sampling,
    train_state,
    update,
)

TEACHER = model.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
STUDENT = dataclasses.replace(TEACHER, n_layers=1)
BATCH, PROMPT, TEACHER_PROMPT, NEW = 8, 6, 9, 5
CFG = distill.DistillConfig(divergence="jsd", vocab_chunk=2)
OPTIM = train_state.OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
SAMPLING = sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0)
# GKD: a separate teacher, full fine-tuning. OPSD: the student teaches itself from a
# wider, privileged context, through LoRA adapters and a moving-average teacher.
ROLES = {
    "gkd": update.Roles(STUDENT, TEACHER),
    "opsd": update.Roles(
        STUDENT, STUDENT, opsd.SelfTeacher("ema", 0.5), lora.LoraConfig(rank=2, targets=("q", "o"))
    ),
}


def host_batch(step: int) -> tuple[np.ndarray, ...]:
    """The whole batch of `step`, the same on every process: (prompt, valid, target, mask,
    teacher prompt, teacher valid)."""
    rng = np.random.default_rng(step)

    def prompts(width):
        lengths = rng.integers(1, width + 1, BATCH)
        valid = np.arange(width)[None] >= (width - lengths)[:, None]
        return rng.integers(0, TEACHER.vocab_size, (BATCH, width)).astype(np.int32), valid

    prompt, valid = prompts(PROMPT)
    target = rng.integers(0, TEACHER.vocab_size, (BATCH, NEW)).astype(np.int32)
    return prompt, valid, target, np.ones((BATCH, NEW), np.float32), *prompts(TEACHER_PROMPT)


def one_device_mesh() -> jax.sharding.Mesh:
    return mesh.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def fresh_state(kind: str, device_mesh, optimizer):
    roles = ROLES[kind]
    placement = mesh.Layout().placement(device_mesh)
    student_sharding = placement.params(roles.student)
    student = mesh.place_params(
        model.init_params(roles.student, jax.random.key(0)), student_sharding
    )
    return update.create_state(roles, student, optimizer, 0, student_sharding), student


def distill_steps(kind: str, device_mesh, num_steps: int, state=None):
    """`num_steps` on-policy steps of `kind` (rollout, then update).

    Returns the final state and, per step, the sampled tokens and the loss.
    """
    roles = ROLES[kind]
    optimizer = train_state.make_optimizer(OPTIM, total_steps=100)
    placement = mesh.Layout().placement(device_mesh)
    fresh, student = fresh_state(kind, device_mesh, optimizer)
    state = fresh if state is None else state
    teacher = None
    if roles.self_teacher is None:
        teacher_sharding = placement.params(TEACHER)
        teacher = mesh.place_params(model.init_params(TEACHER, jax.random.key(7)), teacher_sharding)
    frozen = update.frozen_arrays(roles, student, teacher)
    shardings = update.step_shardings(state, jax.tree.map(lambda x: x.sharding, frozen), placement)
    mixture = gkd.MixtureConfig(on_policy_fraction=1.0)
    roll = update.make_rollout(roles, mixture, SAMPLING, shardings)
    update_step = update.make_update_step(roles, CFG, optimizer, shardings)
    rows = mesh.process_rows(device_mesh, BATCH)
    tokens, losses = [], []
    for step in range(int(state.step), int(state.step) + num_steps):
        arrays = mesh.global_batch(tuple(a[rows] for a in host_batch(step)), device_mesh, BATCH)
        batch, _ = roll(state, frozen, *arrays)
        state, metrics = update_step(state, frozen, batch)
        tokens.append(mesh.to_host(batch.completion_BxN))
        losses.append(float(metrics["loss"]))
    return state, tokens, losses


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def equivalence(out: pathlib.Path, meshes: list[tuple[int, ...]], kind: str) -> None:
    """Each mesh against one device: tokens, losses, params, and where params live."""
    ref_state, ref_tokens, ref_losses = distill_steps(kind, one_device_mesh(), 2)
    ref_params = jax.device_get(ref_state.params)
    results = {}
    for shape in meshes:
        state, tokens, losses = distill_steps(kind, mesh.make_mesh(shape), 2)
        full = state.ema_params if kind == "opsd" else state.params
        q = full["layers"]["q"] if kind == "gkd" else full["layers"]["q"]["a"]
        results[str(shape)] = {
            "tokens_equal": all(
                np.array_equal(a, b) for a, b in zip(tokens, ref_tokens, strict=True)
            ),
            "loss_rel_diff": max(
                abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)
            ),
            "params_max_diff": _max_diff(mesh.to_host(state.params), ref_params),
            "q_spec": [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec],
            "q_shard_shape": list(q.addressable_shards[0].data.shape),
            "step_replicated": state.step.sharding.is_fully_replicated,
        }
        if kind == "gkd":
            mu = state.opt_state[1][0].mu["layers"]["q"]
            results[str(shape)]["q_mu_spec_equal"] = mu.sharding.spec == q.sharding.spec
            embed = state.params["embed"]
            results[str(shape)]["embed_shard_shape"] = list(embed.addressable_shards[0].data.shape)
        else:
            results[str(shape)]["ema_params_max_diff"] = _max_diff(
                mesh.to_host(state.ema_params), jax.device_get(ref_state.ema_params)
            )
    out.write_text(
        json.dumps(
            {"q_shape": list(ref_params["layers"]["q"].shape) if kind == "gkd" else None, **results}
        )
    )


def gkd_run(out: pathlib.Path, restore_from: str | None, steps: int) -> None:
    """GKD steps on all processes' devices (one data axis); saves the final checkpoint to
    out/ckpt and this process's copy of the params to out/params_<process>.npz. With
    `restore_from`, starts from that checkpoint (written by any number of processes)."""
    device_mesh = mesh.make_mesh((-1, 1, 1))
    state = None
    if restore_from is not None:
        optimizer = train_state.make_optimizer(OPTIM, total_steps=100)
        init, _ = fresh_state("gkd", device_mesh, optimizer)
        state = loop.restore_latest(loop.manager(restore_from), loop.abstract(init), STUDENT)
    state, _, losses = distill_steps("gkd", device_mesh, steps, state)
    loop.save(loop.manager(out / "ckpt"), int(state.step), state, STUDENT)
    params = mesh.to_host(state.params)
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
    parser.add_argument("--kind", choices=sorted(ROLES), default="gkd")
    args = parser.parse_args()
    mesh.initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        auto_detect=args.distributed,
        timeout_s=args.distributed_timeout_s,
    )
    out = pathlib.Path(args.out)
    if args.mode == "equivalence":
        equivalence(out, [tuple(int(n) for n in m.split(",")) for m in args.meshes], args.kind)
    else:
        out.mkdir(parents=True, exist_ok=True)
        gkd_run(out, args.restore_from, args.steps)


if __name__ == "__main__":
    main()
