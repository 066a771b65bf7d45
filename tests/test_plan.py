"""trmlx plan for causal recipes: the arithmetic terms, batch_size = "auto" / --fit-budget, and the CLI (the
accuracy against measured peaks: tests/test_plan_accuracy.py). No speed is asserted anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trmlx.errors import UserError
from trmlx.plan.base import make_target
from trmlx.plan.causal import ModelShape, plan_memory
from trmlx.plan.config import PRESETS
from trmlx.plan.tasks import fit, load_shape, resolve_batch
from trmlx.recipe.checks import parse_size
from trmlx.recipe import load_recipe, recipe_to_toml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.toml"
TINY = REPO / "recipes" / "models" / "tiny-llama-tr"
TRANSLATE = REPO / "recipes" / "translate_7b.toml"


def test_parse_size():
    assert parse_size("16GB") == 16e9 and parse_size("16") == 16e9 and parse_size("500MB") == 5e8
    assert parse_size("12 GiB") == 12 * 2**30 and parse_size("1.5gb") == 1.5e9
    with pytest.raises(UserError, match="expected a size like 16GB"):
        parse_size("lots")


def test_shapes_count_parameters():
    assert ModelShape.from_config(PRESETS["7b"]).parameters() == 6_738_415_616  # Llama-2-7B
    assert abs(ModelShape.from_config(PRESETS["qwen2.5-7b"]).parameters() - 7.62e9) < 0.01e9  # Qwen2.5-7B
    from safetensors.numpy import load_file

    real = sum(v.size for v in load_file(str(TINY / "model.safetensors")).values())
    assert load_shape(load_recipe(QUICKSTART, backend="mlx")).parameters() == real


def test_weight_term_equals_the_loaded_mlx_model():
    """The arithmetic part is exact: 4-bit g64 weights + LoRA as the MLX backend really loads them."""
    pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from trmlx.backend import get_backend

    recipe = load_recipe(QUICKSTART, ["model.quantize_bits=4"], backend="mlx")
    loaded = get_backend("mlx").load(recipe)
    measured = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    shape = load_shape(recipe)
    terms = {t.name: t.bytes for t in plan_memory(recipe, "mlx", shape, make_target(recipe, "mlx", shape, "cpu")).terms}
    assert terms["weights"] + terms["adapter"] == measured


def test_auto_batch_keeps_the_effective_batch_and_fits():
    recipe = load_recipe(QUICKSTART, ["train.batch_size=auto", "train.effective_batch=8", "train.grad_accum=1"],
                         backend="mlx")
    shape = load_shape(recipe)
    target = make_target(recipe, "mlx", shape, "cpu")
    plans = {b: plan_memory(recipe, "mlx", shape, target, batch_size=b, grad_accum=8 // b, grad_checkpoint=False)
             for b in (1, 2, 4, 8)}
    room = {b: plan.train_peak + plan.overhead for b, plan in plans.items()}
    budget = (room[4] + room[8]) / 2  # room for micro-batch 4, not 8
    chosen = resolve_batch(load_recipe(QUICKSTART, ["train.batch_size=auto", "train.effective_batch=8",
                                                    f"train.memory_budget={budget / 1e9:.6f}GB"], backend="mlx"),
                           "mlx", kind="cpu", quiet=True)
    assert (chosen.train.batch_size, chosen.train.grad_accum, chosen.train.grad_checkpoint) == (4, 2, False)
    assert "batch_size = 4" in recipe_to_toml(chosen) and "grad_accum = 2" in recipe_to_toml(chosen)
    # An integer batch with a budget that is too small for it: micro-batch down, accumulation up, same product.
    fitted = resolve_batch(load_recipe(QUICKSTART, [f"train.memory_budget={budget / 1e9:.6f}GB"], backend="mlx"),
                           "mlx", kind="cpu", quiet=True)
    assert fitted.train.batch_size * fitted.train.grad_accum == 8 and fitted.train.batch_size == 4
    with pytest.raises(UserError, match='needs a memory budget'):
        resolve_batch(load_recipe(QUICKSTART, ["train.batch_size=auto"], backend="mlx"), "mlx", kind="cpu")
    with pytest.raises(UserError, match="nothing fits 0.0 GB"):
        fit(recipe, "mlx", shape, target, 1e6)


def test_train_with_fit_budget_saves_the_chosen_numbers(cli, tmp_path):
    pytest.importorskip("mlx.core")
    run = tmp_path / "run"
    result = cli("train", str(QUICKSTART), "--backend", "mlx", "--output", str(run), "--fit-budget", "50GB",
                 "--set", "train.batch_size=auto", "--set", "train.effective_batch=4", "--set", "train.steps=2",
                 "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "train.warmup_steps=0",
                 "--json")
    assert result.exit_code == 0, result.stderr
    saved = load_recipe(run / "recipe.toml", backend="mlx")
    assert (saved.train.batch_size, saved.train.grad_accum, saved.train.memory_budget) == (4, 1, "50GB")


def test_plan_cli_for_the_7b_recipe(cli):
    result = cli("plan", str(TRANSLATE), "--backend", "cuda", "--model-shape", "qwen2.5-7b", "--device", "gpu",
                 "--budget", "16GB", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    terms = {t["name"]: t["gb"] for t in plan["terms"]}
    assert set(terms) == {"weights", "adapter", "gradients", "optimizer", "activations", "recompute", "logits_loss",
                          "kv_cache", "prefill", "overhead"}  # recompute: grad_checkpoint is on
    assert 4.5 < terms["weights"] < 6.0  # NF4 blocks + bf16 embedding and head of Qwen2.5-7B
    assert plan["settings"]["grad_checkpoint"] is True and plan["settings"]["adapted_layers"] == 16
    assert isinstance(plan["fits"], bool) and plan["budget_gb"] == 16.0
    text = cli("plan", str(TRANSLATE), "--backend", "mlx", "--model-shape", "qwen2.5-7b", "--device", "metal",
               "--budget", "16GB")
    assert text.exit_code == 0 and "predicted peak" in text.stdout


def test_plan_without_a_config_is_one_clear_error(cli):
    result = cli("plan", str(TRANSLATE), "--backend", "cuda")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.path: no config.json for 'Qwen/Qwen2.5-7B-Instruct' locally or in the Hugging Face cache; "
        "fetch just the config (huggingface-cli download Qwen/Qwen2.5-7B-Instruct config.json) or pass "
        "--model-shape 7b|qwen2.5-7b|llama3-8b|tiny|CONFIG.json"]


def test_every_task_kind_has_a_planner_and_a_bench_module():
    """The task kinds are spelled once (recipe.schema.TaskKind): plan and bench serve each of them."""
    from typing import get_args

    from trmlx.bench.run import bench_task
    from trmlx.plan.tasks import PLANNERS
    from trmlx.recipe.schema import TaskKind

    assert set(PLANNERS) == set(get_args(TaskKind))
    for task, planner in PLANNERS.items():
        assert callable(planner.Shape.from_config) and callable(planner.fit) and callable(planner.apply)
        assert callable(bench_task(task).plan_settings)
