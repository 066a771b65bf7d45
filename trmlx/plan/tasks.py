"""Each task kind's planner, and the entry points that choose it by recipe.task: load_shape, plan_recipe, fit and
resolve_batch.

`resolve_batch` is the one place where `train.batch_size = "auto"` (or a `train.memory_budget`) becomes numbers:
the run's saved recipe holds the chosen micro-batch, grad_accum and grad_checkpoint (embedding: also the cached-MNRL
mini-batch), and backends only ever see integers.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from trmlx.errors import UserError
from trmlx.plan import causal, embedding, seq2seq
from trmlx.plan.base import GB, Plan, Target, make_target
from trmlx.plan.config import read_config
from trmlx.recipe.checks import parse_size
from trmlx.recipe.schema import Recipe

# Every task module has the same face: Shape (with from_config), plan_memory(recipe, backend, shape, target,
# **settings), fit(recipe, backend, shape, target, budget) and apply(recipe, plan).
PLANNERS: dict[str, ModuleType] = {"causal": causal, "seq2seq": seq2seq, "embedding": embedding}


def shape_from_config(task: str, config: dict[str, Any], source: str = "") -> Any:
    """The shape object of a task's model (causal.ModelShape for decoder LMs) from a config.json dict."""
    return PLANNERS[task].Shape.from_config(config, source)


def load_shape(recipe: Recipe, model_shape: str | None = None) -> Any:
    """The model's shape for the recipe's task: a --model-shape preset or config file, else model.path's
    config.json (a local folder or the Hugging Face cache; never downloads)."""
    config, source = read_config(recipe, model_shape)
    return shape_from_config(recipe.task, config, source)


def plan_recipe(recipe: Recipe, backend: str, shape: Any, target: Target, **settings: Any) -> Plan:
    """plan_memory for the recipe's task (settings: that planner's keywords)."""
    return PLANNERS[recipe.task].plan_memory(recipe, backend, shape, target, **settings)


def fit(recipe: Recipe, backend: str, shape: Any, target: Target, budget: float) -> tuple[Plan, list[Plan]]:
    """The settings that fit the budget, by the task's rule, and every plan tried."""
    return PLANNERS[recipe.task].fit(recipe, backend, shape, target, budget)


def resolve_batch(recipe: Recipe, backend: str, kind: str = "auto", quiet: bool = False) -> Recipe:
    """`train.batch_size = "auto"` or a `train.memory_budget`: choose micro-batch, grad_accum and checkpointing
    that fit the budget and return the recipe with those integers (the one place this happens)."""
    train = recipe.train
    if train.batch_size != "auto" and not train.memory_budget:
        return recipe
    if not train.memory_budget:
        raise UserError('train.batch_size: "auto" needs a memory budget: set train.memory_budget = "16GB" or '
                        "pass --fit-budget 16GB")
    budget = parse_size(train.memory_budget, "train.memory_budget")
    shape = load_shape(recipe)
    target = make_target(recipe, backend, shape, kind)
    plan, _ = fit(recipe, backend, shape, target, budget)
    s = plan.settings
    if not quiet:
        cached = f", embedding.mini_batch_size {s['mini_batch_size']}" if "mini_batch_size" in s else ""
        print(f"trmlx: memory budget {budget / GB:.1f} GB: micro-batch {s['batch_size']} × grad_accum "
              f"{s['grad_accum']}, grad_checkpoint {'on' if s['grad_checkpoint'] else 'off'}{cached} (planned peak "
              f"{plan.peak / GB:.2f} GB on {target.backend}/{target.kind})", file=sys.stderr)
    return PLANNERS[recipe.task].apply(recipe, plan)
