"""Seq2seq (T5/mT5) on both backends: multitask data, training parity, per-task losses and metrics, adapters
that cross backends, and the tiny offline mT5 that the seq2seq quickstart uses."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlx.core", reason="seq2seq parity needs both backends")
pytest.importorskip("torch", reason="seq2seq parity needs both backends")

from tests.conftest import REPO  # noqa: E402
from trmlx import run as runner  # noqa: E402
from trmlx.report import read_log  # noqa: E402

QUICKSTART = str(REPO / "recipes" / "seq2seq_quickstart.toml")
SHORT = ["train.steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=0", "train.batch_size=4",
         "train.warmup_steps=1", "data.max_length=96"]


def records(run):
    return [r for r in read_log(run / "metrics.jsonl")]


def train(tmp_path, name, backend, extra=()):
    setup = runner.resolve_run(QUICKSTART, backend, SHORT + list(extra), str(tmp_path / name), None)
    return runner.train(setup, backend)


def test_tiny_mt5_is_rebuilt_byte_for_byte(tmp_path):
    from trmlx.tiny.t5 import DEFAULT_DATA, build_tiny_t5, shipped_texts

    built = build_tiny_t5(tmp_path / "t5", shipped_texts([REPO / d for d in DEFAULT_DATA]))
    committed = REPO / "recipes" / "models" / "tiny-mt5-tr"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (built / name).read_bytes() == (committed / name).read_bytes(), name


def test_multitask_training_agrees_across_backends_with_per_task_losses(tmp_path):
    train(tmp_path, "mlx", "mlx")
    train(tmp_path, "cuda", "cuda")
    a, b = records(tmp_path / "mlx"), records(tmp_path / "cuda")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) / x["loss"] < 1e-3, x["step"]
    evals = [r for r in a if r["kind"] == "eval"]
    assert set(evals[-1]["task_losses"]) == {"qa", "summarize"}
    for task, loss in evals[-1]["task_losses"].items():
        assert loss == pytest.approx(next(r for r in b if r["kind"] == "eval" and r["step"] == evals[-1]["step"])
                                     ["task_losses"][task], rel=1e-3)


def test_per_task_metrics_and_cross_backend_adapters(tmp_path, cli):
    train(tmp_path, "run", "mlx", ["train.lr=1e-2"])
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    assert set(config["target_modules"]) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    results = {}
    for backend in ("mlx", "cuda"):
        out = tmp_path / f"eval-{backend}"
        result = cli("eval", str(tmp_path / "run"), "--backend", backend, "--max-samples", "3", "--output",
                     str(out), "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        results[backend] = report, (out / "predictions" / "test.jsonl").read_text()
    report = results["mlx"][0]
    assert report["n"] == 6  # 3 per task, not 3 in all
    assert set(report["per_task"]["qa"]) == {"em", "f1"}
    assert set(report["per_task"]["summarize"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert results["mlx"][1] == results["cuda"][1]  # greedy predictions identical across backends
    assert report["metrics"]["loss"] == pytest.approx(results["cuda"][0]["metrics"]["loss"], rel=1e-4)


def test_4bit_t5_trains_on_mlx(tmp_path):
    summary = train(tmp_path, "q4", "mlx", ["model.quantize_bits=4", "train.steps=2", "train.eval_every=0"])
    assert summary["final_train_loss"] > 0
