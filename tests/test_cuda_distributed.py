"""Data-parallel training through torch.distributed, tested with two CPU processes (gloo) under torchrun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the CUDA backend needs torch (pip install 'trmlx[cuda]')")

from tests.conftest import REPO  # noqa: E402
from trmlx import run as runner  # noqa: E402
from trmlx.report import read_log  # noqa: E402

QUICKSTART = str(REPO / "recipes" / "quickstart.toml")
SETTINGS = ["train.steps=4", "train.log_every=1", "train.batch_size=4", "train.warmup_steps=1",
            "train.save_every=2", "train.eval_every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "trmlx", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def records(run: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_log(run / "metrics.jsonl")]


def test_two_processes_equal_one_process_with_the_same_global_batch_and_resume(tmp_path):
    sets = [arg for s in SETTINGS for arg in ("--set", s)]
    done = torchrun(QUICKSTART, "--backend", "cuda", "--output", str(tmp_path / "ddp"), *sets)
    assert done.returncode == 0, done.stderr[-2000:]
    single = runner.resolve_run(QUICKSTART, "cuda", SETTINGS + ["train.grad_accum=2"], str(tmp_path / "one"), None)
    runner.train(single, "cuda")
    ddp, one = records(tmp_path / "ddp"), records(tmp_path / "one")
    # Rank 0 alone writes: one line per report, not one per process.
    assert [(k, s) for k, s, _ in ddp] == [(k, s) for k, s, _ in one] == [("train", s) for s in range(1, 5)] + [
        ("eval", 4)]
    assert [x[2] for x in ddp] == pytest.approx([x[2] for x in one], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["latest", "step-0000002",
                                                                                    "step-0000004"]
    # Resume both processes from step 2: steps 3-4 come out the same again.
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step-0000004")
    (tmp_path / "ddp" / "checkpoints" / "latest").write_text("step-0000002")
    resumed = torchrun("--resume", str(tmp_path / "ddp"), "--backend", "cuda")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [x[2] for x in records(tmp_path / "ddp")] == pytest.approx([x[2] for x in one], rel=1e-5)
