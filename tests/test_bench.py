"""trmlx bench end to end on this CPU: both backends and both peers on a tiny configuration, the result files and
their provenance, and the clear refusal of a 7B shape without a GPU. No speed is asserted (shared machines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.toml"


def test_bench_both_backends_with_peers(cli, tmp_path, monkeypatch):
    for name in ("mlx.core", "mlx_lm", "torch", "transformers", "peft", "bitsandbytes", "matplotlib"):
        pytest.importorskip(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch: a busy 2-core machine stalls a 2-thread pool
    result = cli("bench", str(QUICKSTART), "--backends", "mlx,cuda", "--steps", "1", "--trials", "2", "--warmup",
                 "1", "--seq-len", "64", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(tmp_path),
                 "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    files = [Path(f) for f in record["files"]]
    assert all(f.is_file() for f in files) and {f.suffix for f in files} == {".json", ".png"}
    saved = json.loads(files[0].read_text())
    assert saved["environment"]["packages"]["mlx"] and "git" in saved["environment"]
    assert set(saved["recipe_sha256"]) == {"mlx", "cuda"} and saved["model"]["parameters"] > 0
    assert set(saved["matmul"]) == {"mlx", "cuda"} and all(m["peak_flops"] > 0 for m in saved["matmul"].values())
    by_backend = {c["backend"]: c for c in saved["configs"]}
    for backend, peer in (("mlx", "mlx-lm"), ("cuda", "hf")):
        config = by_backend[backend]
        assert (config["seq_len"], config["batch_size"]) == (64, 2)
        ours, theirs = config["trmlx"], config[peer]
        assert "error" not in ours and "error" not in theirs, (ours, theirs)
        assert ours["trained_tokens_per_second"]["median"] > 0 and len(ours["trained_tokens_per_second"]["trials"]) == 2
        assert ours["peak_memory_gb"] > 0 and ours["mfu"]["median"] > 0
        assert ours["generation"]["tokens_per_second"]["median"] > 0
        assert ours["setup"]["trainable_parameters"] == theirs["setup"]["trainable_parameters"]  # the same LoRA
        assert ours["setup"]["loss"] == "chunked, 128 target rows at a time"  # the default; no liger on a CPU
        assert config["ratios"]["speed"] > 0 and config["ratios"]["memory"] > 0
        assert abs(config["plan"]["train_error_pct"]) <= 20 and abs(config["plan"]["eval_error_pct"]) <= 20


def test_bench_refuses_a_7b_shape_on_a_cpu(cli, tmp_path):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    if mx.metal.is_available():
        pytest.skip("a GPU is visible to MLX")
    result = cli("bench", str(QUICKSTART), "--backends", "mlx", "--model-shape", "7b", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --model-shape 7b: 6.7B parameters need a GPU, and the mlx backend sees none on this machine; on a CPU "
        "bench --model-shape tiny (or a model under 1B parameters)"]
    assert not list(tmp_path.iterdir())
