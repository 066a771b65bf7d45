"""trmlx plan and bench for seq2seq (T5 / mT5) recipes: the exact parameter count, batch_size = "auto", the CLI,
and trmlx bench end to end with the hf peer (the accuracy against measured peaks: tests/test_plan_accuracy.py).
No speed is asserted anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trmlx.errors import UserError
from trmlx.plan.base import make_target
from trmlx.plan.tasks import load_shape, plan_recipe, resolve_batch, shape_from_config
from trmlx.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "seq2seq_quickstart.toml"
TINY = REPO / "recipes" / "models" / "tiny-mt5-tr"


def test_shape_counts_parameters_exactly():
    from safetensors.numpy import load_file

    real = sum(v.size for v in load_file(str(TINY / "model.safetensors")).values())
    shape = load_shape(load_recipe(RECIPE, backend="mlx"))
    assert shape.parameters() == real and shape.gated and not shape.tied
    with pytest.raises(UserError, match="covers T5 / mT5 models; this config is model_type 'llama'"):
        shape_from_config("seq2seq", {"model_type": "llama", "hidden_size": 64}, "x/config.json")


def test_shape_counts_t5_v1_0_and_uneven_stacks():
    """T5 v1.0 (ReLU wi, tied head) with more decoder than encoder layers, against transformers' own model."""
    pytest.importorskip("transformers")
    from transformers import T5Config, T5ForConditionalGeneration

    config = {"model_type": "t5", "vocab_size": 512, "d_model": 32, "d_kv": 12, "d_ff": 96, "num_heads": 3,
              "num_layers": 2, "num_decoder_layers": 3, "feed_forward_proj": "relu", "tie_word_embeddings": True,
              "is_encoder_decoder": True}
    model = T5ForConditionalGeneration(T5Config(**config))
    real = sum(p.numel() for p in model.parameters())  # shared once (tied head)
    assert shape_from_config("seq2seq", config).parameters() == real


def test_weight_term_equals_the_loaded_mlx_model():
    """4-bit g64 weights (embedding and head too) + LoRA, exactly as the MLX backend loads a T5."""
    pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from trmlx.backend import get_backend

    recipe = load_recipe(RECIPE, ["model.quantize_bits=4"], backend="mlx")
    loaded = get_backend("mlx").load(recipe)
    measured = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    shape = load_shape(recipe)
    terms = {t.name: t.bytes for t in plan_recipe(recipe, "mlx", shape, make_target(recipe, "mlx", shape, "cpu")).terms}
    assert terms["weights"] + terms["adapter"] == measured


def test_auto_batch_for_seq2seq_keeps_the_effective_batch():
    recipe = load_recipe(RECIPE, ["train.batch_size=auto", "train.effective_batch=8"], backend="cuda")
    shape = load_shape(recipe)
    target = make_target(recipe, "cuda", shape, "cpu")
    room = {b: plan_recipe(recipe, "cuda", shape, target, batch_size=b, grad_accum=8 // b, grad_checkpoint=False)
            for b in (1, 2, 4, 8)}
    room = {b: p.train_peak + p.overhead for b, p in room.items()}
    budget = (room[2] + room[4]) / 2  # room for micro-batch 2, not 4
    chosen = resolve_batch(load_recipe(RECIPE, ["train.batch_size=auto", "train.effective_batch=8",
                                                f"train.memory_budget={budget / 1e9:.6f}GB"], backend="cuda"),
                           "cuda", kind="cpu", quiet=True)
    assert (chosen.train.batch_size, chosen.train.grad_accum, chosen.train.grad_checkpoint) == (2, 4, False)


def test_plan_cli_for_the_seq2seq_quickstart(cli):
    result = cli("plan", str(RECIPE), "--backend", "mlx", "--device", "cpu", "--budget", "4GB", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {t["name"] for t in plan["terms"]} == {
        "weights", "adapter", "gradients", "optimizer", "encoder_activations", "decoder_activations", "logits_loss",
        "encoder_output", "prefill", "cross_kv", "kv_cache", "overhead"}
    gb = {t["name"]: t["gb"] for t in plan["terms"]}  # the encoder pass and decoding do not overlap: the larger counts
    held = gb["weights"] + gb["adapter"] + gb["encoder_output"]
    assert abs(plan["eval_peak_gb"] - held - max(gb["prefill"], gb["cross_kv"] + gb["kv_cache"])) < 2e-4
    s = plan["settings"]
    assert (s["seq_len"], s["target_len"], s["eval_batch_size"], s["max_new_tokens"]) == (192, 48, 16, 32)
    assert plan["fits"] is True and plan["model"]["parameters"] == 328704
    text = cli("plan", str(RECIPE), "--backend", "cuda", "--device", "cpu", "--budget", "0.3GB")
    assert text.exit_code == 0, text.stderr
    assert "source 192 → target 48 tokens" in text.stdout and "does not fit" in text.stdout


def test_bench_seq2seq_both_backends_with_the_hf_peer(cli, tmp_path, monkeypatch):
    for name in ("mlx.core", "torch", "transformers", "peft", "matplotlib"):
        pytest.importorskip(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch: a busy 2-core machine stalls a 2-thread pool
    result = cli("bench", str(RECIPE), "--backends", "mlx,cuda", "--steps", "1", "--trials", "2", "--warmup", "1",
                 "--seq-len", "32", "--batch-size", "2", "--max-new-tokens", "4", "--set",
                 "data.max_target_length=16", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.stderr
    files = [Path(f) for f in json.loads(result.stdout)["files"]]
    assert all(f.is_file() for f in files) and {f.suffix for f in files} == {".json", ".png"}
    saved = json.loads(files[0].read_text())
    assert saved["environment"]["packages"]["mlx"] and "git" in saved["environment"]
    assert set(saved["recipe_sha256"]) == {"mlx", "cuda"} and saved["model"]["parameters"] == 328704
    by_backend = {c["backend"]: c for c in saved["configs"]}
    assert by_backend["mlx"]["peer"] is None  # no MLX seq2seq peer exists
    assert by_backend["cuda"]["peer"] == "hf" and "error" not in by_backend["cuda"]["hf"]
    for config in by_backend.values():
        ours = config["trmlx"]
        assert "error" not in ours, ours
        assert ours["trained_tokens_per_step"] == 2 * 16 and ours["trained_tokens_per_second"]["median"] > 0
        assert ours["mfu"]["median"] > 0 and ours["generation"]["tokens_per_second"]["median"] > 0
        assert abs(config["plan"]["train_error_pct"]) <= 20 and abs(config["plan"]["eval_error_pct"]) <= 20
    cuda = by_backend["cuda"]
    assert cuda["trmlx"]["setup"]["trainable_parameters"] == cuda["hf"]["setup"]["trainable_parameters"]
    assert cuda["ratios"]["speed"] > 0
