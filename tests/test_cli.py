"""CLI conventions: help without heavy imports, --json, one-line errors with exit code 2, plots, env."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from trmlx.report import MetricsLogger, StepReport, read_log


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("check", "recipe", "plot", "score", "env"):
        assert f"  {command} " in result.output


def test_cli_import_pulls_in_neither_torch_nor_mlx():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import trmlx.cli"], capture_output=True,
                         text=True, cwd=REPO, check=True)
    modules = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "trmlx" in modules
    assert not modules & {"torch", "mlx", "transformers", "datasets", "peft", "bitsandbytes"}


def test_help_runs_as_a_real_command():
    out = subprocess.run([sys.executable, "-m", "trmlx", "recipe", "explain", "train"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and "grad_accum" in out.stdout and "Micro-batches per optimizer step" in out.stdout


def test_check_shipped_recipe_json(cli):
    result = cli("check", str(REPO / "recipes" / "translate_7b.toml"), "--json", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["rows"]["train"][""] >= 260 and summary["rows"]["test"][""] >= 30
    assert summary["lengths"]["train"]["input_chars"]["max"] > summary["lengths"]["train"]["input_chars"]["p50"]


def test_check_reports_tokens_with_a_local_tokenizer(cli, write, tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    write("t.jsonl", [{"source": "hello world", "target": "merhaba dünya"}] * 3)
    recipe = write("r.toml", '[model]\npath = "tok"\n[data]\ntrain = "t.jsonl"\nmax_length = 8\n')
    result = cli("check", str(recipe), "--json")
    (summary,) = json.loads(result.stdout)
    assert summary["lengths"]["train"]["tokens"] == {"p50": 6, "p90": 6, "p99": 6, "max": 6}
    assert summary["warnings"] == ["2 exact duplicate rows in train, kept (set data.dedup = true to remove)"]


def test_bad_recipe_exit_code_2_one_line_per_problem(cli, write):
    recipe = write("r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n[train]\nlrr = 1\nsteps = -1\n')
    result = cli("check", str(recipe))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {recipe}: train.lrr: unknown key; did you mean `train.lr`?",
                     f"error: {recipe}: train.steps: expected a value at least 0, got -1"]
    assert "Traceback" not in result.output


def test_bad_data_exit_code_2(cli, write):
    write("t.jsonl", '{"source": "a", "target": "b"}\n{broken\n')
    recipe = write("r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n')
    result = cli("check", str(recipe))
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("t.jsonl:2: malformed JSON: Expecting property name enclosed in double "
                                          "quotes (column 2)")


def test_recipe_show_applies_set_and_backend(cli):
    path = str(REPO / "recipes" / "translate_7b.toml")
    result = cli("recipe", "show", path, "--backend", "cuda", "--set", "train.lr=3e-4", "--json")
    resolved = json.loads(result.stdout)
    assert resolved["train"]["lr"] == 3e-4 and resolved["train"]["optimizer"] == "paged_adamw_8bit"
    assert "backend" not in resolved
    toml_text = cli("recipe", "show", path).stdout
    assert 'optimizer = "adamw"' in toml_text


def test_explain_unknown_section(cli):
    result = cli("recipe", "explain", "trian")
    assert result.exit_code == 2 and "no section 'trian'; sections:" in result.stderr


def test_metrics_log_and_plot(cli, tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        logger.log(StepReport(step=step, epoch=step / 5, loss=3.0 / step, learning_rate=1e-4))
    logger.log(StepReport(step=5, epoch=1.0, loss=1.1, kind="eval"))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash mid-write
    records = list(read_log(tmp_path / "metrics.jsonl"))
    assert len(records) == 6 and set(records[0]) >= {"step", "epoch", "loss", "learning_rate", "tokens_per_second",
                                                      "trained_tokens", "peak_memory_gb", "elapsed_seconds"}
    logger.truncate_after(3)
    assert [r["step"] for r in read_log(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    result = cli("plot", str(tmp_path), "--json")
    png = tmp_path / "plots" / "loss.png"
    assert json.loads(result.stdout) == {"png": str(png)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_on_a_non_run_dir(cli, tmp_path):
    result = cli("plot", str(tmp_path))
    assert result.exit_code == 2 and "no metrics log" in result.stderr


def test_env_reports_backends(cli):
    record = json.loads(cli("env", "--json").stdout)
    assert record["packages"]["trmlx"] and set(record["backends"]) == {"mlx", "cuda"}
    assert record["backends"]["mlx"].get("kind") == "cpu" or "error" in record["backends"]["mlx"]


def test_a_recipe_saved_with_a_bom_loads(write):
    from trmlx.recipe import load_recipe

    recipe = write("bom.toml", '\ufeff[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n[train]\nlr = 0.01\n')
    assert recipe.read_bytes().startswith(b"\xef\xbb\xbf")  # what Windows Notepad writes
    assert load_recipe(recipe).train.lr == 0.01


def test_memory_sizes_that_are_not_sizes_are_errors(cli, write):
    recipe = write("r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.jsonl"\n[train]\nmemory_budget = "banana"\n')
    result = cli("recipe", "show", str(recipe))
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {recipe}: train.memory_budget: expected a size like 16GB, 12.5GiB or "
                                     "800MB, got 'banana'")
    result = cli("plan", str(REPO / "recipes" / "quickstart.toml"), "--budget", "0GB")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --budget: expected a size above zero, got '0GB'"
