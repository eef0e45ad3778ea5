"""What a researcher looks at: TensorBoard scalars, an append-only metrics.jsonl that plots
and tables can be rebuilt from, a markdown results table, curve plots, a progress bar.

In multi-host runs only process 0 writes; the others get disabled writers and bars. Every
file goes through `etils.epath`, so a workdir may be local or remote (`gs://`, `opd_jax.paths`).
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
import tqdm
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opd_jax import paths

METRICS_FILE = "metrics.jsonl"
SAMPLE_INPUT_CHARS = 1500  # documents run to thousands of words; the report shows their start


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_float(key: str, value: Any) -> float:
    """A Python float from a float, numpy or jax scalar; arrays are refused by name."""
    array = np.asarray(value)
    if array.shape != ():
        raise TypeError(f"metric {key!r} is not a scalar: shape {array.shape}")
    return float(array)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """TensorBoard scalars plus `metrics.jsonl` in `logdir`, one JSON object per write.

    The jsonl is appended to, so a resumed run continues the same file; each line is flushed
    as written, so an interrupted run loses at most the line being written. `enabled`
    defaults to process 0 only; a disabled writer creates and writes nothing.

    A remote `logdir` (`gs://`): object stores cannot append and tensorboardX cannot reach
    them without extra packages, so both files are written to a local staging folder,
    which starts from the remote metrics.jsonl and is copied there on every `flush` (the
    run loop flushes at each checkpoint) and on `close`."""

    def __init__(self, logdir: epath.PathLike, enabled: bool | None = None) -> None:
        self.logdir = paths.as_path(logdir)
        self.enabled = is_main_process() if enabled is None else enabled
        if not self.enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        remote = not paths.is_local(self.logdir)
        self._staging = pathlib.Path(tempfile.mkdtemp(prefix="logs-")) if remote else None
        local = self._staging or pathlib.Path(self.logdir)
        path = local / METRICS_FILE
        if remote and (self.logdir / METRICS_FILE).exists():
            path.write_bytes((self.logdir / METRICS_FILE).read_bytes())
        with path.open("a+b") as f:  # a line left unfinished by an interrupted run is cut,
            f.seek(0)  # so appending starts a fresh line
            content = f.read()
            if content and not content.endswith(b"\n"):
                f.truncate(content.rfind(b"\n") + 1)
        self._jsonl = path.open("a", encoding="utf-8")
        self._tensorboard = tensorboardX.SummaryWriter(str(local))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is the record's own key, not a metric name")
        values = {key: to_float(key, value) for key, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()
            self._upload()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
            self._upload()
            if self._staging is not None:
                shutil.rmtree(self._staging)
            self.enabled = False

    def _upload(self) -> None:
        """Copies the staged files of a remote logdir there, whole (no store appends)."""
        if self._staging is None:
            return
        for staged in self._staging.rglob("*"):
            if staged.is_file():
                target = self.logdir / str(staged.relative_to(self._staging))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(staged.read_bytes())

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: epath.PathLike) -> list[dict[str, Any]]:
    """One record per step, sorted by step, with the last value logged for each key: a
    resumed run that re-logs a step overrides what the interrupted run wrote. An unfinished
    final line (a run killed mid-write) is skipped; a bad line elsewhere is an error."""
    lines = paths.as_path(path).read_text(encoding="utf-8").split("\n")
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write never finished
                continue
            raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from e
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


# ----------------------------------------------------------------------------- results


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, (bool, int, np.integer)):
        return str(value)
    return f"{to_float('cell', value):.2f}"


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table, one row per dict; columns default to every key in first-seen order,
    numbers to two decimals, missing cells left empty."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines)


def fenced(text: str) -> str:
    """A code block whose fence no run of backticks in `text` can close early."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def samples_markdown(name: str, samples: Iterable[Sequence[str]]) -> str:
    """(input, prediction, reference) triples under a heading; long inputs are cut."""
    parts = [f"## Samples: {name}"]
    for number, (text, prediction, reference) in enumerate(samples, start=1):
        if len(text) > SAMPLE_INPUT_CHARS:
            text = f"{text[:SAMPLE_INPUT_CHARS]} [... {len(text) - SAMPLE_INPUT_CHARS} chars]"
        parts += [f"### Example {number}"]
        for label, body in (("Input", text), ("Prediction", prediction), ("Reference", reference)):
            parts += [f"**{label}**", fenced(body)]
    return "\n\n".join(parts)


def write_results(
    workdir: epath.PathLike,
    rows: Sequence[Mapping[str, Any]],
    samples: Mapping[str, Iterable[Sequence[str]]] | None = None,
) -> epath.Path:
    """Writes `results.md` (the table, then samples per model) and `results.json` (the rows);
    returns the markdown path."""
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sections = ["# Results", results_table(rows)]
    sections += [samples_markdown(name, triples) for name, triples in (samples or {}).items()]
    markdown = workdir / "results.md"
    markdown.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    as_json = json.dumps(list(rows), indent=2, default=lambda value: np.asarray(value).item())
    (workdir / "results.json").write_text(as_json + "\n", encoding="utf-8")
    return markdown


# ----------------------------------------------------------------------------- plots


def figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas of its own, so the process's pyplot backend is left alone."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_series(ax: Any, records: Sequence[Mapping[str, Any]], key: str, **line: Any) -> None:
    """One key's values against step on `ax`, with dots while there are few points."""
    points = sorted(((r["step"], r[key]) for r in records if key in r), key=lambda p: p[0])
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, marker="." if len(steps) <= 50 else None, **line)


def save_png(fig: Figure, out_png: epath.PathLike) -> epath.Path:
    """Rendered in memory, then written whole: matplotlib writes local files only."""
    out_png = paths.as_path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    out_png.write_bytes(buffer.getvalue())
    return out_png


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    metric_keys: Sequence[str],
    out_png: epath.PathLike,
    title: str = "Training curves",
) -> epath.Path:
    """One subplot per key against step, stacked with a shared step axis, saved as PNG."""
    missing = [key for key in metric_keys if not any(key in r for r in records)]
    if missing or not metric_keys:
        available = sorted({key for r in records for key in r} - {"step"})
        raise ValueError(f"no values for {missing or 'any key'}; logged keys: {available}")
    fig = figure(7, 1 + 2.4 * len(metric_keys))
    axes = fig.subplots(len(metric_keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, metric_keys, strict=True):
        plot_series(ax, records, key)
        ax.set_title(key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- progress


def progress(
    total: int, initial: int = 0, enabled: bool | None = None, desc: str = "train"
) -> tqdm.tqdm:
    """A step progress bar that a resumed run starts at `initial`. Show live numbers with
    `bar.set_postfix(loss=f"{loss:.4f}", step_s=f"{seconds:.2f}", refresh=False)` and then
    `bar.update()` each step. Disabled (prints nothing) off process 0 by default."""
    disable = not (is_main_process() if enabled is None else enabled)
    return tqdm.tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=disable
    )
