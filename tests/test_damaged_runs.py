"""Damaged runs (issue 15 §5): Ctrl-C at any moment then --resume equals the uninterrupted run record for record on
both backends; damaged checkpoints, pointers and adapters; full or read-only disks; rerunning a failed run."""

from __future__ import annotations

import errno
import os
import shutil
import signal

import pytest

from tests.conftest import REPO
from trmlx import run as runner
from trmlx.checkpoints import Checkpoints
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.loop import BatchCursor
from trmlx.report import read_log
from trmlx.rundir import RunDir

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

def _mid_step(monkeypatch, backend):
    """Ctrl-C after step 4 consumed its first micro-batch and drew its second: the rewind must give both back, and
    the checkpoint (step 3) must carry step 3's loss, which the report at step 4 averages."""
    calls, original = [0], BatchCursor.next

    def next_batch(self):
        batch = original(self)
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(BatchCursor, "next", next_batch)


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
    def inject(monkeypatch, backend):
        module, calls = train_module(backend), [0]
        original = module.evaluate_loss

        def evaluate_loss(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "evaluate_loss", evaluate_loss)

    return inject


def _sigint_in_update(monkeypatch, backend):
    """A real SIGINT delivered while the optimizer applies step 3's update: the update and the step count must
    land together (the signal waits for the end of the update)."""
    if backend == "mlx":
        import mlx.optimizers as optim

        cls, name = optim.Optimizer, "update"
    else:
        import torch

        cls, name = torch.optim.AdamW, "step"
    original, calls = getattr(cls, name), [0]

    def update(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, update)


def _at_report(step):
    def on_report(report, steps):
        if report.step == step and report.kind == "train":
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
