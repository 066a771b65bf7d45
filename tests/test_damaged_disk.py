"""Damaged runs (issue 15 §5), the disk: a full or read-only folder for train, eval and export, ENOSPC on the
metrics log and on a checkpoint (one-line errors, nothing already written lost), and rerunning a failed run."""

from __future__ import annotations

import errno
import os

import pytest

from tests.test_damaged_runs import (QUICKSTART, SHORT, copy_of, interrupted, mlx_only, records,  # noqa: F401
                                     resume, start, straight, train_module)
from trmlx import run as runner
from trmlx.errors import UserError


# -------------------------------------------------------------------------------------- full or read-only disks

def read_only(monkeypatch, folder):
    """Make `folder` read-only: chmod where that binds; as root (where it does not) refuse writes below it in
    the os/io calls every writer goes through."""
    folder = os.path.realpath(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return lambda: os.chmod(folder, 0o755)

    def inside(path) -> bool:
        return os.path.realpath(os.fspath(path)).startswith(folder)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    real_open, real_os_open = __import__("io").open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded(real):
        def call(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    import builtins
    import io

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("mkdir", "rmdir", "unlink", "remove", "rename", "replace", "truncate"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    return lambda: None


@pytest.fixture
def readonly(monkeypatch):
    restore = []
    yield lambda folder: restore.append(read_only(monkeypatch, folder))
    for undo in restore:
        undo()


@mlx_only
def test_train_into_a_read_only_folder_is_one_line(tmp_path, cli, readonly):
    (tmp_path / "ro").mkdir()
    readonly(tmp_path / "ro")
    result = cli("train", QUICKSTART, "--output", str(tmp_path / "ro" / "run"), *sum((["--set", s] for s in SHORT), []))
    assert result.exit_code == 2
    assert result.stderr == (f"error: {tmp_path}/ro/run: permission denied while checking that the run directory "
                             "can be written; nothing was written\n")
    assert not (tmp_path / "ro" / "run").exists()


@mlx_only
def test_eval_and_export_into_read_only_folders_are_one_line_and_keep_the_run(tmp_path, cli, readonly, straight):
    run = copy_of(straight("mlx"), tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (tmp_path / "ro").mkdir()
    readonly(run)
    readonly(tmp_path / "ro")
    evaluated = cli("eval", str(run), "--max-samples", "2")
    assert evaluated.exit_code == 2
    assert evaluated.stderr == (f"error: {run}/predictions: permission denied while checking that eval can save its "
                                "predictions; nothing was written\n")
    exported = cli("export", str(run), str(tmp_path / "ro" / "merged"))
    assert exported.exit_code == 2
    assert exported.stderr == (f"error: {tmp_path}/ro: permission denied while checking that {tmp_path}/ro/merged "
                               "can be written; nothing was written\n")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@mlx_only
def test_enospc_on_the_metrics_log_stops_cleanly_and_resume_is_exact(tmp_path, monkeypatch, straight):
    import trmlx.report

    real_open = open

    class FullDisk:
        """metrics.jsonl on a disk that fills up in the middle of the record of step 4."""

        def __init__(self, file, *args, **kwargs):
            self.file = real_open(file, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            if '"step": 4' in text:
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

    with monkeypatch.context() as patch:
        patch.setattr(trmlx.report, "open", FullDisk, raising=False)
        with pytest.raises(UserError) as stop:
            runner.train(start(tmp_path, "b", "mlx"), "mlx")
    run = tmp_path / "b"
    assert str(stop.value) == (f"{run}/metrics.jsonl: no space left on device while logging step 4; the records "
                               f"before it are intact; free space, then trmlx train --resume {run} continues from "
                               "the last checkpoint")
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and records(run) == records(straight("mlx"))[:2]  # no torn line left behind
    resume(run, "mlx")
    assert records(run) == records(straight("mlx"))


@mlx_only
def test_enospc_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight):
    module = train_module("mlx")
    original = module.save_state

    def save_state(folder, model, optimizer):
        if folder.name == ".step-0000004.tmp":
            (folder / "trainable.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "trainable.safetensors"))
        original(folder, model, optimizer)

    with monkeypatch.context() as patch:
        patch.setattr(module, "save_state", save_state)
        with pytest.raises(UserError) as stop:
            runner.train(start(tmp_path, "b", "mlx"), "mlx")
    run = tmp_path / "b"
    assert str(stop.value) == (f"{run}/checkpoints/.step-0000004.tmp/trainable.safetensors: no space left on device "
                               "while writing checkpoint step-0000004; the previous checkpoint step-0000002 is "
                               f"intact; free space, then trmlx train --resume {run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    resume(run, "mlx")
    assert records(run) == records(straight("mlx"))


@mlx_only
def test_a_tensor_writer_failing_on_a_full_disk_is_named_as_one(tmp_path, monkeypatch, straight):
    """mx.save_safetensors / torch.save raise RuntimeError without an errno: a full disk is recognised anyway."""
    import shutil
    from collections import namedtuple

    module, usage = train_module("mlx"), namedtuple("usage", "total used free")
    original, real_usage = module.save_state, shutil.disk_usage

    def save_state(folder, model, optimizer):
        if folder.name == ".step-0000004.tmp":
            raise RuntimeError(f"[save_safetensors] Failed to open file {folder}/trainable.safetensors")
        original(folder, model, optimizer)

    def disk_usage(path):  # the disk is full where step 4 was being written
        return usage(10, 10, 0) if str(path).endswith(".step-0000004.tmp") else real_usage(path)

    monkeypatch.setattr(module, "save_state", save_state)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(UserError) as stop:
        runner.train(start(tmp_path, "b", "mlx"), "mlx")
    run = tmp_path / "b"
    assert str(stop.value) == (f"{run}/checkpoints/.step-0000004.tmp: no space left on device while writing "
                               "checkpoint step-0000004; the previous checkpoint step-0000002 is intact; free "
                               f"space, then trmlx train --resume {run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]


# --------------------------------------------------------------------------------------- rerunning a failed run

@mlx_only
def test_a_failed_run_can_be_rerun_with_the_same_output_but_an_interrupted_one_is_kept(tmp_path, cli, monkeypatch,
                                                                                      interrupted):
    import numpy as np

    from trmlx.data import packing as module  # where the training loops' batches are collated

    out = tmp_path / "run"
    real, calls = module.collate, [0]

    def poisoned(*args, **kwargs):  # the loss turns NaN in step 3, after the checkpoint of step 2
        calls[0] += 1
        batch = real(*args, **kwargs)
        if calls[0] > 4:
            batch["mask"] = batch["mask"] * np.float32("nan")
        return batch

    with monkeypatch.context() as patch:
        patch.setattr(module, "collate", poisoned)
        with pytest.raises(UserError) as stop:
            runner.train(start(tmp_path, "run", "mlx"), "mlx")
    assert str(stop.value).startswith("train: loss became nan at step 3")
    assert (out / "checkpoints/latest").read_text() == "step-0000002" and (out / "failed.json").is_file()
    flags = sum((["--set", s] for s in SHORT), [])
    fixed = cli("train", QUICKSTART, "--output", str(out), *flags)
    assert fixed.exit_code == 0, fixed.output
    assert (f"note: --output {out}: starting again over the failed run there (it stopped with: {stop.value})\n"
            in fixed.stderr)
    assert not (out / "failed.json").exists() and (out / "adapter/adapter_config.json").is_file()
    assert [(r["kind"], r["step"]) for r in records(out)] == [("train", 2), ("eval", 3), ("train", 4),
                                                              ("train", 6), ("eval", 6)]  # the old log is gone
    kept = cli("train", QUICKSTART, "--output", str(interrupted), *flags)
    assert kept.exit_code == 2
    assert kept.stderr == (f"error: --output {interrupted}: already holds a run; pass --resume {interrupted} to "
                           "continue it or choose another directory\n")
