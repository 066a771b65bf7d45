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

# Backend name -> (module, extra that installs it). Modules live in backends/<name>, installed as trmlx.backends;
# each backend's extra has its name.
REGISTRY: dict[str, tuple[str, str]] = {name: (f"trmlx.backends.{name}", name) for name in BACKEND_NAMES}


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

    def load(self, recipe: Recipe, adapter: Path | None = None) -> LoadedModel:
        """Load (and quantise at load) the base model and tokenizer, attach a new or saved adapter."""
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


def get_backend(name: str) -> Backend:
    """Import and construct a backend by name; a missing install is a one-line error, not a traceback."""
    if name not in REGISTRY:
        raise UserError(f"--backend: unknown backend {name!r}; expected one of {', '.join(REGISTRY)}")
    module_name, extra = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--backend {name}: cannot import {err.name or module_name} ({err}); install it with "
                        f"pip install 'trmlx[{extra}]'") from None
    if not hasattr(module, "create_backend"):
        raise UserError(f"--backend {name}: this version of trmlx does not include the {name} training backend yet")
    return module.create_backend()
