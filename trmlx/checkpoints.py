"""Checkpoints on disk, the same for every backend: RUN/checkpoints/step-NNNNNNN/ folders written into a temp
folder, made durable and published by rename, with `latest` naming the newest.

Each checkpoint's position.json lists the files the backend wrote and their sizes, so a resume can tell a
complete checkpoint from one cut off by a kill or a full disk without loading a tensor, and fall back to the
previous good one (saying so) instead of crashing in the middle of a load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from trmlx.errors import UserError
from trmlx.integrity import disk_error, disk_fault, file_problem, json_problem, replace_folder
from trmlx.rundir import RunDir, atomic_write

KEEP_CHECKPOINTS = 2  # older ones are deleted once a newer one is safely on disk
POSITION_FILE = "position.json"
_NAME = re.compile(r"step-(\d{7,})$")
# Files only one backend writes: how checkpoints written before position.json named the backend are recognised.
_BACKEND_FILES = {"state.pt": "cuda", "trainable.safetensors": "mlx"}


@dataclass
class Position:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # micro-batches of this epoch already consumed
    trained_tokens: int = 0
    elapsed_seconds: float = 0.0
    # Loss sum and token count of the steps since the last logged train report: the first report after a resume
    # averages the same steps as an uninterrupted run would.
    window_loss: float = 0.0
    window_tokens: float = 0.0
    # Records of `step` ("train", "eval") that were due but had not reached the log when this was saved: a
    # resume produces them before the next step.
    pending: list[str] = field(default_factory=list)


class Checkpoints:
    def __init__(self, run: RunDir, backend: str | None = None):
        self.run, self.root, self.backend = run, run.checkpoints, backend

    def save(self, position: Position, write_state: Callable[[Path], None]) -> Path:
        """`write_state(folder)` writes the backend's tensors; position.json (with the file list) comes last."""
        name = f"step-{position.step:07d}"

        def write(folder: Path) -> None:
            try:
                write_state(folder)
            except OSError:
                raise
            except Exception as err:  # MLX and torch report a failed write as RuntimeError, without an errno
                full = _full_disk(folder)
                if full:
                    raise full from err
                raise
            files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
            record = {**asdict(position), "backend": self.backend, "files": files}
            (folder / POSITION_FILE).write_text(json.dumps(record), encoding="utf-8")

        previous = self._pointer()
        try:
            final = replace_folder(self.root / name, write)
            atomic_write(self.root / "latest", name)
        except OSError as err:
            if not disk_fault(err):
                raise
            kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was kept"
            raise disk_error(err, f"writing checkpoint {name}",
                             f"{kept}; free space, then trmlx train --resume {self.run.path}") from None
        self._prune(position.step)
        return final

    def latest(self) -> tuple[Path, Position]:
        """The checkpoint a resume continues from (see `find`)."""
        folder, position, _ = self.find()
        return folder, position

    def find(self) -> tuple[Path, Position, list[str]]:
        """The checkpoint `latest` names if it is complete, else the newest complete one; with notes saying what
        was skipped and why (empty when `latest` was fine)."""
        folders = sorted((f for f in self.root.glob("step-*") if _NAME.match(f.name) and f.is_dir()),
                         key=_step_of, reverse=True)
        notes: list[str] = []
        named = self._pointer()
        pointer = self.root / "latest"
        if named is None:
            if not folders:
                raise UserError(f"--resume {self.run.path}: no checkpoint found (expected {pointer})")
            notes.append("checkpoints/latest is missing" if not pointer.exists() else "checkpoints/latest is empty")
        elif not _NAME.match(named):
            notes.append(f"checkpoints/latest holds {named[:40]!r}, not a checkpoint name")
            named = None
        elif not (self.root / named).is_dir():
            notes.append(f"checkpoints/latest names {named}, which does not exist")
            named = None
        order = [self.root / named] if named else []
        order += [f for f in folders if f.name != named]
        for folder in order:
            position, backend, problem = self.read(folder)
            if position is None:
                notes.append(f"{folder.name} is damaged ({problem})")
                continue
            if self.backend and backend and backend != self.backend:
                raise UserError(
                    f"--resume {self.run.path}: its checkpoints were written by the {backend} backend; resume with "
                    f"--backend {backend} (a checkpoint holds one framework's optimizer state and parameter "
                    "layout, so another backend could not continue it exactly; a finished run's adapter/ loads "
                    "on both)")
            if notes:
                notes.append(f"resuming from {folder.name}")
            return folder, position, notes
        raise UserError(f"--resume {self.run.path}: no usable checkpoint ({'; '.join(notes)}); start a new run "
                        "with trmlx train RECIPE --output NEW_DIR")

    def read(self, folder: Path) -> tuple[Position | None, str | None, str | None]:
        """(position, backend, None) for a complete checkpoint, (None, None, what is wrong) otherwise."""
        meta = folder / POSITION_FILE
        if not meta.is_file():
            return None, None, f"no {POSITION_FILE}: its write was cut off"
        problem = json_problem(meta)
        if problem:
            return None, None, problem
        record: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8"))
        backend, files = record.pop("backend", None), record.pop("files", None)
        try:
            position = Position(**record)
        except TypeError as err:
            return None, None, f"{POSITION_FILE}: {err}"
        if position.step != _step_of(folder):
            return None, None, f"{POSITION_FILE} says step {position.step}"
        if not isinstance(files, dict):  # written before checkpoints listed their files
            files = {f.name: None for f in folder.iterdir() if f.is_file() and f.name != POSITION_FILE}
        for name, size in files.items():
            path = folder / name
            if path.is_file() and size is not None and path.stat().st_size != size:
                return None, None, f"{name}: {path.stat().st_size} bytes, {size} were written"
            problem = file_problem(path)
            if problem:
                return None, None, problem
        backend = backend or next((b for f, b in _BACKEND_FILES.items() if f in files), None)
        position.pending = self._still_owed(position)
        return position, backend, None

    def _still_owed(self, position: Position) -> list[str]:
        """Pending records the log already holds are not owed twice (a kill after logging, before a save)."""
        if not position.pending or not self.run.metrics.is_file():
            return list(position.pending)
        from trmlx.report import read_log

        logged = {(r.get("kind"), r.get("step")) for r in read_log(self.run.metrics)}
        return [kind for kind in position.pending if (kind, position.step) not in logged]

    def _pointer(self) -> str | None:
        try:
            return (self.root / "latest").read_text(encoding="utf-8", errors="replace").strip() or None
        except OSError:
            return None

    def _prune(self, step: int) -> None:
        """Keep the newest KEEP_CHECKPOINTS; drop any newer than `step` (left by a resume from an older one)."""
        folders = sorted((f for f in self.root.glob("step-*") if _NAME.match(f.name)), key=_step_of)
        for folder in folders:
            if _step_of(folder) > step:
                shutil.rmtree(folder, ignore_errors=True)
        kept = [f for f in folders if _step_of(f) <= step]
        for folder in kept[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(folder, ignore_errors=True)


def _full_disk(folder: Path) -> OSError | None:
    """The disk-full error a tensor writer could not name: under 1 MiB free where its write just failed."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) if free < 1 << 20 else None


def _step_of(folder: Path) -> int:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else -1
