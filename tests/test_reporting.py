"""Reporting: TensorBoard events and metrics.jsonl read back, resumed and interrupted logs,
the results table, curve plots and the progress bar."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from opd_jax import reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tensorboard_scalars(logdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files: TFRecord framing is a u64
    length, its crc, the payload and its crc."""
    scalars = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        content, offset = path.read_bytes(), 0
        while offset < len(content):
            (length,) = struct.unpack_from("<Q", content, offset)
            event = event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def ihdr_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header chunk."""
    return struct.unpack(">II", png[16:24])


def jsonl_lines(logdir) -> list[dict]:
    return [json.loads(line) for line in (logdir / reporting.METRICS_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------- metrics


def test_writer_logs_tensorboard_scalars_and_jsonl(tmp_path):
    logdir = tmp_path / "logs"
    with reporting.MetricsWriter(logdir, enabled=True) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "grad_norm": np.float64(0.75)})
        writer.write(2, {"loss": 1.25, "finite": jnp.bool_(True)})
    assert jsonl_lines(logdir) == [
        {"step": 1, "loss": 2.5, "grad_norm": 0.75},
        {"step": 2, "loss": 1.25, "finite": 1.0},
    ]
    assert sorted(tensorboard_scalars(logdir)) == [
        ("finite", 2, 1.0),
        ("grad_norm", 1, 0.75),
        ("loss", 1, 2.5),
        ("loss", 2, 1.25),
    ]


def test_disabled_writer_creates_nothing(tmp_path):
    writer = reporting.MetricsWriter(tmp_path / "logs", enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "logs").exists()


def test_writer_is_enabled_on_the_only_process_by_default(tmp_path):
    with reporting.MetricsWriter(tmp_path) as writer:
        assert writer.enabled
        writer.write(3, {"loss": 1.0})
    assert jsonl_lines(tmp_path) == [{"step": 3, "loss": 1.0}]


def test_writer_refuses_arrays_and_a_step_key(tmp_path):
    with reporting.MetricsWriter(tmp_path, enabled=True) as writer:
        with pytest.raises(TypeError, match="'logits' is not a scalar: shape \\(2,\\)"):
            writer.write(1, {"logits": np.zeros(2)})
        with pytest.raises(ValueError, match="'step'"):
            writer.write(1, {"step": 1})


def test_resumed_writer_appends_after_an_interrupted_line(tmp_path):
    with reporting.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    path = tmp_path / reporting.METRICS_FILE
    path.write_text(path.read_text() + '{"step": 3, "lo')  # killed mid-write
    assert reporting.read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    with reporting.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(2, {"loss": 1.5})  # resumed from the step-1 checkpoint
        writer.write(3, {"loss": 1.0})
    assert jsonl_lines(tmp_path) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 1.0},
    ]
    assert reporting.read_metrics(path) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 1.0},
    ]


def test_read_metrics_merges_keys_of_a_step_keeping_the_last_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 5, "loss": 1.0, "kl": 0.5},
        {"step": 5, "eval/rouge1": 30.0},
        {"step": 4, "loss": 2.0},
        {"step": 5, "loss": 0.9},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "loss"')
    assert reporting.read_metrics(path) == [
        {"step": 4, "loss": 2.0},
        {"step": 5, "loss": 0.9, "kl": 0.5, "eval/rouge1": 30.0},
    ]


def test_read_metrics_rejects_a_corrupt_line_before_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        reporting.read_metrics(path)


# ----------------------------------------------------------------------------- results

ROWS = [
    {"model": "teacher", "step": 0, "rouge1": 41.234, "rougeL": 30.0},
    {"model": "student (start)", "step": 0, "rouge1": np.float32(20.5)},
    {"model": "student | final", "step": 1000, "rouge1": jnp.float32(35.125), "rougeL": 25.0},
]


def test_results_table_is_markdown_with_every_row():
    table = reporting.results_table(ROWS).splitlines()
    assert table == [
        "| model | step | rouge1 | rougeL |",
        "|---|---|---|---|",
        "| teacher | 0 | 41.23 | 30.00 |",
        "| student (start) | 0 | 20.50 |  |",
        "| student \\| final | 1000 | 35.12 | 25.00 |",
    ]
    assert (
        reporting.results_table(ROWS, ["model", "rougeL"]).splitlines()[3]
        == "| student (start) |  |"
    )


def test_write_results_writes_markdown_with_samples_and_json(tmp_path):
    long_input = "word " * 1000
    samples = {"student (final)": [(long_input, "pred ```code```", "the reference")]}
    markdown = reporting.write_results(tmp_path / "run", ROWS, samples)
    text = markdown.read_text()
    assert markdown == tmp_path / "run" / "results.md"
    assert reporting.results_table(ROWS) in text
    assert "## Samples: student (final)" in text
    assert "````text\npred ```code```\n````" in text  # the fence outlasts the text's own
    assert "[... 3500 chars]" in text and "the reference" in text
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rows[2] == {"model": "student | final", "step": 1000, "rouge1": 35.125, "rougeL": 25.0}
    assert rows[1]["rouge1"] == 20.5


# ----------------------------------------------------------------------------- plots


def test_plot_curves_saves_a_png_with_one_panel_per_key(tmp_path):
    records = [{"step": s, "kl": 1.0 / s} for s in range(1, 101)]
    records += [{"step": s, "eval/rouge1": 20 + s / 10} for s in range(0, 101, 25)]
    out = reporting.plot_curves(records, ["eval/rouge1", "kl"], tmp_path / "plots" / "c.png")
    content = out.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000
    one = reporting.plot_curves(records, ["kl"], tmp_path / "one.png").read_bytes()
    (width, height), (one_width, one_height) = (ihdr_size(png) for png in (content, one))
    assert width == one_width and height > 1.5 * one_height, "panels are stacked"


def test_plot_curves_names_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"\['rogue1'\].*\['kl'\]"):
        reporting.plot_curves([{"step": 1, "kl": 0.1}], ["rogue1"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------- progress


def test_progress_shows_postfix_from_the_resumed_step():
    bar = reporting.progress(total=100, initial=40, enabled=True)
    bar.set_postfix(loss="1.2345", step_s="0.50", refresh=False)
    bar.update()
    shown = str(bar)
    bar.close()
    assert "41/100" in shown and "loss=1.2345" in shown and "step_s=0.50" in shown
    quiet = reporting.progress(total=100, enabled=False)
    assert quiet.disable
    quiet.close()
