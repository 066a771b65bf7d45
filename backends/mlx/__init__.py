"""The MLX backend (Apple silicon Metal, MLX's CPU and CUDA builds). Importing it imports mlx."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from trmlx.backends.mlx import device as _device  # noqa: F401  first: it chooses the BLAS before mlx loads
from trmlx.backend import GenerationSettings, LoadedModel, MemoryStats
from trmlx.data.examples import Example
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport


class MLXBackend:
    """Implements trmlx.backend.Backend with MLX; each method delegates to the module that owns the work."""

    name = "mlx"

    def load(self, recipe: Recipe, adapter: Path | None = None, start: Path | None = None) -> LoadedModel:
        from trmlx.backends.mlx.model import load
        from trmlx.models import check_model_folder

        check_model_folder(recipe.model.path, recipe.task)  # a bad local folder is one line, not a loader traceback
        return load(recipe, adapter, start)

    def train(self, loaded: LoadedModel, recipe: Recipe, train: Sequence[Example], valid: Sequence[Example],
              run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
        from trmlx.backends.mlx.train import train_loop

        return train_loop(loaded, recipe, train, valid, run_dir, resume)

    def evaluate(self, loaded: LoadedModel, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        from trmlx.backends.mlx.train import evaluate_loss

        return evaluate_loss(loaded, examples, batch_size)

    def generate(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings) -> Iterator[list[int]]:
        if loaded.handle.get("task_type") == "SEQ_2_SEQ_LM":
            from trmlx.backends.mlx.t5_generate import generate as generate_seq2seq

            return iter(generate_seq2seq(loaded, prompts, settings))
        from trmlx.backends.mlx.generate import generate_tokens

        return iter(generate_tokens(loaded, prompts, settings, settings.seed))

    def stream(self, loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings) -> Iterator[int]:
        if loaded.handle.get("task_type") == "SEQ_2_SEQ_LM":
            return iter(next(self.generate(loaded, [prompt], settings)))
        from trmlx.backends.mlx.generate import stream_tokens

        return stream_tokens(loaded, prompt, settings, settings.seed)
    def save_adapter(self, loaded: LoadedModel, path: Path) -> None:
        from trmlx.backends.mlx import t5_prompt, virtual_tokens
        from trmlx.backends.mlx.adapters import peft_config, save_adapter

        if isinstance(loaded.model, t5_prompt.T5PromptModel):  # T5 prompt tuning
            return t5_prompt.save(loaded.model, path, loaded.handle["base"])
        if isinstance(loaded.model, virtual_tokens.VirtualTokenModel):  # prompt/prefix tuning
            return virtual_tokens.save(loaded.model, path, loaded.handle["base"])
        task_type = loaded.handle.get("task_type", "CAUSAL_LM")
        save_adapter(loaded.model, path, peft_config(loaded.handle["peft"], loaded.model, loaded.handle["base"],
                                                     task_type))

    def memory(self) -> MemoryStats:
        from trmlx.backends.mlx.device import memory

        return memory()


def create_backend() -> MLXBackend:
    return MLXBackend()
