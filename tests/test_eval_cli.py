"""`trmlx eval` and `trmlx generate` end to end on the tiny Llama with a saved (non-trivial) LoRA adapter:
predictions file, metric keys, run-directory layout, exit codes; generate prints only the text when piped."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO
from trmlx.evaluate import score_predictions
from trmlx.recipe.schema import DataConfig, EvalConfig, Recipe, TaskConfig

QUICKSTART = REPO / "recipes" / "quickstart.toml"
FAST = ("--set", "eval.max_new_tokens=12")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter with random factors (a fresh one has B = 0 and would change nothing), saved in PEFT format."""
    pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from trmlx.backends.mlx import create_backend
    from trmlx.backends.mlx.adapters import peft_config, save_adapter
    from trmlx.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    loaded = create_backend().load(recipe)
    mx.random.seed(0)
    params = [(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(loaded.model.trainable_parameters())]
    loaded.model.update(tree_unflatten(params))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(loaded.model, path, peft_config(recipe.peft, loaded.model, recipe.model.path))
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # not the wrapped `linear`
    return path


@pytest.fixture
def run_dir(tmp_path, adapter):
    """A finished run as `trmlx train` leaves it: resolved recipe, environment.json and adapter/."""
    from trmlx.recipe import load_recipe, recipe_to_toml

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(recipe_to_toml(load_recipe(QUICKSTART, backend="mlx")))
    (run / "environment.json").write_text(json.dumps({"backend": "mlx"}))
    shutil.copytree(adapter, run / "adapter")
    return run


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_recipe_with_adapter_writes_predictions_and_metrics(cli, tmp_path, adapter):
    out = tmp_path / "out"
    result = cli("eval", str(QUICKSTART), "--adapter", str(adapter), "--max-samples", "8", "--batch-size", "3",
                 "--output", str(out), "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 8 and report["split"] == "test" and report["backend"] == "mlx"
    assert set(report["metrics"]) == {"bleu", "chrf", "loss", "perplexity"}
    assert set(report["signatures"]) == {"bleu", "chrf"} and report["per_task"] is None
    assert report["generation"]["tokens"] > 0 and report["generation"]["tokens_per_second"] > 0
    assert json.loads((out / "eval_test.json").read_text()) == report
    rows = read_jsonl(out / "predictions" / "test.jsonl")
    assert len(rows) == 8
    assert all(set(r) == {"prompt", "prediction", "reference", "task", "origin"} for r in rows)
    first = json.loads((REPO / "recipes" / "data" / "en_tr" / "test.jsonl").read_text().splitlines()[0])
    assert rows[0]["prompt"] == f"English: {first['source']}\nTurkish: " and rows[0]["reference"] == first["target"]
    assert rows[0]["origin"].endswith("test.jsonl:1")  # original order restored after length-sorted batches

    base = cli("eval", str(QUICKSTART), "--max-samples", "8", "--output", str(tmp_path / "base"), "--json", *FAST)
    assert base.exit_code == 0, base.output
    assert read_jsonl(tmp_path / "base" / "predictions" / "test.jsonl") != rows  # the adapter changes the output


def test_eval_run_dir_uses_its_recipe_adapter_and_layout(cli, run_dir):
    result = cli("eval", str(run_dir), "--split", "valid", "--max-samples", "4", *FAST)
    assert result.exit_code == 0, result.output
    assert "bleu" in result.stdout and "chrf" in result.stdout and "perplexity" in result.stdout
    assert len(read_jsonl(run_dir / "predictions" / "valid.jsonl")) == 4
    report = json.loads((run_dir / "eval_valid.json").read_text())
    assert report["adapter"] == str(run_dir / "adapter") and report["n"] == 4


def test_eval_bad_targets_exit_2_with_one_line(cli, tmp_path, run_dir):
    missing = cli("eval", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and missing.stderr == f"error: {tmp_path / 'nope'}: no such run directory or " \
                                                       "recipe file\n"
    not_a_run = cli("eval", str(tmp_path))
    assert not_a_run.exit_code == 2 and "not a run directory (no recipe.toml)" in not_a_run.stderr
    shutil.rmtree(run_dir / "adapter")
    unfinished = cli("eval", str(run_dir))
    assert unfinished.exit_code == 2 and "no adapter_config.json" in unfinished.stderr
    assert len(unfinished.stderr.splitlines()) == 1


def greedy_text(adapter_dir, prompt: str, max_tokens: int) -> str:
    """The reference completion, computed through the library rather than the CLI."""
    from trmlx.backend import GenerationSettings
    from trmlx.backends.mlx import create_backend
    from trmlx.backends.mlx.generate import generate_tokens
    from trmlx.recipe import load_recipe

    loaded = create_backend().load(load_recipe(QUICKSTART), adapter_dir)
    tokens = generate_tokens(loaded, [loaded.tokenizer.encode(prompt)], GenerationSettings(max_new_tokens=max_tokens))
    return loaded.tokenizer.decode(tokens[0], skip_special_tokens=True)


def test_generate_prints_only_the_text_when_piped(cli, run_dir, adapter):
    raw = cli("generate", str(run_dir), "--raw", "--prompt", "Merhaba", "--max-tokens", "8")
    assert raw.exit_code == 0, raw.output
    assert raw.stdout == greedy_text(adapter, "Merhaba", 8) + "\n"
    formatted = cli("generate", str(run_dir), "--prompt", "Good morning.", "--max-tokens", "8", "--json")
    assert formatted.exit_code == 0, formatted.output
    assert json.loads(formatted.stdout)["text"] == greedy_text(adapter, "English: Good morning.\nTurkish: ", 8)
    base = cli("generate", "--model", str(REPO / "recipes" / "models" / "tiny-llama-tr"), "-p", "Merhaba",
               "--max-tokens", "8")
    assert base.exit_code == 0 and base.stdout != raw.stdout  # no adapter: the base model's continuation


def test_generate_stop_interactive_and_usage_errors(cli, run_dir, adapter):
    from click.testing import CliRunner

    from trmlx.cli import main

    full = greedy_text(adapter, "Merhaba", 12)
    stop = full[4:6]
    cut = cli("generate", str(run_dir), "--raw", "-p", "Merhaba", "--max-tokens", "12", "--stop", stop)
    assert cut.stdout == full[: full.index(stop)] + "\n"
    session = CliRunner().invoke(main, ["generate", str(run_dir), "--raw", "-i", "--max-tokens", "12"],
                                 input="Merhaba\n\nexit\nnever read\n", catch_exceptions=False)
    assert session.exit_code == 0 and session.stdout == full + "\n"
    assert cli("generate", str(run_dir)).exit_code == 2
    assert cli("generate", "--model", str(run_dir), str(run_dir), "-p", "x").exit_code == 2


def test_per_task_scores_use_each_tasks_metrics():
    recipe = Recipe(data=DataConfig(tasks=[TaskConfig(name="qa", metrics=["chrf"]), TaskConfig(name="mt")]),
                    eval=EvalConfig(metrics=["bleu", "chrf"]))
    rows = [{"task": "qa", "prediction": "Ankara", "reference": "Ankara"},
            {"task": "mt", "prediction": "kedi paspasın üstüne oturdu", "reference": "kedi paspasa oturdu"}]
    scored = score_predictions(recipe, rows)
    assert set(scored["per_task"]) == {"qa", "mt"}
    assert set(scored["per_task"]["qa"]) == {"chrf"} and set(scored["per_task"]["mt"]) == {"bleu", "chrf"}
    assert scored["metrics"]["bleu"] == scored["per_task"]["mt"]["bleu"]
    assert scored["metrics"]["chrf"] == pytest.approx((scored["per_task"]["qa"]["chrf"] +
                                                       scored["per_task"]["mt"]["chrf"]) / 2)
    assert set(scored["signatures"]) == {"bleu", "chrf"}
