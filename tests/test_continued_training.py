"""Continued training (`peft.init_adapter`, `trmlx train --adapter DIR`): a run started from a saved adapter -- a
trmlx run's (PEFT) or mlx-lm's, LoRA or DoRA -- takes its weights and settings on both backends: its first training
loss is the start adapter's own loss on that batch, and the two backends agree on it. The written adapter evaluates
and exports as any other; bad start folders are one-line errors (exit 2) in `trmlx check` and `trmlx train`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
pytest.importorskip("torch", reason="the CUDA backend needs torch (pip install 'trmlx[cuda]')")
pytest.importorskip("peft", reason="the CUDA backend needs peft (pip install 'trmlx[cuda]')")

from tests.conftest import REPO  # noqa: E402
from trmlx import mlxlm  # noqa: E402
from trmlx import run as runner  # noqa: E402
from trmlx.report import read_log  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.toml"
SEQ2SEQ = REPO / "recipes" / "seq2seq_quickstart.toml"
SHORT = ("train.steps=3", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
         "train.batch_size=4", "train.lr=1e-2", "train.max_eval_batches=1")
BACKENDS = ("mlx", "cuda")


def train(out, backend: str, adapter=None, extra=(), recipe=QUICKSTART) -> list[float]:
    """A short run; its training losses, step by step."""
    setup = runner.resolve_run(str(recipe), backend, [*SHORT, *extra], str(out), None,
                               str(adapter) if adapter else None)
    runner.train(setup, backend)
    return [r["loss"] for r in read_log(out / "metrics.jsonl") if r["kind"] == "train"]


def first_batch_loss(backend: str, adapter, extra=(), recipe=QUICKSTART) -> float:
    """The loss of `adapter` (eval's loading path) on the first training batch a run with these settings takes."""
    from trmlx.backend import get_backend
    from trmlx.data import prepare_data
    from trmlx.data.examples import tokenize
    from trmlx.loop import BatchCursor, Position
    from trmlx.recipe import load_recipe

    resolved = load_recipe(recipe, [*SHORT, *extra], backend)
    module = get_backend(backend)
    loaded = module.load(resolved, mlxlm.as_peft_adapter(adapter))
    examples, _ = tokenize(prepare_data(resolved).train, resolved, loaded.tokenizer)
    first = BatchCursor([e.length for e in examples], resolved.train.batch_size, resolved.train.seed,
                        Position()).next()
    return module.evaluate(loaded, [examples[i] for i in first], len(first))["loss"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 3-step MLX run of the quickstart (rank 8, all linears): its adapter is a start for the tests."""
    out = tmp_path_factory.mktemp("start") / "run"
    train(out, "mlx")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_continued_run_starts_from_the_adapter(tmp_path, trained, backend, capsys):
    """The first step's loss is the start adapter's loss on that batch (and not a fresh adapter's); the adapter's
    rank wins over the recipe's, said in one line, and the saved recipe records it."""
    start = trained / "adapter"
    losses = train(tmp_path / "b", backend, start, ("peft.rank=4",))
    assert losses[0] == pytest.approx(first_batch_loss(backend, start), rel=1e-5)
    fresh = [r["loss"] for r in read_log(trained / "metrics.jsonl") if r["kind"] == "train"]
    assert abs(losses[0] - fresh[0]) > 0.05  # the start adapter changed the model
    note = [line for line in capsys.readouterr().err.splitlines() if "training continues from" in line]
    assert note == [f"note: peft.init_adapter {start}: training continues from this adapter with its own settings "
                    "(lora, rank 8, alpha 16, targets down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj, "
                    "all layers); the optimizer starts fresh; the recipe's peft.rank = 4 not used"]
    saved = (tmp_path / "b" / "recipe.toml").read_text()
    assert "rank = 8\n" in saved and f'init_adapter = "{start}"' in saved
    config = json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_continue_from_an_mlxlm_adapter_on_both_backends(tmp_path, kind, capsys):
    """mlx-lm's own LoRA (all blocks) and DoRA (3 modules of the last block): both backends load the same weights,
    so their first losses agree, and equal the adapter's evaluated loss."""
    pytest.importorskip("mlx_lm")
    from tests.test_mlxlm_adapters import make_mlxlm_adapter

    start = make_mlxlm_adapter(tmp_path / "start", kind)
    first = {backend: train(tmp_path / backend, backend, start)[0] for backend in BACKENDS}
    assert first["mlx"] == pytest.approx(first["cuda"], rel=1e-4)
    assert first["mlx"] == pytest.approx(first_batch_loss("mlx", start), rel=1e-5)
    for backend in BACKENDS:
        config = json.loads((tmp_path / backend / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 24.0, kind == "dora")
        assert config["layers_to_transform"] == ([1] if kind == "dora" else None)
    replaced = ('peft.method = "lora", ' if kind == "dora" else "") + "peft.rank = 8, peft.alpha = 16" + (
        ", peft.layers = 0" if kind == "dora" else "")  # all-linear: which linears depends on the model, no claim
    assert f"the recipe's {replaced} not used" in capsys.readouterr().err


def test_continued_adapter_evaluates_and_exports(tmp_path, trained, cli):
    """`trmlx train --adapter` from the command line; its adapter evaluates on both backends to the same loss and
    exports to mlx-lm's format with its tensors."""
    out = tmp_path / "b"
    args = [f"--set={s}" for s in SHORT]
    result = cli("train", str(QUICKSTART), "--adapter", str(trained / "adapter"), "--output", str(out), *args,
                 "--json")
    assert result.exit_code == 0, result.output
    evals = {}
    for backend in BACKENDS:
        result = cli("eval", str(out), "--backend", backend, "--max-samples", "3", "--output",
                     str(tmp_path / f"eval-{backend}"), "--json")
        assert result.exit_code == 0, result.output
        evals[backend] = json.loads(result.stdout)["metrics"]["loss"]
    assert evals["mlx"] == pytest.approx(evals["cuda"], rel=1e-4)
    result = cli("export", str(out), str(tmp_path / "mlxlm"), "--format", "mlx-lm", "--json")
    assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    mlxlm.mlxlm_to_peft(tmp_path / "mlxlm", back)
    ours, theirs = (mlxlm.read_tensors(folder / "adapter_model.safetensors") for folder in (out / "adapter", back))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_bad_start_folders_are_one_line_errors(tmp_path, trained, cli, write):
    """Missing folder, no config, broken JSON, a prompt-tuning adapter: `trmlx check` and `trmlx train` say so in
    one line naming the key and the path (relative paths resolve beside the recipe), exit code 2."""
    text = QUICKSTART.read_text().replace('"models/', f'"{REPO}/recipes/models/').replace(
        '"data/', f'"{REPO}/recipes/data/').replace("[peft]\n", '[peft]\ninit_adapter = "start"\n')
    recipe = write("r.toml", text)
    start = tmp_path / "start"

    def refused(*command: str) -> str:
        result = cli(*command)
        assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
        return result.stderr.strip()

    def both(expected: str) -> None:
        assert refused("check", str(recipe), "--no-tokenizer") == f"error: peft.init_adapter: {expected}"
        assert refused("train", str(recipe), "--output", str(tmp_path / "run")) == \
            f"error: peft.init_adapter: {expected}"
        assert not (tmp_path / "run").exists()

    both(f"{start}: no such folder; expected a PEFT or mlx-lm adapter folder")
    start.mkdir()
    both(f"{start}: no adapter_config.json; expected a PEFT adapter folder (adapter_config.json + "
         "adapter_model.safetensors) or an mlx-lm one (adapters.safetensors + adapter_config.json)")
    (start / "adapter_config.json").write_text("{not json")
    both(f"{start}: adapter_config.json: not valid JSON (Expecting property name enclosed in double quotes at "
         "line 1 column 2)")
    (start / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}))
    shutil.copy(trained / "adapter" / "adapter_model.safetensors", start)
    both(f"{start / 'adapter_config.json'}: peft_type 'PROMPT_TUNING': training continues from LoRA and DoRA "
         "adapters (PEFT's LORA, with or without use_dora, or mlx-lm's lora / dora)")
    assert refused("train", str(QUICKSTART), "--adapter", str(tmp_path / "nope")) == \
        f"error: --adapter: {tmp_path / 'nope'}: no such folder; expected a PEFT or mlx-lm adapter folder"
    assert "give one of them" in refused("train", "--resume", str(trained), "--adapter", str(trained / "adapter"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_adapter_of_another_shape_is_refused_after_load(tmp_path, trained, cli, backend):
    """A config that does not describe its weights (or another base model): one line naming the weight."""
    start = tmp_path / "start"
    shutil.copytree(trained / "adapter", start)
    config = json.loads((start / "adapter_config.json").read_text())
    (start / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    result = cli("train", str(QUICKSTART), "--adapter", str(start), "--backend", backend, "--output",
                 str(tmp_path / "run"), *[f"--set={s}" for s in SHORT])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and errors == [
        f"error: peft.init_adapter: {start / 'adapter_model.safetensors'}: base_model.model.model.layers.0.mlp."
        "down_proj.lora_A.weight has shape (8, 128) but this model needs (2, 128): the adapter does not fit this "
        f"base model (it was trained on {REPO / 'recipes' / 'models' / 'tiny-llama-tr'})"], result.output


def test_seq2seq_continues_from_its_adapter(tmp_path):
    """The tiny mT5 multitask recipe, continued from its MLX adapter on MLX and on the CUDA backend."""
    extra = ("train.batch_size=2", "data.max_length=64", "data.max_target_length=16")
    train(tmp_path / "a", "mlx", extra=extra, recipe=SEQ2SEQ)
    start = tmp_path / "a" / "adapter"
    first = {backend: train(tmp_path / backend, backend, start, extra, recipe=SEQ2SEQ)[0] for backend in BACKENDS}
    assert first["mlx"] == pytest.approx(first_batch_loss("mlx", start, extra, SEQ2SEQ), rel=1e-5)
    assert first["cuda"] == pytest.approx(first["mlx"], rel=1e-4)


def test_quantised_base_continues_on_mlx(tmp_path):
    """A 4-bit base (quantised at load, tiny shapes): the continued run starts from the adapter on that base."""
    extra = ("model.quantize_bits=4",)
    train(tmp_path / "a", "mlx", extra=extra)
    start = tmp_path / "a" / "adapter"
    losses = train(tmp_path / "b", "mlx", start, extra)
    assert losses[0] == pytest.approx(first_batch_loss("mlx", start, extra), rel=1e-5)


def test_check_names_the_replaced_keys(trained, cli):
    result = cli("check", str(QUICKSTART), "--no-tokenizer", "--json", "--set", "peft.rank=4",
                 "--set", f'peft.init_adapter="{trained / "adapter"}"')
    assert result.exit_code == 0, result.output
    assert "peft.init_adapter: the adapter's own settings replace the recipe's peft.rank = 4" in \
        json.loads(result.stdout)[0]["warnings"]


def test_resume_of_a_continued_run_is_exact(tmp_path, trained):
    """A continued run cut by Ctrl-C resumes from its checkpoint (the saved recipe holds the adapter's settings)
    with the losses of the uninterrupted run, even with the start folder gone."""
    from trmlx.errors import TrainingInterrupted

    start = tmp_path / "start"
    shutil.copytree(trained / "adapter", start)
    extra = ("train.steps=4", "train.save_every=2")
    straight = train(tmp_path / "a", "mlx", start, extra)

    def ctrl_c(report, steps):
        if report.step == 3:
            raise KeyboardInterrupt

    setup = runner.resolve_run(str(QUICKSTART), "mlx", [*SHORT, *extra], str(tmp_path / "b"), None, str(start))
    with pytest.raises(TrainingInterrupted):
        runner.train(setup, "mlx", on_report=ctrl_c)
    shutil.rmtree(start)
    runner.train(runner.resolve_run(None, "mlx", (), None, str(tmp_path / "b")), "mlx")
    resumed = [r["loss"] for r in read_log(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed == pytest.approx(straight, rel=1e-5) and len(resumed) == 4
