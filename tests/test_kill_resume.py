"""`kill -9` of a real `trmlx train` process, then `trmlx train --resume`, equals the uninterrupted run: every loss
and validation record and the adapter's bytes, on both backends (issue 15 §5 Faults). The Ctrl-C twin, with
moments injected in-process, is test_damaged_runs.py; here nothing is simulated: the run folder is polled and the
process is SIGKILLed when a moment is seen on disk, so no handler, `finally` or flush runs."""

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
    """A `trmlx train` subprocess and the moments seen in its run folder (seconds since launch)."""

    def __init__(self, run: Path, backend: str):
        self.run, self.seen, self.killed = run, {}, False
        self.log = run.with_name(run.name + ".stderr")
        args = [sys.executable, "-m", "trmlx", "train", QUICKSTART, "--backend", backend, "--output", str(run),
                "--json"]
        for setting in SETTINGS:
            args += ["--set", setting]
        with open(self.log, "wb") as err:  # cwd: the checkout under test, not an installed copy
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        self.start = time.monotonic()

    def until(self, moment: Callable[["Watch"], bool], timeout: float = 300.0) -> "Watch":
        """Poll the run folder; SIGKILL the process as soon as `moment(self)` holds, or let it finish."""
        while self.proc.poll() is None:
            self._look()
            if moment(self):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self.killed = True
                return self
            if time.monotonic() - self.start > timeout:
                self.proc.kill()
                raise AssertionError(f"trmlx train ran past {timeout} s: {self.log.read_text()[-2000:]}")
            time.sleep(POLL_SECONDS)
        assert self.proc.returncode == 0, self.log.read_text()[-2000:]
        return self

    def _look(self) -> None:
        names = _listing(self.run / "checkpoints") + [n for n in _listing(self.run) if n in ("adapter", "plots")
                                                      or n.startswith(".")]
        if "latest" in names:
            names.append(_pointer(self.run) or "latest-empty")
        for name in names:
            self.seen.setdefault(name, time.monotonic() - self.start)

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
            done[backend] = Watch(tmp_path_factory.mktemp(f"straight-{backend}") / "run", backend).until(
                lambda watch: False)
            assert [(r["kind"], r["step"]) for r in records(done[backend].run)] == LOGGED
        return done[backend]

    return get


def resumed_equals(cli, watch: Watch, expected: Path, backend: str, why: str) -> None:
    """`trmlx train --resume` finishes the killed run; then it must equal the uninterrupted one."""
    run, moment = watch.run, f"{why}; the kill left {watch.state()}"
    finished = adapter_problem(run / "adapter") is None  # killed after the adapter was complete (plot, exit)
    trained = _pointer(run) == f"step-{STEPS:07d}"  # only the final adapter write is left to redo
    result = cli("train", "--resume", str(run), "--backend", backend)
    if finished:
        assert result.exit_code == 2 and f"the run already finished all {STEPS} steps" in result.stderr, moment
    else:
        assert result.exit_code == 0, f"{moment}: {result.output}"
        if trained:
            assert f"the run finished but {run}/adapter is incomplete" in result.stderr, moment
    assert records(run) == records(expected), moment  # every loss, learning rate, epoch and token count
    assert (run / WEIGHTS).read_bytes() == (expected / WEIGHTS).read_bytes(), moment


def _published(step: int) -> Callable[[Watch], bool]:
    return lambda watch: _pointer(watch.run) == f"step-{step:07d}"


def _checkpoint_being_written(watch: Watch) -> bool:
    """A checkpoint's temp folder or `latest`'s temp file exists, after the first checkpoint (so one is kept)."""
    folder = watch.run / "checkpoints"
    return "latest" in watch.seen and any(n.startswith(".") and n.endswith(".tmp") for n in _listing(folder))


def _adapter_being_written(watch: Watch) -> bool:
    return (watch.run / ".adapter.tmp").exists()


MOMENTS = {
    "the-second-checkpoint-is-published": (_published(6), lambda state: "latest='step-0000006'" in state),
    "a-checkpoint-is-being-written": (_checkpoint_being_written, lambda state: ".tmp" in state.split("latest=")[0]),
    "the-final-adapter-is-being-written": (_adapter_being_written, lambda state: "adapter complete" not in state),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, cli, straight, backend, moment):
    expected = straight(backend).run
    when, landed = MOMENTS[moment]
    watch = Watch(tmp_path / "b", backend).until(when)
    assert watch.killed, f"the run finished before {moment}: {watch.seen}"
    assert landed(watch.state()), f"the kill missed {moment}: {watch.state()}"
    resumed_equals(cli, watch, expected, backend, f"killed when {moment}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_at_a_random_moment_then_resume_equals_the_uninterrupted_run(tmp_path, cli, straight, backend):
    """A delay drawn in the uninterrupted run's window from the first checkpoint to the final adapter; a new seed
    every run (TRMLX_KILL_SEED=N repeats one), printed in the failure message."""
    base = straight(backend)
    seed = int(os.environ.get("TRMLX_KILL_SEED", random.SystemRandom().randrange(1 << 31)))
    window = base.seen["adapter"] - base.seen["latest"]
    delay = random.Random(seed).uniform(0.0, window)
    watch = Watch(tmp_path / "b", backend)
    watch.until(lambda w: "latest" in w.seen and time.monotonic() - w.start - w.seen["latest"] >= delay)
    why = (f"TRMLX_KILL_SEED={seed}: killed {delay:.3f} s after the first checkpoint (window {window:.3f} s, "
           f"killed={watch.killed})")
    resumed_equals(cli, watch, base.run, backend, why)
