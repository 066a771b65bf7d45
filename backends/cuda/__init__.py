"""The CUDA backend (torch + transformers + peft + bitsandbytes); runs on the CPU when no GPU is visible."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from trmlx.backend import GenerationSettings, LoadedModel, MemoryStats
from trmlx.data.examples import Example
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport


class CUDABackend:
    """Implements trmlx.backend.Backend with torch; each method delegates to the module that owns the work."""

    name = "cuda"

    def load(self, recipe: Recipe, adapter: Path | None = None, start: Path | None = None) -> LoadedModel:
        from trmlx.backends.cuda.model import load
        from trmlx.models import check_model_folder

        check_model_folder(recipe.model.path, recipe.task)  # a bad local folder is one line, not a loader traceback
        return load(recipe, adapter, start)

    def train(self, loaded: LoadedModel, recipe: Recipe, train: Sequence[Example], valid: Sequence[Example],
              run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
        from trmlx.backends.cuda.train import train_loop

        return train_loop(loaded, recipe, train, valid, run_dir, resume)

    def evaluate(self, loaded: LoadedModel, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        from trmlx.backends.cuda.train import evaluate_loss

        return evaluate_loss(loaded, examples, batch_size)

    def generate(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings) -> Iterator[list[int]]:
        from trmlx.backends.cuda.generate import generate_tokens

        return iter(generate_tokens(loaded, prompts, settings))

    def stream(self, loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings) -> Iterator[int]:
        from trmlx.backends.cuda.generate import stream_tokens

        return stream_tokens(loaded, prompt, settings)

    def save_adapter(self, loaded: LoadedModel, path: Path) -> None:
        """peft's own save_pretrained, into a temp folder renamed into place."""
        import shutil

        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        loaded.model.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    def memory(self) -> MemoryStats:
        from trmlx.backends.cuda.device import memory

        return memory()


def create_backend() -> CUDABackend:
    return CUDABackend()
