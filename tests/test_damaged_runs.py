"""Damaged runs (issue 15 §5): Ctrl-C at any moment then --resume equals the uninterrupted run record for record on
both backends; damaged checkpoints, pointers and adapters (disk faults: test_damaged_disk.py)."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.conftest import REPO
from trmlx import run as runner
from trmlx.checkpoints import Checkpoints
from trmlx.errors import TrainingInterrupted
from trmlx.loop import BatchCursor
from trmlx.report import read_log

QUICKSTART = str(REPO / "recipes" / "quickstart.toml")
# Two micro-batches a step, a report every 2 steps (so a report averages steps across a checkpoint), validation
# at 3 and 6, checkpoints at 2, 4, 6, and dropout on, so the RNG stream must continue exactly too.
SHORT = ["train.steps=6", "train.batch_size=4", "train.grad_accum=2", "train.log_every=2", "train.eval_every=3",
         "train.save_every=2", "train.warmup_steps=2", "train.max_eval_batches=2", "peft.dropout=0.1"]
TIMING = {"tokens_per_second", "peak_memory_gb", "elapsed_seconds"}  # wall-clock: never equal between runs


def _available(backend: str) -> bool:
    import importlib.util

    needed = ("mlx",) if backend == "mlx" else ("torch", "peft")
    return all(importlib.util.find_spec(m) is not None for m in needed)


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"needs the {b} backend"))
            for b in ("mlx", "cuda")]


def records(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(run_dir / "metrics.jsonl")]


def start(tmp, name, backend, overrides=SHORT):
    return runner.resolve_run(QUICKSTART, backend, list(overrides), str(tmp / name), None)


def resume(run_dir, backend):
    return runner.train(runner.resolve_run(None, backend, (), None, str(run_dir)), backend)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of each backend, trained once per module."""
    done = {}

    def get(backend: str):
        if backend not in done:
            out = tmp_path_factory.mktemp(f"straight-{backend}")
            runner.train(start(out, "run", backend), backend)
            done[backend] = out / "run"
        return done[backend]

    return get


def train_module(backend):
    import importlib

    return importlib.import_module(f"trmlx.backends.{backend}.train")


# ------------------------------------------------------------------------------- interrupts, injected exactly

def interrupt_at_call(monkeypatch, owner, name: str, nth: int, after: bool = False) -> None:
    """Patch owner.name so that its nth call raises KeyboardInterrupt: before it runs, or once it has returned."""
    original, calls = getattr(owner, name), [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if calls[0] == nth:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, call)


def _mid_step(monkeypatch, backend):
    """Ctrl-C after step 4 consumed its first micro-batch and drew its second: the rewind must give both back, and
    the checkpoint (step 3) must carry step 3's loss, which the report at step 4 averages."""
    interrupt_at_call(monkeypatch, BatchCursor, "next", 8, after=True)


def _after_checkpoint(monkeypatch, backend):
    original, fired = Checkpoints.save, [False]

    def save(self, position, write_state):
        folder = original(self, position, write_state)
        if position.step == 4 and not fired[0]:
            fired[0] = True
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(Checkpoints, "save", save)


def _in_validation(nth):
    return lambda monkeypatch, backend: interrupt_at_call(monkeypatch, train_module(backend), "evaluate_loss", nth)


def _sigint_in_update(monkeypatch, backend):
    """A real SIGINT delivered while the optimizer applies step 3's update: the update and the step count must
    land together (the signal waits for the end of the update). MLX's update is one compiled function (its Python
    body runs once, at tracing), so the signal is sent from that function's third call."""
    calls = [0]

    def signalled(apply):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return apply(*args, **kwargs)

        return call

    if backend == "mlx":
        import trmlx.backends.mlx.train as mlx_train

        plain = mlx_train.compiled_update
        monkeypatch.setattr(mlx_train, "compiled_update", lambda *args: signalled(plain(*args)))
    else:
        import torch

        monkeypatch.setattr(torch.optim.AdamW, "step", signalled(torch.optim.AdamW.step))


def _at_report(step, kind="train"):
    def on_report(report, steps):
        if report.step == step and report.kind == kind:
            raise KeyboardInterrupt
    return on_report


MOMENTS = {
    "mid-step": (_mid_step, None, "step-0000003"),
    "right-after-a-checkpoint": (_after_checkpoint, None, "step-0000004"),
    "during-validation": (_in_validation(1), None, "step-0000003"),
    "during-the-final-validation": (_in_validation(2), None, "step-0000006"),
    "sigint-inside-the-update": (_sigint_in_update, None, "step-0000003"),
    "in-the-consumer-at-a-report": (None, _at_report(4), "step-0000004"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, straight, backend, moment):
    inject, on_report, checkpoint = MOMENTS[moment]
    expected = straight(backend)
    with monkeypatch.context() as patch:
        if inject:
            inject(patch, backend)
        with pytest.raises(TrainingInterrupted) as stop:
            runner.train(start(tmp_path, "b", backend), backend, on_report=on_report)
    assert stop.value.checkpoint.endswith(checkpoint)
    resume(tmp_path / "b", backend)
    got = records(tmp_path / "b")
    assert [(r["kind"], r["step"]) for r in got] == [("train", 2), ("eval", 3), ("train", 4), ("train", 6),
                                                     ("eval", 6)]
    assert got == records(expected)  # every loss, learning rate, epoch and token count, bit for bit
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "b" / weights).read_bytes() == (expected / weights).read_bytes()


def test_interrupts_deferred_holds_a_sigint_until_the_block_ends():
    from trmlx.loop import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored_inside_the_deferred_block():
    """A run started with SIGINT ignored (nohup, a shell's background job) is not made interruptible by it."""
    from trmlx.loop import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------- damaged checkpoints, pointers, adapters

mlx_only = pytest.mark.skipif(not _available("mlx"), reason="needs the mlx backend")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An MLX run stopped by Ctrl-C inside step 5: checkpoints step-2 and step-4, `latest` = step-4."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as patch:
        calls, original = [0], BatchCursor.next

        def next_batch(self):
            calls[0] += 1
            if calls[0] == 10:
                raise KeyboardInterrupt
            return original(self)

        patch.setattr(BatchCursor, "next", next_batch)
        with pytest.raises(TrainingInterrupted):
            runner.train(start(out.parent, "run", "mlx"), "mlx")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "b")
    return tmp_path / "b"


def damage_latest_weights(run):
    weights = run / "checkpoints" / "step-0000004" / "trainable.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    return f"trainable.safetensors: {size // 2} bytes, {size} were written"


DAMAGES = {
    "truncated-checkpoint": (damage_latest_weights, "step-0000004 is damaged ({}); resuming from step-0000002"),
    "garbage-position": (lambda run: (run / "checkpoints/step-0000004/position.json").write_bytes(b"\x00garbage")
                         and "position.json: not UTF-8 text" or "",
                         "step-0000004 is damaged (position.json: not valid JSON (Expecting value at line 1 "
                         "column 1)); resuming from step-0000002"),
    "dangling-latest": (lambda run: (run / "checkpoints/latest").write_text("step-0000009") and "",
                        "checkpoints/latest names step-0000009, which does not exist; resuming from step-0000004"),
    "empty-latest": (lambda run: (run / "checkpoints/latest").write_text("") and "",
                     "checkpoints/latest is empty; resuming from step-0000004"),
}


@mlx_only
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_falls_back_to_the_last_good_one_and_says_so(tmp_path, capsys, interrupted, straight,
                                                                       damage):
    run = copy_of(interrupted, tmp_path)
    breaker, note = DAMAGES[damage]
    detail = breaker(run)
    capsys.readouterr()
    resume(run, "mlx")
    err = capsys.readouterr().err
    assert f"warning: --resume {run}: {note.format(detail)}\n" in err
    assert records(run) == records(straight("mlx"))  # the steps after the good checkpoint were trained again


@mlx_only
def test_no_usable_checkpoint_is_one_line_and_changes_nothing(tmp_path, cli, interrupted):
    run = copy_of(interrupted, tmp_path)
    damage_latest_weights(run)
    (run / "checkpoints/step-0000002/position.json").unlink()
    log = (run / "metrics.jsonl").read_bytes()
    result = cli("train", "--resume", str(run))
    size = (interrupted / "checkpoints/step-0000004/trainable.safetensors").stat().st_size
    assert result.exit_code == 2
    assert result.stderr == (f"error: --resume {run}: no usable checkpoint (step-0000004 is damaged "
                             f"(trainable.safetensors: {size // 2} bytes, {size} were written); step-0000002 is "
                             "damaged (no position.json: its write was cut off)); start a new run with trmlx train "
                             "RECIPE --output NEW_DIR\n")
    assert (run / "metrics.jsonl").read_bytes() == log


@mlx_only
def test_resume_with_the_other_backend_is_refused_before_loading(tmp_path, cli, interrupted):
    run = copy_of(interrupted, tmp_path)
    result = cli("train", "--resume", str(run), "--backend", "cuda")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: --resume {run}: its checkpoints were written by the mlx backend; resume with --backend mlx (a "
        "checkpoint holds one framework's optimizer state and parameter layout, so another backend could not "
        "continue it exactly; a finished run's adapter/ loads on both)\n")


@mlx_only
def test_a_kill_during_the_final_adapter_write_is_repaired_by_resume(tmp_path, cli, monkeypatch, straight):
    from trmlx.backends.mlx import MLXBackend

    expected = straight("mlx")

    def killed_mid_write(self, loaded, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_model.safetensors").write_bytes(b"\x10\x00")
        raise KeyboardInterrupt  # the kill: nothing after this line runs

    with monkeypatch.context() as patch:
        patch.setattr(MLXBackend, "save_adapter", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            runner.train(start(tmp_path, "b", "mlx"), "mlx")
    run = tmp_path / "b"
    assert not (run / "adapter").exists() and not (run / ".adapter.tmp").exists()  # never a half adapter
    result = cli("train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert (f"note: --resume {run}: the run finished but {run}/adapter is incomplete (missing); writing it from "
            "the last checkpoint\n") in result.stderr
    weights = "adapter/adapter_model.safetensors"
    assert (run / weights).read_bytes() == (expected / weights).read_bytes()
    assert records(run) == records(expected)
    again = cli("train", "--resume", str(run))
    assert again.exit_code == 2 and "the run already finished all 6 steps" in again.stderr


@mlx_only
@pytest.mark.parametrize("damage, message", [
    ("truncate-weights", "adapter_model.safetensors: not a complete safetensors file"),
    ("config-not-json", "adapter_config.json: not valid JSON (Expecting value at line 1 column 1)"),
])
def test_eval_of_a_damaged_adapter_is_one_line(tmp_path, cli, straight, damage, message):
    run = copy_of(straight("mlx"), tmp_path)
    if damage == "truncate-weights":
        (run / "adapter/adapter_model.safetensors").write_bytes(b"\xff" * 12)
    else:
        (run / "adapter/adapter_config.json").write_text("not json", encoding="utf-8")
    result = cli("eval", str(run), "--max-samples", "2")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}/adapter: {message}")
    assert lines[0].endswith(f"; trmlx train --resume {run} writes it again from the last checkpoint")
