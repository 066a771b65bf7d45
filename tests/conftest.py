"""Shared fixtures: a tiny tokenizer trained offline, file writers, and a CLI runner."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


def _cores() -> int:
    """The cores this process may run on (macOS has no affinity call: all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Each pytest-xdist worker gets its share of the cores, before torch, OpenBLAS or a subprocess starts a thread pool:
# left at a thread per core each, two workers (and the CLI runs they start) on 2 cores spend more time contending
# than computing (`pytest -q -n 2` here: 276 s, and 161 s with this). A value the caller set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // _WORKERS)))

# The Ctrl-C tests need Python's own SIGINT handler, also when the suite runs as a background job (`cmd &` in a
# script), whose processes start with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

if importlib.util.find_spec("mlx") is not None:  # before any test module imports mlx: the backend picks the BLAS
    import trmlx.backends.mlx.device  # noqa: F401


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never touch the network: the hub is declared offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def write(tmp_path):
    """write("name.jsonl", rows|text) -> Path; lists of dicts become JSONL."""

    def _write(name: str, content, encoding: str = "utf-8") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, list):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding=encoding)
        else:
            path.write_text(content, encoding=encoding)
        return path

    return _write


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer with BOS/EOS/PAD, built in memory: deterministic ids, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("the cat sat on mat kedi paspasın üstüne oturdu translate hello merhaba dünya world ankara'da "
             "bir iki üç dört beş altı yedi sekiz dokuz on : .").split()
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture
def cli():
    """cli("check", "r.toml") -> click Result with separate stdout/stderr."""
    from trmlx.cli import main

    def _invoke(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return _invoke
