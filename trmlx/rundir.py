"""The run directory, defined once: every run of every backend writes the same files in the same places.

    RUN/recipe.toml          resolved recipe (defaults + recipe + backend overrides + --set)
    RUN/environment.json     package versions, device, git hash, backend, command line
    RUN/metrics.jsonl        step and validation reports
    RUN/adapter/             adapter in PEFT format (adapter_config.json + adapter_model.safetensors)
    RUN/checkpoints/         resumable state (adapter + optimizer + step + RNG + data position)
    RUN/predictions/         <split>.jsonl from eval
    RUN/plots/               loss.png and friends
    RUN/failed.json          only after a run stopped with an error: what the error was
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from trmlx.errors import UserError

PACKAGES = ("trmlx", "mlx", "mlx-lm", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
            "sacrebleu", "rouge-score", "sentence-transformers", "numpy")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def environment(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def failed(self) -> Path:
        return self.path / "failed.json"

    def predictions(self, split: str) -> Path:
        return self.path / "predictions" / f"{split}.jsonl"


def default_run_path(recipe_name: str, root: Path = Path("runs")) -> Path:
    """runs/<recipe-name>-<timestamp>, the default of `train --output`."""
    return root / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


# What a training run writes; a failed run's are removed when `train` starts that run directory again.
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "adapter", "model", "plots", "negatives.jsonl", "failed.json")


def create_run_dir(path: Path, recipe_toml: str, environment: dict[str, Any], resume: bool = False) -> RunDir:
    """Make the run directory; refuse to overwrite another run unless resuming it. A run that failed is
    replaced, so a fixed recipe can be rerun with the same --output."""
    from trmlx.integrity import disk_error, disk_fault

    run = RunDir(Path(path))
    try:
        if run.recipe.exists() and not resume:
            check_output(run)
            print(f"note: --output {path}: starting again over the failed run there ({_failure(run)})",
                  file=sys.stderr)
            for name in RUN_OUTPUTS:
                target = run.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write(run.recipe, recipe_toml)
        atomic_write(run.environment, json.dumps(environment, indent=2, ensure_ascii=False))
        run.failed.unlink(missing_ok=True)  # running again: no longer a failed run
    except OSError as err:
        if not disk_fault(err):
            raise
        raise disk_error(err, "writing the run directory", "nothing in it was changed; choose a writable "
                         "--output or free space", run.path) from None
    return run


def check_output(run: RunDir) -> None:
    """Refuse a fresh run over a folder that holds another run's results (finished, or resumable)."""
    if not replaceable_run(run):
        raise UserError(f"--output {run.path}: already holds a run; pass --resume {run.path} to continue it or "
                        "choose another directory")


def replaceable_run(run: RunDir) -> bool:
    """True when `train` may start over in this folder: no run there, or one that stopped with an error. (A run
    without failed.json may be one that is running right now, or was interrupted: never overwritten.)"""
    return not run.recipe.exists() or run.failed.exists()


def mark_failed(run: RunDir, error: str) -> None:
    """Record why a run stopped; best effort (the disk may be why)."""
    try:
        atomic_write(run.failed, json.dumps({"error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                            ensure_ascii=False))
    except OSError:
        pass


def _failure(run: RunDir) -> str:
    try:
        return "it stopped with: " + json.loads(run.failed.read_text(encoding="utf-8"))["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its failed.json is unreadable"


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write via a temp file in the same folder + fsync + rename, so a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def environment_record(backend: str | None = None, device: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a run or a benchmark: versions (read without importing), device, git hash, command line."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
        "git": git_hash(),
        "backend": backend,
        "device": device or {},
        "command": sys.argv,
    }


def git_hash() -> str | None:
    """The trmlx checkout's commit (with '-dirty' when modified), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
