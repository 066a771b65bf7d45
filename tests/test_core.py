"""Run directory, atomic writes, environment record, precision policy and the backend registry."""

from __future__ import annotations

import json
import os

import pytest

from trmlx.backend import REGISTRY, get_backend
from trmlx.errors import UserError
from trmlx.precision import choose_dtype
from trmlx.rundir import RunDir, atomic_write, create_run_dir, default_run_path, environment_record


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write(target, '{"step": 1}')

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, '{"step": 2}')
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_run_dir_layout_and_no_overwrite(tmp_path):
    env = environment_record(backend="mlx", device={"name": "cpu"})
    run = create_run_dir(tmp_path / "run", 'task = "causal"\n', env)
    assert run.recipe.read_text() == 'task = "causal"\n'
    assert json.loads(run.environment.read_text())["backend"] == "mlx"
    assert run.predictions("test") == tmp_path / "run" / "predictions" / "test.jsonl"
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        create_run_dir(tmp_path / "run", "x", env)
    assert run.recipe.read_text() == 'task = "causal"\n'  # nothing written over
    assert create_run_dir(tmp_path / "run", 'task = "causal"\n', env, resume=True) == RunDir(tmp_path / "run")


def test_default_run_path_and_environment():
    assert default_run_path("translate_7b").name.startswith("translate_7b-")
    env = environment_record()
    assert env["packages"]["trmlx"] == "0.1.0" and env["python"].startswith("3.")


@pytest.mark.parametrize("task,requested,bf16,expected", [
    ("causal", "auto", True, "bf16"),
    ("causal", "auto", False, "fp16"),   # T4/P100: fp16 with loss scaling
    ("seq2seq", "auto", False, "fp32"),  # T5 overflows in fp16
    ("embedding", "auto", False, "fp16"),
    ("causal", "bf16", False, "fp32"),
    ("causal", "fp32", True, "fp32"),
])
def test_precision_policy(task, requested, bf16, expected):
    dtype, reason = choose_dtype(task, requested, bf16)
    assert dtype == expected and reason
    assert choose_dtype(task, "auto", bf16, on_gpu=False)[0] == "fp32"


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match=r"--backend: unknown backend 'tpu'; expected one of mlx, cuda"):
        get_backend("tpu")
    assert set(REGISTRY) == {"mlx", "cuda"}


def test_generation_defaults_are_the_schema_defaults_and_the_backend_list_is_one():
    import dataclasses

    from trmlx.backend import REGISTRY, GenerationSettings
    from trmlx.cli import main
    from trmlx.recipe.schema import BACKEND_NAMES, EvalConfig

    shared = {f.name for f in dataclasses.fields(GenerationSettings)} & {f.name for f in dataclasses.fields(EvalConfig)}
    assert shared == {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"}
    assert all(getattr(GenerationSettings(), n) == getattr(EvalConfig(), n) for n in shared)
    assert tuple(REGISTRY) == BACKEND_NAMES
    choices = {name: tuple(o.type.choices) for name, command in main.commands.items() for o in command.params
               if o.name == "backend"}
    assert len(choices) >= 7 and set(choices.values()) == {BACKEND_NAMES}, choices


def test_loop_decisions_shared_by_every_backend():
    from trmlx.errors import UserError
    from trmlx.loop import Position, eval_report, require_examples, rewind, step_seed
    from trmlx.recipe.schema import TrainConfig

    with pytest.raises(UserError, match="^data.train: no training examples left after checks and truncation$"):
        require_examples([])
    assert step_seed(TrainConfig(seed=3), 7) == 3 * 1_000_003 + 7 != step_seed(TrainConfig(seed=3), 8)
    interrupted = Position(step=4, epoch=1, cursor=9)  # Ctrl-C inside step 5, after two of its micro-batches
    rewind(interrupted, 5, (1, 7))
    assert (interrupted.epoch, interrupted.cursor) == (1, 7)
    completed = Position(step=5, epoch=1, cursor=9)  # Ctrl-C after step 5's update: nothing to give back
    rewind(completed, 5, (1, 7))
    assert (completed.epoch, completed.cursor) == (1, 9)
    report = eval_report(5, 1.5, 2.0, Position(step=5, trained_tokens=80, elapsed_seconds=3.0), 0.25)
    assert (report.kind, report.trained_tokens, report.elapsed_seconds, report.task_losses) == ("eval", 80, 3.0, {})
