"""Continued training: `peft.init_adapter` (or `trmlx train RECIPE --adapter DIR`) starts a run from a saved LoRA/DoRA
adapter's weights — PEFT's format or mlx-lm's — instead of a new adapter. The optimizer starts fresh: this is not a
resume (`--resume RUN_DIR` also restores the optimizer and the data position).

The adapter's shape wins: its method (lora/dora), rank, alpha, targets and layers replace the recipe's peft keys in
the resolved recipe, which is saved with the run (so `--resume` rebuilds the same adapter without reading the start
folder again), and one printed line names the recipe keys it replaced. peft.dropout stays the recipe's: it is a
training choice, not part of the weights. Each backend then builds a new adapter from that recipe and overwrites
its weights with the start adapter's (`check_weights` first, so a wrong base model is one line, not a traceback).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trmlx import mlxlm
from trmlx.errors import UserError
from trmlx.integrity import adapter_problem
from trmlx.recipe.schema import PeftConfig, Recipe

KEY = "peft.init_adapter"
_TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
_COMPARED = ("method", "rank", "alpha", "targets", "layers")  # the keys an adapter's weights fix


@dataclass(frozen=True)
class StartAdapter:
    """The resolved start of a continued run."""

    recipe: Recipe  # peft keys are the adapter's
    folder: Path  # the PEFT form the backends read (a converted copy of an mlx-lm folder)
    source: Path  # the folder the user named
    replaced: tuple[str, ...]  # 'peft.rank = 16' for every recipe key the adapter's value replaced

    def note(self) -> str:
        """One line: what training continues from, and which recipe keys it overrides."""
        peft = self.recipe.peft
        targets = peft.targets if isinstance(peft.targets, str) else ", ".join(peft.targets)
        layers = f"last {peft.layers} layer{'s' * (peft.layers > 1)}" if peft.layers else "all layers"
        line = (f"note: {KEY} {self.source}: training continues from this adapter with its own settings "
                f"({peft.method}, rank {peft.rank}, alpha {peft.alpha:g}, targets {targets}, {layers}); the "
                "optimizer starts fresh")
        return line + (f"; the recipe's {', '.join(self.replaced)} not used" if self.replaced else "")


def resolve(recipe: Recipe, key: str = KEY) -> StartAdapter | None:
    """The start adapter of `recipe` (None when peft.init_adapter is empty), checked before any model loads: the
    folder exists, holds a parseable LoRA/DoRA adapter for this task. Problems are one-line UserErrors naming
    `key` (--adapter when the command line gave the folder) and the path."""
    if not recipe.peft.init_adapter:
        return None
    try:
        return _resolve(recipe, Path(recipe.peft.init_adapter))
    except UserError as err:
        raise UserError([f"{key}: {problem}" for problem in err.problems]) from None


def _resolve(recipe: Recipe, folder: Path) -> StartAdapter:
    if not folder.exists():
        raise UserError(f"{folder}: no such folder; expected a PEFT or mlx-lm adapter folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; expected a PEFT or mlx-lm adapter folder")
    if recipe.task not in _TASK_TYPES:
        raise UserError(f"{folder}: continued training applies to causal and seq2seq recipes, not {recipe.task!r}")
    problem = adapter_problem(folder, require_weights=False)
    if problem == f"no {mlxlm.CONFIG_FILE}":
        raise UserError(f"{folder}: no {mlxlm.CONFIG_FILE}; expected a PEFT adapter folder (adapter_config.json + "
                        "adapter_model.safetensors) or an mlx-lm one (adapters.safetensors + adapter_config.json)")
    if problem:
        raise UserError(f"{folder}: {problem}")
    if mlxlm.is_mlxlm_adapter(folder):
        if recipe.task != "causal":
            raise UserError(f"{folder}: an mlx-lm adapter is for a causal language model; this recipe's task is "
                            f"{recipe.task!r}")
        peft_folder = mlxlm.as_peft_adapter(folder)
    else:
        peft_folder = folder
        if not (folder / mlxlm.PEFT_WEIGHTS).is_file():
            raise UserError(f"{folder}: no {mlxlm.PEFT_WEIGHTS} beside {mlxlm.CONFIG_FILE} (continued training "
                            "reads PEFT's safetensors weights)")
    config = mlxlm.read_config(peft_folder) or {}
    adapted = _adapter_peft(config, recipe, folder / mlxlm.CONFIG_FILE)
    replaced = tuple(f"peft.{name} = {_show(getattr(recipe.peft, name))}" for name in _COMPARED
                     if _differs(name, getattr(recipe.peft, name), getattr(adapted, name), recipe))
    return StartAdapter(dataclasses.replace(recipe, peft=adapted), peft_folder, folder, replaced)


def _adapter_peft(config: dict[str, Any], recipe: Recipe, where: Path) -> PeftConfig:
    """The recipe's peft section with the adapter's method, rank, alpha, targets and layers."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UserError(f"{where}: peft_type {kind!r}: training continues from LoRA and DoRA adapters (PEFT's "
                        "LORA, with or without use_dora, or mlx-lm's lora / dora)")
    task_type = config.get("task_type")
    if task_type and task_type != _TASK_TYPES[recipe.task]:
        raise UserError(f"{where}: task_type {task_type!r} does not fit this {recipe.task} recipe (expected "
                        f"{_TASK_TYPES[recipe.task]!r})")
    if config.get("use_rslora"):
        raise UserError(f"{where}: use_rslora is set; both backends scale LoRA by alpha / r")
    for name in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(name):
            raise UserError(f"{where}: {name} is set; a recipe has one rank and alpha for all modules and trains "
                            "no whole modules")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"{where}: r must be a positive whole number, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    targets = config.get("target_modules")
    if targets != "all-linear" and (not isinstance(targets, list) or not targets
                                    or not all(isinstance(t, str) for t in targets)):
        raise UserError(f"{where}: target_modules must be a list of module names, got {targets!r}")
    return dataclasses.replace(recipe.peft, method="dora" if config.get("use_dora") else "lora", rank=rank,
                               alpha=float(alpha), targets=targets if isinstance(targets, str) else sorted(targets),
                               layers=_last_layers(config.get("layers_to_transform"), recipe, where))


def _last_layers(layers: Any, recipe: Recipe, where: Path) -> int:
    """peft.layers for PEFT's layers_to_transform: 0 for all blocks, else N for the last N (what both backends
    adapt); other block sets are an error."""
    if layers is None:
        return 0
    layers = [layers] if isinstance(layers, int) else layers
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        raise UserError(f"{where}: layers_to_transform must be a list of block indices, got {layers!r}")
    layers = sorted(layers)
    total = _block_count(recipe.model.path)
    final = layers == list(range(layers[0], layers[0] + len(layers))) and (total is None or layers[-1] == total - 1)
    if not final:
        raise UserError(f"{where}: layers_to_transform {layers} is not a run of final blocks"
                        + (f" of {total}" if total else "") + "; trmlx adapts the last peft.layers blocks")
    return 0 if len(layers) == total else len(layers)


def _block_count(model_path: str) -> int | None:
    """Transformer blocks of a local base model (config.json), None when unknown (a hub id)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    count = config.get("num_hidden_layers", config.get("num_layers")) if isinstance(config, dict) else None
    return count if isinstance(count, int) else None


def _differs(name: str, ours: Any, theirs: Any, recipe: Recipe) -> bool:
    if name == "targets":
        if ours == "all-linear" or theirs == "all-linear":  # which linears that is depends on the model: no claim
            return ours != theirs and ours != "all-linear"
        names = {t.rsplit(".", 1)[-1] for t in ([ours] if isinstance(ours, str) else ours)}
        return names != {t.rsplit(".", 1)[-1] for t in theirs}
    if name == "layers" and ours == 0:
        return theirs != 0 and theirs != _block_count(recipe.model.path)
    return ours != theirs


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def check_weights(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """The start adapter's weights (PEFT names, PEFT shapes) must be exactly the new adapter's: a missing, extra
    or differently shaped weight means another base model or a damaged file."""
    base = (mlxlm.read_config(path.parent) or {}).get("base_model_name_or_path")
    trained_on = f" (it was trained on {base})" if base else ""
    for key in sorted(expected):
        if key not in found:
            raise UserError(f"{KEY}: {path}: no weight {key}, which the adapter's own settings need; the file is "
                            f"incomplete or made for another model{trained_on}")
        if tuple(found[key]) != tuple(expected[key]):
            raise UserError(f"{KEY}: {path}: {key} has shape {tuple(found[key])} but this model needs "
                            f"{tuple(expected[key])}: the adapter does not fit this base model{trained_on}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise UserError(f"{KEY}: {path}: weight {extra[0]} belongs to no adapted module of this model "
                        f"({len(extra)} such weights){trained_on}")


def peft_key(key: str) -> str:
    """A PEFT weight name without the adapter name some tools keep in it (lora_A.default.weight)."""
    return key.replace(".default.", ".").removesuffix(".default")
