"""Is a file what it claims to be, and what to tell the user when the disk refuses a write.

Checks here read headers and sizes only (never the tensors), so `--resume`, `eval` and `export` can tell a
complete checkpoint or adapter from one cut off by a kill or a full disk before loading anything.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from trmlx.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin",  # PEFT
                   "adapters.safetensors")  # mlx-lm

# The write failures a user fixes outside trmlx (free space, permissions, remount), as opposed to bugs.
DISK_FAULTS = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", 122): "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


def disk_fault(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FAULTS


def disk_error(err: OSError, doing: str, kept: str = "", path: Path | str | None = None) -> UserError:
    """One line: which path, what the disk said, what was being written, what is still intact."""
    where = path or err.filename or "?"
    return UserError(f"{where}: {DISK_FAULTS.get(err.errno, err.strerror)} while {doing}"
                     + (f"; {kept}" if kept else ""))


def ensure_writable(folder: Path, doing: str) -> None:
    """Create (and remove) a file in `folder`, or in its nearest existing parent when it does not exist yet
    (nothing is created), before long work whose result would be lost if it could not be saved."""
    probe_in = Path(folder).absolute()
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=".trmlx-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if not disk_fault(err):
            raise
        raise disk_error(err, doing, "nothing was written", folder) from None


def safetensors_problem(path: Path) -> str | None:
    """None for a complete .safetensors file; else what is wrong (truncated, not safetensors)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                return f"{path.name}: {size} bytes, too short for a safetensors file"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return f"{path.name}: not a complete safetensors file ({size} bytes; its header claims {length})"
            header = json.loads(stream.read(length))
    except OSError as err:
        return f"{path.name}: cannot be read ({err.strerror})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name}: not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name}: not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{path.name}: not a safetensors file (tensor entries without data_offsets)"
    expected = 8 + length + end
    if size != expected:
        return f"{path.name}: {'truncated' if size < expected else 'has trailing bytes'} ({size} bytes, " \
               f"expected {expected})"
    return None


def zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive; its directory sits at the end, so a cut-off file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except OSError as err:
        return f"{path.name}: cannot be read ({err.strerror})"
    except zipfile.BadZipFile as err:
        return f"{path.name}: not a complete torch checkpoint ({err})"
    return None


def json_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return f"{path.name}: cannot be read ({err.strerror})"
    except UnicodeDecodeError:
        return f"{path.name}: not UTF-8 text"
    except json.JSONDecodeError as err:
        return f"{path.name}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    return None if isinstance(value, dict) else f"{path.name}: expected a JSON object, found {type(value).__name__}"


def file_problem(path: Path) -> str | None:
    """The format check that fits the file's suffix (other files only need to exist)."""
    if not path.is_file():
        return f"{path.name}: missing"
    checks: dict[str, Callable[[Path], str | None]] = {".safetensors": safetensors_problem, ".pt": zip_problem,
                                                       ".bin": zip_problem, ".json": json_problem}
    check = checks.get(path.suffix)
    return check(path) if check else None


def adapter_problem(folder: Path, require_weights: bool = True) -> str | None:
    """None for a complete adapter folder (config JSON object + complete weights); else what is wrong. PEFT's
    and mlx-lm's weight files are both checked; without `require_weights` a folder with no weights file passes
    (the loader that reads it names what it expected)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        return f"no {ADAPTER_CONFIG}"
    problem = json_problem(config)
    if problem:
        return problem
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        return f"no {ADAPTER_WEIGHTS[0]}" if require_weights else None
    return file_problem(weights[0])


def model_problem(folder: Path) -> str | None:
    """None for a complete sentence-transformers folder (an embedding run's RUN/model: modules.json, config.json,
    complete weights); else what is wrong. Sharded weights are checked shard by shard."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    modules = folder / "modules.json"
    if not modules.is_file():
        return "no modules.json"
    try:
        listed = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"modules.json: not readable JSON ({err})"
    if not isinstance(listed, list):
        return "modules.json: expected a JSON list of modules"
    transformer = next((m.get("path", "") for m in listed if isinstance(m, dict) and
                        str(m.get("type", "")).endswith("Transformer")), "")
    weights_dir = folder / transformer
    problem = file_problem(weights_dir / "config.json")
    if problem:
        return problem
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        problem = json_problem(index)
        if problem:
            return problem
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        return next((p for p in (file_problem(weights_dir / s) for s in shards) if p), None)
    names = [n for n in ("model.safetensors", "pytorch_model.bin") if (weights_dir / n).is_file()]
    return file_problem(weights_dir / names[0]) if names else "no model.safetensors"


def check_adapter(folder: Path, hint: str = "") -> None:
    """A damaged adapter is a one-line error naming the file, before any model is loaded."""
    problem = adapter_problem(folder, require_weights=False)
    if problem:
        raise UserError(f"{folder}: {problem}" + (f"; {hint}" if hint else ""))


def replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder's contents into a temp folder beside it, fsync, then swap it in by rename: a kill at any
    moment leaves the old folder, the new one, or (between two renames) none — never a half-written one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write frees its space and leaves `final` untouched
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    sync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def sync_tree(folder: Path) -> None:
    """fsync every file below `folder` and the folders themselves, so a rename publishes data already on disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as stream:
                os.fsync(stream.fileno())
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
