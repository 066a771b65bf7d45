"""`eval --compare`: side-by-side metrics with paired bootstrap intervals, per task and overall."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from trmlx.compare import compare_systems, system_names
from trmlx.errors import UserError
from trmlx.recipe import load_recipe

REFS = ["kedi paspasın üstünde oturuyor", "bugün hava çok güzel", "Ankara'da kar yağıyor", "çay içmeyi severim"]


def rows(preds, task=""):
    return [{"prediction": p, "reference": r, "task": task} for p, r in zip(preds, REFS)]


def test_a_system_against_itself_and_a_better_one():
    recipe = load_recipe(REPO / "recipes" / "quickstart.toml")
    worse = ["köpek", "yarın yağmur", "İzmir'de güneş", "kahve"]
    result = compare_systems(recipe, {"a": rows(worse), "same": rows(worse), "better": rows(REFS)})
    by = {(r["metric"], r["system"]): r for r in result["rows"]}
    assert set(m for m, _ in by) == {"bleu", "chrf"}
    assert by[("chrf", "same")]["diff"] == 0 and by[("chrf", "same")]["p_value"] == 1
    assert by[("chrf", "better")]["score"] == pytest.approx(100.0)
    assert by[("chrf", "better")]["diff"] == pytest.approx(100.0 - by[("chrf", "a")]["score"])
    assert by[("chrf", "better")]["ci_low"] > 0
    assert "diff" not in by[("chrf", "a")]  # the reference row has no difference


def test_different_test_sets_are_refused():
    recipe = load_recipe(REPO / "recipes" / "quickstart.toml")
    other = [{"prediction": "x", "reference": "başka", "task": ""}]
    with pytest.raises(UserError, match="was evaluated on other examples than a"):
        compare_systems(recipe, {"a": rows(REFS), "b": other})


def test_system_names_are_unique():
    assert system_names(["runs/x", "other/x", "runs/y"]) == ["x", "x'", "y"]


def test_cli_compare_two_runs_and_base(cli, tmp_path):
    pytest.importorskip("mlx.core")
    for name, steps in (("a", "2"), ("b", "4")):
        result = cli("train", str(REPO / "recipes" / "quickstart.toml"), "--output", str(tmp_path / name),
                     "--set", f"train.steps={steps}", "--set", "train.warmup_steps=1", "--json")
        assert result.exit_code == 0, result.output
    result = cli("eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--base", "--max-samples", "5",
                 "--output", str(tmp_path / "cmp"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["systems"] == ["base", "a", "b"] and report["reference"] == "base"
    assert {r["system"] for r in report["rows"] if "diff" in r} == {"a", "b"}
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a" / "predictions" / "test-base.jsonl").is_file()
    single = cli("eval", str(tmp_path / "a"), str(tmp_path / "b"))
    assert single.exit_code == 2 and "several only with --compare" in single.stderr
