"""Recipes: every shipped recipe validates; every error class has its exact one-line message."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from trmlx.errors import UserError
from trmlx.recipe import field_docs, load_recipe, recipe_to_toml

SHIPPED = sorted((REPO / "recipes").glob("*.toml"))

MINIMAL = """
task = "causal"
[model]
path = "some-org/some-model"
[data]
train = "train.jsonl"
"""


def problems(write, text: str, overrides=(), backend=None) -> list[str]:
    path = write("r.toml", text)
    with pytest.raises(UserError) as err:
        load_recipe(path, overrides, backend)
    return [p.replace(str(path), "r.toml") for p in err.value.problems]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("backend", [None, "mlx", "cuda"])
def test_every_shipped_recipe_validates(path, backend):
    recipe = load_recipe(path, backend=backend)
    assert recipe.name == path.stem
    assert recipe.model.path


def test_shipped_recipes_exist():
    assert any(p.name == "translate_7b.toml" for p in SHIPPED)


def test_defaults_and_relative_paths(write, tmp_path):
    recipe = load_recipe(write("r.toml", MINIMAL))
    assert recipe.train.lr == 1e-4 and recipe.peft.method == "lora" and recipe.name == "r"
    assert recipe.data.train == str(tmp_path / "train.jsonl")  # relative to the recipe file, not the cwd
    assert recipe.model.path == "some-org/some-model"  # a hub id stays a hub id


def test_unknown_key_suggests_closest(write):
    assert problems(write, MINIMAL + "[train]\ngrad_acum = 4\n") == [
        "r.toml: train.grad_acum: unknown key; did you mean `train.grad_accum`?"
    ]


def test_unknown_section_lists_valid_keys(write):
    (msg,) = problems(write, MINIMAL + "[zzz]\na = 1\n")
    assert msg.startswith("r.toml: zzz: unknown key; valid keys: task, name, description, model, data,")


def test_wrong_type_and_range_and_choice_all_reported_at_once(write):
    text = MINIMAL + '[train]\nlr = "fast"\nbatch_size = 0\nschedule = "cosin"\n[peft]\nrank = 8.5\n'
    assert problems(write, text) == [  # in file order
        "r.toml: train.lr: expected a number, got 'fast' (string)",
        "r.toml: train.batch_size: expected a value at least 1, got 0",
        "r.toml: train.schedule: expected one of 'cosine', 'linear', 'constant', got 'cosin' (string); "
        "did you mean 'cosine'?",
        "r.toml: peft.rank: expected an integer, got 8.5 (number)",
    ]


def test_toml_syntax_error_names_line_and_column(write):
    (msg,) = problems(write, 'task = "causal"\n[model]\npath = "x\n')
    assert msg.startswith("r.toml:3:") and "invalid TOML" in msg


def test_impossible_combinations(write):
    text = """
task = "embedding"
[model]
path = "some/bert"
[data]
train = "t.jsonl"
[peft]
method = "prefix"
[eval]
metrics = ["bleu", "mrr@10", "bogus"]
"""
    msgs = problems(write, text)
    assert "r.toml: peft.method: prefix tuning does not apply to embedding models; use lora, dora or full" in msgs
    assert "r.toml: eval.metrics: metric 'bleu' is a text metric, which does not apply to a embedding task" in msgs
    assert any(m.startswith("r.toml: eval.metrics: unknown metric 'bogus'; available: bleu, chrf") for m in msgs)
    assert len(msgs) == 3


def test_wi_target_on_mt5_is_an_error(write, tmp_path):
    text = 'task = "seq2seq"\n[model]\npath = "google/mt5-small"\n[data]\ntrain = "t.jsonl"\n' \
           '[peft]\ntargets = ["q", "v", "wi"]\n'
    assert problems(write, text) == [
        "r.toml: peft.targets: mT5 / T5 v1.1 feed-forward layers are wi_0 and wi_1; `wi` matches nothing in "
        "this model"
    ]
    # A local model is judged by its config, not its name.
    (tmp_path / "t5v1").mkdir()
    (tmp_path / "t5v1" / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
    ok = text.replace("google/mt5-small", "t5v1")
    assert load_recipe(write("ok.toml", ok)).peft.targets == ["q", "v", "wi"]


def test_quantisation_the_backend_cannot_do(write):
    text = MINIMAL.replace('path = "some-org/some-model"', 'path = "m"\nquantize_bits = 3')
    assert problems(write, text, backend="cuda") == [
        "r.toml: model.quantize_bits: the CUDA backend (bitsandbytes) quantises to 4 or 8 bits, got 3"
    ]
    assert load_recipe(write("r2.toml", text), backend="mlx").model.quantize_bits == 3
    nf4 = MINIMAL.replace('path = "some-org/some-model"', 'path = "m"\nquantize_bits = 4\nquant_mode = "nf4"')
    assert problems(write, nf4, backend="mlx") == [
        "r.toml: model.quant_mode: 'nf4' is a bitsandbytes scheme; MLX uses affine, mxfp4, nvfp4 or mxfp8"
    ]


def test_fp16_t5_and_steps_with_epochs(write):
    text = 'task = "seq2seq"\n[model]\npath = "m"\ndtype = "fp16"\n[data]\ntrain = "t.jsonl"\n' \
           "[train]\nsteps = 10\nepochs = 2\n"
    assert problems(write, text) == [
        "r.toml: train.steps: set train.steps or train.epochs, not both",
        "r.toml: model.dtype: T5/mT5 overflow in fp16 (NaN loss); use bf16, fp32 or auto",
    ]


def test_command_line_beats_backend_override_beats_recipe(write):
    text = MINIMAL + "[train]\nlr = 1e-3\nbatch_size = 8\n[backend.mlx.train]\nbatch_size = 2\nlr = 5e-4\n"
    path = write("r.toml", text)
    assert load_recipe(path).train.batch_size == 8
    assert load_recipe(path, backend="cuda").train.batch_size == 8
    mlx = load_recipe(path, backend="mlx")
    assert (mlx.train.batch_size, mlx.train.lr) == (2, 5e-4)
    cli = load_recipe(path, ["train.lr=2e-4", "peft.method=dora", "peft.targets=['q_proj']"], backend="mlx")
    assert (cli.train.lr, cli.train.batch_size, cli.peft.method, cli.peft.targets) == (2e-4, 2, "dora", ["q_proj"])


def test_bad_overrides_name_the_flag(write):
    assert problems(write, MINIMAL, ["train.lr=abc", "train.batchsize=2", "oops"]) == [
        "--set oops: expected KEY=VALUE, e.g. --set train.lr=2e-4",
        "--set: train.lr: expected a number, got 'abc' (string)",
        "--set: train.batchsize: unknown key; did you mean `train.batch_size`?",
    ]


def test_bad_backend_override_reported_even_for_other_backend(write):
    text = MINIMAL + "[backend.cuda.train]\nbatch_sise = 2\n[backend.tpu]\nx = 1\n"
    assert problems(write, text, backend="mlx") == [
        "r.toml: backend.cuda.train.batch_sise: unknown key; did you mean `backend.cuda.train.batch_size`?",
        "r.toml: backend.tpu: unknown backend; valid keys: mlx, cuda; expected one of mlx, cuda",
    ]


def test_resolved_recipe_round_trips(write, tmp_path):
    recipe = load_recipe(write("r.toml", MINIMAL + "[train]\nlr = 3e-4\n"), ["peft.rank=4"])
    again = load_recipe(write("resolved/r.toml", recipe_to_toml(recipe)))
    assert again == recipe


def test_multitask_tasks_validated(write):
    text = """
task = "seq2seq"
[model]
path = "m"
[data]
mixture = "weights"
[[data.tasks]]
name = "qa"
train = "qa.jsonl"
weight = 2.0
[[data.tasks]]
name = "qa"
[[data.tasks]]
train = "x.jsonl"
"""
    assert problems(write, text) == [
        "r.toml: data.tasks[1].name: task name 'qa' is used twice",
        "r.toml: data.tasks[1].train: required: the task's training file(s)",
        "r.toml: data.tasks[1].weight: data.mixture = 'weights' needs a weight > 0 for every task",
        "r.toml: data.tasks[2].name: required: every task needs a name",
        "r.toml: data.tasks[2].weight: data.mixture = 'weights' needs a weight > 0 for every task",
    ]


def test_every_field_is_documented():
    rows = field_docs()
    assert all(doc.strip() for _, _, _, doc in rows)
    keys = [key for key, *_ in rows]
    assert "train.grad_accum" in keys and "data.tasks[].prefix" in keys and "peft.num_virtual_tokens" in keys


def test_mlx_checkpointing_with_lora_dropout_is_refused(write):
    text = MINIMAL + "[train]\ngrad_checkpoint = true\n[peft]\ndropout = 0.1\n"
    assert problems(write, text, backend="mlx") == [
        "r.toml: peft.dropout: MLX recomputes checkpointed layers with a new dropout mask, which gives wrong "
        "gradients; set peft.dropout = 0 (e.g. in [backend.mlx.peft]) or train.grad_checkpoint = false"]
    assert load_recipe(write("ok.toml", text), backend="cuda").peft.dropout == 0.1
