"""The Backend protocol both backends implement identically, and the registry that imports one lazily.

A backend only touches tensors: recipes, data processing, metrics, reports and the run directory are the core's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from trmlx.data.examples import Example
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES, EvalConfig, Recipe
from trmlx.report import StepReport

# Backend name -> (package, extra that installs it). Packages live in backends/<name>, installed as
# trmlx.backends; each backend's extra has its name. A backend's embedding half is its `embed` module, whose
# dependencies (sentence-transformers on CUDA) the `embed` extra adds.
REGISTRY: dict[str, tuple[str, str]] = {name: (f"trmlx.backends.{name}", name) for name in BACKEND_NAMES}
EMBED_EXTRAS: dict[str, str] = {"cuda": "cuda,embed"}  # backends whose embedding half needs more than their extra


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by eval and generate; the defaults are the recipe's eval section's (the schema holds
    every default, documented: `trmlx recipe explain eval`)."""

    max_new_tokens: int = EvalConfig.max_new_tokens
    temperature: float = EvalConfig.temperature
    top_p: float = EvalConfig.top_p
    top_k: int = EvalConfig.top_k
    repetition_penalty: float = EvalConfig.repetition_penalty
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampling seed, for reproducible sampled output; greedy ignores it


@dataclass(frozen=True)
class MemoryStats:
    """Bytes: what the framework holds now and at its peak since the last reset; device is e.g. 'cpu', 'H100'."""

    active: int
    peak: int
    device: str


@dataclass
class LoadedModel:
    """A backend's model, tokenizer and adapter bookkeeping; `handle` is whatever the backend needs."""

    model: Any
    tokenizer: Any
    handle: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """What `trmlx train/eval/generate/bench` call; implemented by backends/mlx and backends/cuda."""

    name: str

    def load(self, recipe: Recipe, adapter: Path | None = None, start: Path | None = None) -> LoadedModel:
        """Load (and quantise at load) the base model and tokenizer, attach a new or saved adapter. `start`: a PEFT
        LoRA/DoRA folder whose weights the new adapter takes (continued training, trmlx.continued)."""
        ...

    def train(self, loaded: LoadedModel, recipe: Recipe, train: Sequence[Example], valid: Sequence[Example],
              run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
        """Run the training loop, checkpointing into run_dir; yield one report per logged step or evaluation."""
        ...

    def evaluate(self, loaded: LoadedModel, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        """Token-weighted loss over examples: {'loss': mean NLL, 'tokens': count}."""
        ...

    def generate(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings) -> Iterator[list[int]]:
        """Batched generation from token-id prompts; yields the new token ids per prompt, in order."""
        ...

    def stream(self, loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings) -> Iterator[int]:
        """One prompt's new token ids as they are produced (EOS excluded), for `trmlx generate`."""
        ...

    def save_adapter(self, loaded: LoadedModel, path: Path) -> None:
        """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        ...

    def memory(self) -> MemoryStats:
        """Current and peak memory of this backend's device."""
        ...


class Embedder(Protocol):
    """A loaded encoder, as a backend's embedding half returns it."""

    dtype: str

    def limit(self, max_length: int) -> int:
        """The longest text the model takes given a requested limit (its position table caps it)."""
        ...

    def encode(self, texts: Sequence[str], max_length: int, batch_size: int = 32) -> Any:
        """Pooled embeddings of texts truncated to max_length tokens, one row per text."""
        ...


class EmbeddingBackend(Protocol):
    """What `trmlx train/eval/search/bench` call for task = "embedding"; backends/<name>/embed.py implement it."""

    def device_name(self) -> str:
        ...

    def load(self, recipe: Recipe, path: str | Path | None = None, train: bool = False) -> Embedder:
        """The encoder of model.path (or a saved RUN/model folder at `path`), LoRA attached when training."""
        ...

    def train_loop(self, model: Embedder, recipe: Recipe, train_set: Sequence[Any], valid_set: Sequence[Any],
                   run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
        """Contrastive training, checkpointing into run_dir; one report per logged step or evaluation."""
        ...

    def save(self, model: Embedder, recipe: Recipe, path: Path) -> None:
        """Write a sentence-transformers folder both backends (and sentence-transformers) load."""
        ...


def _import(name: str, module: str, extra: str) -> Any:
    if name not in REGISTRY:
        raise UserError(f"--backend: unknown backend {name!r}; expected one of {', '.join(REGISTRY)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"--backend {name}: cannot import {err.name or module} ({err}); install it with "
                        f"pip install 'trmlx[{extra}]'") from None


def get_embedding_backend(name: str) -> EmbeddingBackend:
    """A backend's embedding half (its embed module), from the same registry; a missing install is one line."""
    package = REGISTRY[name][0] if name in REGISTRY else name
    return _import(name, f"{package}.embed", EMBED_EXTRAS.get(name, name))


def get_backend(name: str) -> Backend:
    """Import and construct a backend by name; a missing install is a one-line error, not a traceback."""
    package, extra = REGISTRY.get(name, (name, name))
    module = _import(name, package, extra)
    if not hasattr(module, "create_backend"):
        raise UserError(f"--backend {name}: this version of trmlx does not include the {name} training backend yet")
    return module.create_backend()
