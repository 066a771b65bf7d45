"""`kill -9` of a real `trmlx train` process, then `trmlx train --resume`, equals the uninterrupted run: every loss
and validation record and the adapter's bytes, on both backends (issue 15 §5 Faults). The Ctrl-C twin, with
moments injected in-process, is test_damaged_runs.py; here nothing is simulated: the run folder is polled and the
process is SIGKILLed when a moment is seen on disk, so no handler, `finally` or flush runs.

Every run, the killed ones and the resumes, is its own `python -m trmlx` process: the pytest process loads MLX's
OpenBLAS into the global symbol scope (tests/conftest.py), which changes torch's CPU matmul rounding, so a torch run
resumed in here would differ from one resumed by the CLI in the last bits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO
from tests.test_damaged_runs import BACKENDS, QUICKSTART, records
from trmlx.integrity import adapter_problem

# 12 steps of two micro-batches: checkpoints at 3, 6, 9, 12, validation at 5, 10, 12, a report every 2 steps (the
# one at 4 averages steps across checkpoint 3), dropout on, so the RNG stream must continue exactly too.
STEPS = 12
SETTINGS = [f"train.steps={STEPS}", "train.batch_size=4", "train.grad_accum=2", "train.log_every=2",
            "train.eval_every=5", "train.save_every=3", "train.warmup_steps=2", "train.max_eval_batches=2",
            "peft.dropout=0.1"]
LOGGED = [("train", 2), ("train", 4), ("eval", 5), ("train", 6), ("train", 8), ("train", 10), ("eval", 10),
          ("train", 12), ("eval", 12)]
WEIGHTS = "adapter/adapter_model.safetensors"
POLL_SECONDS = 0.0005  # checkpoint and adapter temp folders live 10-30 ms on this machine's disk


class Watch:
    """One `trmlx train` process (a new run, or `--resume`) and the moments seen in its run folder (seconds since
    launch)."""

    def __init__(self, run: Path, backend: str, resume: bool = False):
        self.run, self.seen, self.killed = run, {}, False
        self.before = set(self._names())  # what earlier processes left; moments are what this one writes
        self.log = run.with_name(f"{run.name}.{len(list(run.parent.glob(run.name + '.*.stderr')))}.stderr")
        args = [sys.executable, "-m", "trmlx", "train", "--backend", backend, "--json"]
        args += ["--resume", str(run)] if resume else [QUICKSTART, "--output", str(run)]
        for setting in () if resume else SETTINGS:
            args += ["--set", setting]
        with open(self.log, "wb") as err:  # cwd: the checkout under test, not an installed copy
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        self.start = time.monotonic()

    def until(self, moment: Callable[["Watch"], bool], timeout: float = 300.0) -> "Watch":
        """Poll the run folder; SIGKILL the process as soon as `moment(self)` holds, or let it finish."""
        while self.proc.poll() is None:
            for name in self._names():
                self.seen.setdefault(name, time.monotonic() - self.start)
            if moment(self):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self.killed = True
                return self
            if time.monotonic() - self.start > timeout:
                self.proc.kill()
                raise AssertionError(f"trmlx train ran past {timeout} s: {self.stderr()[-2000:]}")
            time.sleep(POLL_SECONDS)
        return self

    def finished(self) -> "Watch":
        self.until(lambda watch: False)
        assert self.proc.returncode == 0, self.stderr()[-2000:]
        return self

    def new(self, name: str) -> bool:
        return name in self.seen and name not in self.before

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def _names(self) -> list[str]:
        names = _listing(self.run / "checkpoints") + [n for n in _listing(self.run) if n in ("adapter", "plots")
                                                      or n.startswith(".")]
        return names + ([f"latest={_pointer(self.run)}"] if "latest" in names else [])

    def state(self) -> str:
        """What the kill left, for the failure message."""
        log = self.run / "metrics.jsonl"
        lines = log.read_text(encoding="utf-8").count("\n") if log.is_file() else 0
        return (f"checkpoints/ {_listing(self.run / 'checkpoints')}, latest={_pointer(self.run)!r}, adapter "
                f"{adapter_problem(self.run / 'adapter') or 'complete'}, {lines} metrics lines")


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def _pointer(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted CLI run of each backend (once per module), with the times its moments appeared."""
    done: dict[str, Watch] = {}

    def get(backend: str) -> Watch:
        if backend not in done:
            done[backend] = Watch(tmp_path_factory.mktemp(f"straight-{backend}") / "run", backend).finished()
            assert [(r["kind"], r["step"]) for r in records(done[backend].run)] == LOGGED
        return done[backend]

    return get


def resume_to_the_end(run: Path, backend: str, why: str) -> None:
    """`trmlx train --resume` finishes the killed run (or says it already had: killed after the adapter was
    complete, in the plot or the exit)."""
    complete, trained = adapter_problem(run / "adapter") is None, _pointer(run) == f"step-{STEPS:07d}"
    watch = Watch(run, backend, resume=True).until(lambda watch: False)
    err = watch.stderr()
    if complete:
        assert watch.proc.returncode == 2 and f"the run already finished all {STEPS} steps" in err, f"{why}: {err}"
        return
    assert watch.proc.returncode == 0, f"{why}: {err[-2000:]}"
    if trained:  # only the final adapter write was left to redo
        assert f"the run finished but {run}/adapter is incomplete" in err, f"{why}: {err}"


def assert_same(run: Path, expected: Path, why: str) -> None:
    assert records(run) == records(expected), why  # every loss, learning rate, epoch and token count, bit for bit
    assert (run / WEIGHTS).read_bytes() == (expected / WEIGHTS).read_bytes(), why


def _published(step: int) -> Callable[[Watch], bool]:
    return lambda watch: _pointer(watch.run) == f"step-{step:07d}"


def _checkpoint_being_written(watch: Watch) -> bool:
    """A checkpoint's temp folder or `latest`'s temp file of this process exists."""
    return any(n.startswith(".") and n.endswith(".tmp") and watch.new(n) for n in _listing(watch.run / "checkpoints"))


def _adapter_being_written(watch: Watch) -> bool:
    return (watch.run / ".adapter.tmp").exists()


# Killed in turn: the new run, then each resume; the last resume finishes. (label, moment, what the kill left)
CHAIN = [("the second checkpoint is published", _published(6), lambda run: _pointer(run) == "step-0000006"),
         ("the resumed run writes a checkpoint", _checkpoint_being_written,
          lambda run: any(n.endswith(".tmp") for n in _listing(run / "checkpoints"))),
         ("the resumed run writes the final adapter", _adapter_being_written,
          lambda run: (run / ".adapter.tmp").exists() and not (run / "adapter").exists())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_at_three_moments_then_resume_equals_the_uninterrupted_run(tmp_path, straight, backend):
    expected, run, story = straight(backend).run, tmp_path / "b", []
    for n, (label, moment, landed) in enumerate(CHAIN):
        watch = Watch(run, backend, resume=n > 0).until(moment)
        story.append(f"killed when {label}: {watch.state()}")
        assert watch.killed, f"the process finished before {label}: {watch.seen}; {watch.stderr()[-2000:]}"
        assert landed(run), "; ".join(story)
    resume_to_the_end(run, backend, "; ".join(story))
    assert_same(run, expected, "; ".join(story))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_at_a_random_moment_then_resume_equals_the_uninterrupted_run(tmp_path, straight, backend):
    """A delay drawn in the uninterrupted run's window from its first checkpoint to its final adapter; a new seed
    every run (TRMLX_KILL_SEED=N repeats the draw), printed in the failure message."""
    base = straight(backend)
    seed = int(os.environ.get("TRMLX_KILL_SEED", random.SystemRandom().randrange(1 << 31)))
    window = base.seen["adapter"] - base.seen["latest"]
    delay = random.Random(seed).uniform(0.0, window)
    watch = Watch(tmp_path / "b", backend)
    watch.until(lambda w: "latest" in w.seen and time.monotonic() - w.start - w.seen["latest"] >= delay)
    assert watch.killed or watch.proc.returncode == 0, watch.stderr()[-2000:]
    why = (f"TRMLX_KILL_SEED={seed}: killed {delay:.3f} s after the first checkpoint (window {window:.3f} s, "
           f"killed={watch.killed}); the kill left {watch.state()}")
    resume_to_the_end(watch.run, backend, why)
    assert_same(watch.run, base.run, why)
