"""The CUDA backend (torch + peft + bitsandbytes) on this CPU: training parity with MLX, cross-backend adapters,
exact resume, 4-bit through bitsandbytes' CPU path, and GPU-only options refused clearly."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="the CUDA backend needs torch (pip install 'trmlx[cuda]')")
pytest.importorskip("peft", reason="the CUDA backend needs peft (pip install 'trmlx[cuda]')")

from tests.conftest import REPO  # noqa: E402
from trmlx import run as runner  # noqa: E402
from trmlx.errors import TrainingInterrupted, UserError  # noqa: E402
from trmlx.report import read_log  # noqa: E402

QUICKSTART = str(REPO / "recipes" / "quickstart.toml")
PARITY = ["train.steps=20", "train.log_every=1", "train.eval_every=10", "train.save_every=0", "train.batch_size=4"]


def losses(run_dir):
    return [(r["kind"], r["step"], r["loss"]) for r in read_log(run_dir / "metrics.jsonl")]


def train(tmp_path, name, backend, overrides=()):
    setup = runner.resolve_run(QUICKSTART, backend, list(overrides), str(tmp_path / name), None)
    return runner.train(setup, backend)


def test_first_20_losses_agree_across_backends(tmp_path):
    pytest.importorskip("mlx.core", reason="parity needs both backends")
    train(tmp_path, "mlx", "mlx", PARITY)
    train(tmp_path, "cuda", "cuda", PARITY)
    a, b = losses(tmp_path / "mlx"), losses(tmp_path / "cuda")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len([x for x in a if x[0] == "train"]) == 20
    for (_, step, ours), (_, _, theirs) in zip(a, b):
        assert abs(ours - theirs) / abs(ours) < 1e-3, step


def test_adapters_cross_backends_with_the_same_predictions(tmp_path, cli):
    pytest.importorskip("mlx.core")
    short = ["train.steps=8", "train.warmup_steps=1", "train.eval_every=0", "train.lr=1e-2"]
    train(tmp_path, "mlx", "mlx", short)
    train(tmp_path, "cuda", "cuda", short)
    for run in ("mlx", "cuda"):
        results = {}
        for backend in ("mlx", "cuda"):
            out = tmp_path / f"{run}-on-{backend}"
            result = cli("eval", str(tmp_path / run), "--backend", backend, "--max-samples", "6",
                         "--output", str(out), "--json")
            assert result.exit_code == 0, result.output
            predictions = [json.loads(line)["prediction"]
                           for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
            results[backend] = (json.loads(result.stdout)["metrics"], predictions)
        assert results["mlx"][1] == results["cuda"][1]  # greedy, fp32: the same text
        for key in ("bleu", "chrf"):
            assert results["mlx"][0][key] == pytest.approx(results["cuda"][0][key], abs=1e-6)
        assert results["mlx"][0]["loss"] == pytest.approx(results["cuda"][0]["loss"], rel=1e-4)


def test_resume_after_ctrl_c_is_exact(tmp_path):
    short = ["train.steps=6", "train.log_every=1", "train.save_every=2", "train.eval_every=0",
             "train.batch_size=4", "train.warmup_steps=2"]
    train(tmp_path, "a", "cuda", short)

    def ctrl_c(report, steps):
        if report.step == 3:
            raise KeyboardInterrupt

    setup = runner.resolve_run(QUICKSTART, "cuda", short, str(tmp_path / "b"), None)
    with pytest.raises(TrainingInterrupted) as stop:
        runner.train(setup, "cuda", on_report=ctrl_c)
    assert stop.value.checkpoint.endswith("step-0000003")
    runner.train(runner.resolve_run(None, "cuda", (), None, str(tmp_path / "b")), "cuda")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [(k, s) for k, s, _ in b] == [(k, s) for k, s, _ in a] == [("train", s) for s in range(1, 7)] + [
        ("eval", 6)]
    assert [x[2] for x in b] == pytest.approx([x[2] for x in a], rel=1e-5)


def test_4bit_nf4_trains_through_bitsandbytes_on_cpu(tmp_path):
    summary = train(tmp_path, "q4", "cuda", ["model.quantize_bits=4", "train.steps=2", "train.warmup_steps=0",
                                             "train.eval_every=0"])
    assert summary["final_train_loss"] > 0
    config = json.loads((tmp_path / "q4" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16


def test_4bit_generation_on_cpu_with_a_width_bitsandbytes_cannot_repack(tmp_path):
    """bitsandbytes' CPU inference kernels need input widths that are multiples of 64; a 352-wide MLP (down_proj)
    used to fail with a reshape error. Batched greedy output must equal one-at-a-time output."""
    pytest.importorskip("bitsandbytes")
    from trmlx.backend import GenerationSettings, get_backend
    from trmlx.evaluate import generate_batched
    from trmlx.recipe import load_recipe
    from trmlx.tiny.llama import build_tiny_llama, shipped_texts

    model = build_tiny_llama(tmp_path / "m", shipped_texts(REPO / "recipes" / "data" / "en_tr"), hidden_size=128,
                             intermediate_size=352, num_heads=4, num_kv_heads=4)
    backend = get_backend("cuda")
    loaded = backend.load(load_recipe(QUICKSTART, [f"model.path={json.dumps(str(model))}", "model.quantize_bits=4"],
                                      backend="cuda"))
    prompts, settings = [[5, 6, 7, 8, 9], [10, 11, 12]], GenerationSettings(max_new_tokens=4)
    batched = generate_batched(backend, loaded, prompts, settings, 2)
    assert batched == [generate_batched(backend, loaded, [p], settings, 1)[0] for p in prompts]
    assert all(len(row) == 4 for row in batched)


def test_gpu_only_optimizer_is_a_clear_error_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: paged_adamw_8bit is allowed")
    with pytest.raises(UserError, match="paged_adamw_8bit needs a CUDA GPU; none is visible"):
        train(tmp_path, "paged", "cuda", ["train.optimizer='paged_adamw_8bit'", "train.steps=1",
                                          "train.warmup_steps=0"])


def test_cuda_export_merges_into_a_plain_model(tmp_path, cli):
    from transformers import AutoModelForCausalLM

    train(tmp_path, "run", "cuda", ["train.steps=3", "train.warmup_steps=0", "train.eval_every=0", "train.lr=1e-2"])
    result = cli("export", str(tmp_path / "run"), str(tmp_path / "merged"), "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "lora" and report["merged_layers"] == 14  # 7 linears × 2 blocks
    from trmlx.backends.cuda.model import load
    from trmlx.recipe import load_recipe

    adapted = load(load_recipe(tmp_path / "run" / "recipe.toml", backend="cuda"), tmp_path / "run" / "adapter")
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        a, b = adapted.model(ids).logits, merged(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    again = cli("export", str(tmp_path / "run"), str(tmp_path / "merged"))
    assert again.exit_code == 2 and "output folder is not empty" in again.stderr


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_adapters_train_on_cuda_and_evaluate_the_same_on_mlx(tmp_path, cli, method):
    pytest.importorskip("mlx.core")
    train(tmp_path, "run", "cuda", [f"peft.method='{method}'", "train.lr=3e-2", "train.steps=4",
                                    "train.warmup_steps=1", "train.eval_every=0", "peft.num_virtual_tokens=4"])
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    outputs = {}
    for backend in ("cuda", "mlx"):
        result = cli("eval", str(tmp_path / "run"), "--backend", backend, "--max-samples", "5", "--output",
                     str(tmp_path / backend), "--json")
        assert result.exit_code == 0, result.output
        outputs[backend] = (json.loads(result.stdout)["metrics"]["loss"],
                            (tmp_path / backend / "predictions" / "test.jsonl").read_text())
    assert outputs["cuda"][0] == pytest.approx(outputs["mlx"][0], rel=1e-4)
    assert outputs["cuda"][1] == outputs["mlx"][1]  # batched greedy text, identical across backends
