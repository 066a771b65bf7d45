"""trmlx plan at 7B width: every committed measurement of benchmarks/results/plan_calibration_width-cpu.json (1-2
layer random models of Qwen2.5-7B's and Llama-3-8B's width, both backends, `python benchmarks/plan_calibration.py
--width`) re-planned within ±15%: the whole peak, and the part of it that is not exact arithmetic (activations,
chunked logits/loss, prefill, KV cache). Nothing is run: the rows carry their spec and config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trmlx.bench.calibration import TASKS, plan_of, rerooted
from trmlx.plan.causal import CALIBRATED_ON, ModelShape, calibration_note
from trmlx.plan.config import PRESETS

REPO = Path(__file__).resolve().parent.parent
WIDTH = REPO / "benchmarks" / "results" / "plan_calibration_width-cpu.json"
TOLERANCE = 0.15
# The fitted terms (what width changes) are a few hundred MB beside ~5.3 GB of exact weights: they get their own
# check, with an absolute floor where they are tiny (MLX's 1-layer prefill evaluates only the K/V caches).
MEASURED_TERMS = ("activations", "recompute", "logits_loss", "kv_cache", "prefill")
FLOOR = 30e6


def _rows() -> list[dict]:
    return json.loads(WIDTH.read_text())["measurements"]


def _label(row: dict) -> str:
    return f"{row['backend']}-{'-'.join(map(str, row['config']))}"


@pytest.mark.parametrize("row", _rows(), ids=_label)
def test_width_peaks_within_15_percent(row):
    plan = plan_of(rerooted(row, REPO))
    for phase in ("train", "eval"):
        planned, measured = getattr(plan, f"{phase}_peak"), row[f"{phase}_peak"]
        assert abs(planned / measured - 1) <= TOLERANCE, (phase, planned, measured)
        # the fitted part alone: measured minus the exact terms (weights, adapter, gradients, optimizer)
        exact = sum(t.bytes for t in plan.terms if t.phase in (phase, "both") and t.name not in MEASURED_TERMS)
        fitted = planned - exact
        assert abs(fitted - (measured - exact)) <= max(TOLERANCE * (measured - exact), FLOOR), \
            (phase, fitted, measured - exact)


def test_width_rows_cover_both_backends_and_the_calibration_set():
    rows = _rows()
    assert {r["backend"] for r in rows} == {"mlx", "cuda"}
    measured = {(r["backend"], tuple(r["config"])) for r in rows}
    assert measured == {(b, tuple(c)) for c in TASKS["causal-width"].configs for b in ("mlx", "cuda")}
    # the models are the real widths: hidden, heads, MLP and vocabulary of the presets
    for row in rows:
        shape = ModelShape.from_config(row["model_config"])
        preset = ModelShape.from_config(PRESETS["qwen2.5-7b" if shape.hidden_size == 3584 else "llama3-8b"])
        assert dataclasses.replace(shape, num_layers=0, model_type="", qkv_bias=False, storage_dtype="",
                                   source="") == \
            dataclasses.replace(preset, num_layers=0, model_type="", qkv_bias=False, storage_dtype="", source="")
        assert shape.num_layers in (1, 2) and shape.storage_dtype == "float32"
        assert row["spec"]["overrides"][0] == "model.quantize_bits=0"


def test_the_plan_names_the_widths_it_was_measured_at():
    """CALIBRATED_ON (what `trmlx plan` prints) lists exactly the hidden sizes of the committed measurements."""
    for path, widths in CALIBRATED_ON.items():
        rows = json.loads((REPO / path).read_text())["measurements"]
        assert tuple(sorted({r["model_config"]["hidden_size"] for r in rows})) == widths
    qwen = ModelShape.from_config(PRESETS["qwen2.5-7b"])
    assert calibration_note(qwen).endswith("hidden 3,584 is a measured width")
    assert "plan_calibration_width-cpu.json (hidden 3,584, 4,096)" in calibration_note(qwen)
    assert calibration_note(ModelShape.from_config(PRESETS["7b"])).endswith(
        "hidden 4,096 is a measured width")
    tiny = ModelShape.from_config({**PRESETS["tiny"], "hidden_size": 512})
    assert calibration_note(tiny).endswith("hidden 512 is not a measured width (the fit carried over)")


def test_llama3_8b_preset_is_meta_llama_3_8b():
    shape = ModelShape.from_config(PRESETS["llama3-8b"])
    assert shape.parameters() == 8_030_261_248
    assert (shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (8, 128, 128256)


def test_the_7b_plan_prints_where_its_coefficients_come_from(cli):
    result = cli("plan", str(REPO / "recipes" / "translate_7b.toml"), "--backend", "mlx", "--budget", "16GB",
                 "--model-shape", "qwen2.5-7b", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines at the terminal width
    assert "plan_calibration_width-cpu.json (hidden 3,584, 4,096): hidden 3,584 is a measured width" in text
