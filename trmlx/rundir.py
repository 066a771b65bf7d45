"""The run directory, defined once: every run of every backend writes the same files in the same places.

    RUN/recipe.toml          resolved recipe (defaults + recipe + backend overrides + --set)
    RUN/environment.json     package versions, device, git hash, backend, command line
    RUN/metrics.jsonl        step and validation reports
    RUN/adapter/             adapter in PEFT format (adapter_config.json + adapter_model.safetensors)
    RUN/checkpoints/         resumable state (adapter + optimizer + step + RNG + data position)
    RUN/predictions/         <split>.jsonl from eval
    RUN/plots/               loss.png and friends
"""

from __future__ import annotations

import json
import os
import platform
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

    def predictions(self, split: str) -> Path:
        return self.path / "predictions" / f"{split}.jsonl"


def default_run_path(recipe_name: str, root: Path = Path("runs")) -> Path:
    """runs/<recipe-name>-<timestamp>, the default of `train --output`."""
    return root / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(path: Path, recipe_toml: str, environment: dict[str, Any], resume: bool = False) -> RunDir:
    """Make the run directory; refuse to overwrite another run's files unless resuming it."""
    run = RunDir(Path(path))
    if run.recipe.exists() and not resume:
        raise UserError(f"--output {path}: already holds a run; pass --resume {path} to continue it or choose "
                        "another directory")
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write(run.recipe, recipe_toml)
    atomic_write(run.environment, json.dumps(environment, indent=2, ensure_ascii=False))
    return run


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
