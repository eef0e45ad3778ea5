"""A run's trained student as a Hugging Face model directory.

A run records in its workdir how its student is built (`write_manifest`, file
`student.json`, a `StudentManifest`). `student_model` replays that on the newest
checkpoint of each stage; a stage without one yet is skipped, so an unfinished run
exports what it has made so far. `export` writes float32 safetensors, config.json,
generation_config.json and the tokenizer files, which transformers loads as this model:

    python -m opd_jax.export WORKDIR OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from opd_jax import assets, checkpoints, loop, lora, paths
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params

MANIFEST_FILE = "student.json"
STAGE_KINDS = ("full", "lora")


class ExportError(ValueError):
    """A workdir whose student cannot be rebuilt; the message names what is missing."""


@dataclasses.dataclass(frozen=True)
class StageParams:
    """A stage whose checkpoints hold the student's params: all of them ("full") or LoRA
    adapters ("lora") to merge onto the params the stages before it made."""

    name: str
    kind: str


@dataclasses.dataclass(frozen=True)
class StudentManifest:
    """How to rebuild a run's student: the checkpoint it starts from (`source`: a preset
    name, HF directory or GGUF file, loaded as `checkpoints.load` loads any), the tokenizer
    the run used (the same kinds of spec; a GKD run's is the teacher's), the source's layers
    it keeps when it is cut from a deeper model (None: all), its LoRA shape, and the stages
    whose checkpoints hold its params, in order."""

    source: str
    tokenizer: str
    layers: tuple[int, ...] | None
    lora: lora.LoraConfig | None
    stages: tuple[StageParams, ...]

    def __post_init__(self):
        for stage in self.stages:
            if stage.kind not in STAGE_KINDS:
                raise ExportError(f"stage {stage.name!r}: kind {stage.kind!r} not in {STAGE_KINDS}")
            if stage.kind == "lora" and self.lora is None:
                raise ExportError(f"stage {stage.name!r} holds LoRA adapters but no LoRA config")


def _portable_spec(spec: str | pathlib.Path) -> str:
    """A preset name as it is; a path made absolute, so the export can run from anywhere."""
    if isinstance(spec, str) and spec in assets.PACKAGED_CHECKPOINTS:
        return spec
    return str(pathlib.Path(spec).absolute())


def write_manifest(
    workdir: epath.PathLike,
    source: str | pathlib.Path,
    stages: Sequence[tuple[str, str]],
    *,
    tokenizer: str | pathlib.Path | None = None,
    layers: Sequence[int] | None = None,
    lora_config: lora.LoraConfig | None = None,
) -> epath.Path:
    """Writes `student.json` for a run; `stages` are (stage directory name, "full" | "lora")
    in the order they train the student. The tokenizer defaults to the source's."""
    manifest = StudentManifest(
        source=_portable_spec(source),
        tokenizer=_portable_spec(source if tokenizer is None else tokenizer),
        layers=None if layers is None else tuple(int(i) for i in layers),
        lora=lora_config,
        stages=tuple(StageParams(name, kind) for name, kind in stages),
    )
    path = paths.as_path(workdir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")  # renamed whole, so a reader never sees half a file
    partial.write_text(json.dumps(dataclasses.asdict(manifest), indent=2))
    partial.replace(path)
    return path


def read_manifest(workdir: epath.PathLike) -> StudentManifest:
    workdir = paths.as_path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"{workdir}: no such workdir")
    path = workdir / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{workdir} has no {MANIFEST_FILE}: it is not the workdir of a run")
    try:
        fields = json.loads(path.read_text())
        return StudentManifest(
            source=fields["source"],
            tokenizer=fields["tokenizer"],
            layers=None if fields["layers"] is None else tuple(fields["layers"]),
            lora=None if fields["lora"] is None else _lora_config(fields["lora"]),
            stages=tuple(StageParams(s["name"], s["kind"]) for s in fields["stages"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{path}: not a valid manifest ({type(err).__name__}: {err})") from None


def _lora_config(fields: dict[str, Any]) -> lora.LoraConfig:
    return lora.LoraConfig(**{**fields, "targets": tuple(fields["targets"])})


# ----------------------------------------------------------------------------- checkpoints


def _first_line(err: BaseException) -> str:
    """Orbax's errors run over many lines; the CLI's report is one."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _check_shapes(directory: epath.Path, step: int, saved: Any, abstract: Params) -> None:
    """Orbax restores a subtree it does not find as its abstract value, so the saved
    params must be checked against the student before anything is read."""
    leaves = jax.tree_util.tree_leaves_with_path
    have, want = (
        {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves(tree)}
        for tree in (saved, abstract)
    )
    if have != want:
        differing = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        raise ExportError(
            f"{directory} step {step} holds params unlike the student {MANIFEST_FILE} "
            f"describes (differing: {', '.join(differing[:4])})"
        )


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract: Params) -> Params:
    item = loop.STATE_ITEM
    _check_shapes(mngr.directory, step, mngr.item_metadata(step)[item]["params"], abstract)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(dtype=jnp.float32, sharding=cpu), abstract)
    restore = ocp.args.PyTreeRestore(
        {"params": abstract}, restore_args={"params": args}, partial_restore=True
    )
    return mngr.restore(step, args=ocp.args.Composite(**{item: restore}))[item]["params"]


def restore_params(directory: epath.Path, abstract: Params) -> Params | None:
    """The params of the stage's newest readable checkpoint (float32, on the host), or None
    when the stage has none yet. A damaged step falls back to the one before it, as a
    resumed run does."""
    if not directory.exists():
        return None
    # The train state is read as a plain pytree, so that its params restore alone, whatever
    # the optimizer state around them looks like.
    options = ocp.CheckpointManagerOptions(read_only=True)
    handlers = {loop.STATE_ITEM: ocp.PyTreeCheckpointHandler()}
    try:
        mngr = ocp.CheckpointManager(
            paths.absolute(directory), options=options, item_handlers=handlers
        )
        steps = sorted(mngr.all_steps(), reverse=True)
    except Exception as err:  # Orbax reports a bad directory with many exception types
        raise ExportError(f"{directory}: not a checkpoint directory ({_first_line(err)})") from None
    problems = []
    for step in steps:
        try:
            return _restore_step(mngr, step, abstract)
        except ExportError:
            raise
        except Exception as err:  # a damaged step, reported by Orbax in many types
            logging.warning("checkpoint step %d in %s is unreadable (%s)", step, directory, err)
            problems.append(f"step {step}: {_first_line(err)}")
    if problems:
        raise ExportError(f"{directory}: no checkpoint could be read ({'; '.join(problems)})")
    return None


def student_model(workdir: epath.PathLike) -> tuple[ModelConfig, Params]:
    """The run's student as it stands: its source, cut to the kept layers, then each
    stage's newest params in order (adapters merged), float32."""
    workdir = paths.as_path(workdir)
    manifest = read_manifest(workdir)
    config, params = checkpoints.load(manifest.source, layers=manifest.layers)
    adapters = lambda p: lora.init(p, manifest.lora, jax.random.key(0))
    for stage in manifest.stages:
        # float32 shapes of what the stage's checkpoints hold: the params, or their adapters
        trainable = params if stage.kind == "full" else jax.eval_shape(adapters, params)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
        trained = restore_params(workdir / stage.name, abstract)
        if trained is None:
            continue
        params = trained if stage.kind == "full" else lora.merge(params, trained, manifest.lora)
    return config, params


# ----------------------------------------------------------------------------- export


def export(workdir: epath.PathLike, out: str | pathlib.Path) -> pathlib.Path:
    """Writes the run's student (adapters merged) as a Hugging Face model directory; the
    manifest, tokenizer and checkpoints are all read before anything is written."""
    tok = tokenizer_lib.load(read_manifest(workdir).tokenizer)
    config, params = student_model(workdir)
    out = tok.save_hf(out)
    # generation_config.json: the ids transformers' `generate` stops at and pads with
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    generation = {name: token_id for name, token_id in ids.items() if token_id is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return checkpoints.save_hf_dir(config, params, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m opd_jax.export",
        description="Write a run's trained student as a Hugging Face model directory.",
    )
    parser.add_argument("workdir", help="the run's workdir (holding student.json)")
    parser.add_argument("out", help="the directory to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.workdir, args.out)
    except (ValueError, FileNotFoundError) as err:  # bad input: one line, no traceback
        raise SystemExit(f"export failed: {err}") from None
    print(f"student written to {out}")


if __name__ == "__main__":
    main()
