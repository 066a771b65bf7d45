"""The MLX training loop end to end on the tiny offline Llama: CLI run, exact resume, Ctrl-C, shipped recipes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")

from tests.conftest import REPO  # noqa: E402
from trmlx import run as runner  # noqa: E402
from trmlx.errors import TrainingInterrupted  # noqa: E402
from trmlx.report import read_log  # noqa: E402
from trmlx.schedule import learning_rate, total_steps  # noqa: E402
from trmlx.recipe.schema import TrainConfig  # noqa: E402

QUICKSTART = str(REPO / "recipes" / "quickstart.toml")
SHORT = ["train.steps=6", "train.log_every=1", "train.save_every=2", "train.eval_every=3", "train.batch_size=4",
         "train.warmup_steps=2"]


def losses(run_dir) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_log(run_dir / "metrics.jsonl")]


def test_quickstart_trains_and_writes_the_run_dir(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", QUICKSTART, "--output", str(out), "--json", "--set", "train.steps=4",
                 "--set", "train.log_every=2", "--set", "train.warmup_steps=1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["final_train_loss"] > 0
    for name in ("recipe.toml", "environment.json", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "plots/loss.png", "checkpoints/latest"):
        assert (out / name).exists(), name
    assert json.loads((out / "environment.json").read_text())["backend"] == "mlx"
    assert [(k, s) for k, s, _ in losses(out)] == [("train", 2), ("train", 4), ("eval", 4)]
    evaluated = cli("eval", str(out), "--max-samples", "4", "--json")  # the run's own adapter loads back
    assert evaluated.exit_code == 0, evaluated.output
    assert {"bleu", "chrf"} <= set(json.loads(evaluated.stdout)["metrics"])
    again = cli("train", QUICKSTART, "--output", str(out))
    assert again.exit_code == 2 and "already holds a run; pass --resume" in again.stderr


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path):
    straight = runner.resolve_run(QUICKSTART, "mlx", SHORT, str(tmp_path / "a"), None)
    runner.train(straight, "mlx")

    def ctrl_c_at_step_3(report, steps):
        if report.step == 3 and report.kind == "train":
            raise KeyboardInterrupt

    interrupted = runner.resolve_run(QUICKSTART, "mlx", SHORT, str(tmp_path / "b"), None)
    with pytest.raises(TrainingInterrupted) as stop:
        runner.train(interrupted, "mlx", on_report=ctrl_c_at_step_3)
    assert stop.value.checkpoint.endswith("step-0000003")
    runner.train(runner.resolve_run(None, "mlx", (), None, str(tmp_path / "b")), "mlx")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    # Every training step and the final validation match; the validation due at step 3 was cut by the Ctrl-C.
    train_a, train_b = ([(s, loss) for k, s, loss in run if k == "train"] for run in (a, b))
    assert [s for s, _ in train_b] == [s for s, _ in train_a] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in train_b] == pytest.approx([loss for _, loss in train_a], rel=1e-5)
    assert b[-1][:2] == a[-1][:2] == ("eval", 6) and b[-1][2] == pytest.approx(a[-1][2], rel=1e-5)


def test_translate_7b_recipe_runs_two_steps_with_the_tiny_model(tmp_path):
    tiny = str(REPO / "recipes" / "models" / "tiny-llama-tr")
    setup = runner.resolve_run(str(REPO / "recipes" / "translate_7b.toml"), "mlx",
                               [f"model.path='{tiny}'", "train.steps=2", "train.epochs=0", "train.batch_size=2",
                                "train.grad_accum=2", "peft.layers=2", "train.warmup_steps=1"],
                               str(tmp_path / "run"), None)
    assert setup.recipe.model.quantize_bits == 4 and setup.recipe.data.chat  # 4-bit QLoRA, chat template
    summary = runner.train(setup, "mlx")
    assert summary["steps"] == 2 and summary["final_train_loss"] > 0


def test_resume_needs_a_run_dir(cli, tmp_path):
    result = cli("train", "--resume", str(tmp_path))
    assert result.exit_code == 2 and "not a run directory (no recipe.toml)" in result.stderr


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, steps=6)
    assert [round(learning_rate(s, cfg, 6), 4) for s in range(1, 7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464]
    assert total_steps(TrainConfig(epochs=2.0, grad_accum=2), micro_batches_per_epoch=5) == 6


def _short_run(tmp_path, name, extra=()):
    setup = runner.resolve_run(QUICKSTART, "mlx", SHORT + list(extra), str(tmp_path / name), None)
    runner.train(setup, "mlx")
    return losses(tmp_path / name)


def test_gradient_checkpointing_changes_memory_not_numbers(tmp_path):
    plain = _short_run(tmp_path, "plain")
    checkpointed = _short_run(tmp_path, "ckpt", ["train.grad_checkpoint=true"])
    assert [loss for *_, loss in checkpointed] == pytest.approx([loss for *_, loss in plain], rel=1e-5)


def test_accumulation_equals_a_bigger_batch(tmp_path, write):
    """Token-weighted accumulation: 2 micro-batches of 2 give exactly the update of one batch of 4."""
    rows = [{"source": "Good morning.", "target": "Günaydın."},
            {"source": "Where is the station?", "target": "İstasyon nerede?"},
            {"source": "I like tea very much.", "target": "Çayı çok severim."},
            {"source": "Thank you.", "target": "Teşekkür ederim."}]
    data = write("four.jsonl", rows)
    common = [f"data.train='{data}'", f"data.valid='{data}'", f"data.test='{data}'", "train.steps=3",
              "train.warmup_steps=0", "train.eval_every=0"]
    one = _short_run(tmp_path, "one", common + ["train.batch_size=4", "train.grad_accum=1"])
    two = _short_run(tmp_path, "two", common + ["train.batch_size=2", "train.grad_accum=2"])
    assert [s for k, s, _ in one if k == "train"] == [1, 2, 3]
    assert [loss for *_, loss in two] == pytest.approx([loss for *_, loss in one], rel=1e-5)
    assert one[1][2] != pytest.approx(one[0][2], rel=1e-3)  # the updates really changed the model


def test_adafactor_trains(tmp_path):
    run = _short_run(tmp_path, "ada", ["train.optimizer='adafactor'"])
    assert all(loss == loss and loss > 0 for *_, loss in run)  # finite, positive


def test_nan_loss_stops_within_one_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import numpy as np

    from trmlx.data import packing  # where the training loops' batches are collated
    from trmlx.errors import UserError

    real = packing.collate
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        batch = real(*args, **kwargs)
        if calls["n"] > 6:  # one micro-batch per step: steps 1-6 are fine, step 7 sees a NaN loss
            batch["mask"] = batch["mask"] * np.float32("nan")
        return batch

    monkeypatch.setattr(packing, "collate", poisoned)
    setup = runner.resolve_run(QUICKSTART, "mlx", SHORT + ["train.steps=10", "train.eval_every=0"],
                               str(tmp_path / "nan"), None)
    with pytest.raises(UserError) as err:
        runner.train(setup, "mlx")
    (message,) = err.value.problems
    assert message.startswith("train: loss became nan at step 7; stopped without saving this step (last good "
                              "checkpoint: ")
    assert message.rstrip().endswith('or model.dtype = "fp32"') and "step-0000006" in message
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-0000006"
    assert [s for k, s, _ in losses(tmp_path / "nan")] == [1, 2, 3, 4, 5, 6]


def test_prequantised_checkpoint_is_loaded_not_requantised(tmp_path):
    import shutil

    import mlx.nn as nn
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    from trmlx.backends.mlx.model import load as trmlx_load
    from trmlx.recipe import load_recipe

    tiny = REPO / "recipes" / "models" / "tiny-llama-tr"
    model, tokenizer, config = load(str(tiny), return_config=True)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    out = tmp_path / "q4"
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    recipe = load_recipe(QUICKSTART, [f"model.path='{out}'", "model.quantize_bits=4"])
    loaded = trmlx_load(recipe)
    q = loaded.model.layers[0].self_attn.q_proj.linear
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 64


def test_resuming_a_finished_run_says_so(cli, tmp_path):
    out = tmp_path / "done"
    assert cli("train", QUICKSTART, "--output", str(out), "--set", "train.steps=2", "--set",
               "train.warmup_steps=0").exit_code == 0
    again = cli("train", "--resume", str(out))
    assert again.exit_code == 2
    assert again.stderr.strip() == (f"error: --resume {out}: the run already finished all 2 steps; evaluate it "
                                    f"with trmlx eval {out}")


def test_gradient_checkpointing_does_not_leak_into_later_models(tmp_path):
    from trmlx.backends.mlx.model import load
    from trmlx.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    block_type = type(load(recipe).model.layers[0])
    plain = block_type.__call__
    _short_run(tmp_path, "ckpt", ["train.grad_checkpoint=true", "train.steps=1", "train.warmup_steps=0"])
    assert block_type.__call__ is plain
