"""Datasets as the hub publishes them: all splits of a hub dataset, of a local folder in hub layout
(`data/train-*.parquet`, `validation-*`, `test-*`) or of a `save_to_disk` folder, read through `datasets` alike.
The dataset's own validation and test splits become valid and test unless files are given.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trmlx.data.fields import Row
from trmlx.errors import UserError

# Split names tried for our valid/test splits when the recipe says "auto" (hub datasets use all three for valid).
AUTO_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class DatasetSplits:
    """Rows per split of ours (train/valid/test) and the dataset split each came from."""

    rows: dict[str, list[Row]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    available: list[str] = field(default_factory=list)


def read_dataset_splits(name: str, config: str, wanted: dict[str, str]) -> DatasetSplits:
    """Rows of the dataset splits named in `wanted` (our split -> dataset split, "auto" or "" for none).

    A name that is a local folder loads from disk; anything else is a hub id, from the cache when offline.
    """
    label = f"data.dataset {name!r}" + (f" ({config})" if config else "")
    dataset = _load_folder(Path(name), config) if Path(name).is_dir() else _load_hub(name, config, label,
                                                                                   wanted["train"])
    out = DatasetSplits(available=list(dataset))
    for ours, split in wanted.items():
        chosen = pick_split(list(dataset), ours, split)
        if chosen is None and split not in ("auto", ""):
            key = "data.dataset_split" if ours == "train" else f"data.dataset_{ours}_split"
            raise UserError(f"{label}: no split {split!r} ({key}); splits present: {', '.join(dataset)}")
        if chosen is not None:
            out.source[ours] = chosen
            out.rows[ours] = [Row(v, f"{name}[{chosen}]: row {i + 1}") for i, v in enumerate(dataset[chosen])]
    return out


def pick_split(available: list[str], ours: str, requested: str) -> str | None:
    """The dataset split that becomes our split `ours`, or None (requested "" or an absent "auto")."""
    if not requested:
        return None
    candidates = AUTO_SPLITS.get(ours, (ours,)) if requested == "auto" else (requested,)
    return next((s for s in candidates if s in available), None)


def read_folder_split(path: Path, split: str) -> list[Row]:
    """One split of a `save_to_disk` folder or a folder in hub layout, given as a data file (data.train = "dir")."""
    dataset = _load_folder(path, "")
    ours = {"validation": "valid"}.get(split, split)
    chosen = pick_split(list(dataset), ours, "auto") or (split if split in dataset else None)
    if chosen is None:
        raise UserError(f"{path}: no split {split!r}; splits present: {', '.join(dataset)}")
    return [Row(v, f"{path}[{chosen}]: row {i + 1}") for i, v in enumerate(dataset[chosen])]


def _load_folder(path: Path, config: str) -> dict[str, Any]:
    """A local folder as {split: Dataset}: save_to_disk folders by load_from_disk, hub layouts by load_dataset."""
    import datasets

    if any((path / marker).exists() for marker in _SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if not any(p.suffix.lower() in (".parquet", ".jsonl", ".json", ".csv", ".arrow") for p in path.rglob("*")):
        raise UserError(f"{path}: a folder must be a datasets save_to_disk folder or a dataset in hub layout "
                        "(data/train-*.parquet, data/validation-*, data/test-*); no data files found in it")
    try:
        with _quiet():
            return dict(datasets.load_dataset(str(path), config or None))
    except Exception as err:  # datasets raises many types for unreadable folders; the first line says why
        raise UserError(f"{path}: cannot read the folder as a dataset: {_first_line(err)}") from None


def _load_hub(name: str, config: str, label: str, train_split: str) -> dict[str, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        offline = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # make datasets use the cache instead of retrying the network
    if offline:
        _declare_offline()
    import datasets

    try:
        with _quiet():
            return dict(datasets.load_dataset(name, config or None))
    except Exception as err:  # datasets raises many types; the user needs the same advice for all of them
        reason = "the hub is unreachable and it is not in the local cache" if offline else _first_line(err)
        raise UserError(f"{label}: cannot load split {train_split!r}: {reason}; download it while online or point "
                        "data.train at local files") from None


class _quiet:
    """No datasets progress bars while loading: `trmlx check` prints its own summary, and errors stay one line."""

    def __enter__(self) -> None:
        from datasets import utils

        self.was_enabled = not utils.are_progress_bars_disabled()
        utils.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        from datasets import utils

        if self.was_enabled:
            utils.enable_progress_bars()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _declare_offline() -> None:
    """huggingface_hub and datasets read HF_HUB_OFFLINE once, when imported: if they were imported before it was set
    (transformers imports them), set what they read too, or load_dataset retries the network for ~23 s."""
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
