"""benchmarks/cuda_qlora.py end to end on the CPU with the tiny shape: both sides train, the result file has what a
GPU run will have. No speed is asserted (shared machines are noisy); only that the numbers exist and are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

for _name in ("torch", "transformers", "peft", "bitsandbytes", "matplotlib"):
    pytest.importorskip(_name, reason=f"the CUDA QLoRA benchmark needs {_name} (pip install 'trmlx[cuda]')")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cuda_qlora.py"


def test_tiny_shape_runs_both_sides(tmp_path):
    import torch

    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--seq-len", "32", "--batch-size", "2",
                           "--steps", "2", "--warmup", "1", "--trials", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "cuda_qlora" and last["shape"] == "tiny"

    device = "cpu" if not torch.cuda.is_available() else last["device"]
    files = sorted(p.name for p in tmp_path.iterdir())
    result_file = next(tmp_path.glob("cuda_qlora-*.json"))
    assert result_file.with_suffix(".png").is_file(), files
    record = json.loads(result_file.read_text())
    assert record["shape"] == "tiny" and record["device"]["name"] == device
    assert record["environment"]["packages"]["torch"] and record["matmul"]["peak_flops"] > 0
    assert record["model"]["parameters"] > 0
    if device == "cpu":
        assert "NOT a GPU result" in record["note"]

    [config] = record["configs"]
    assert (config["seq_len"], config["batch_size"]) == (32, 2)
    for side in ("trmlx", "hf"):
        r = config[side]
        assert "error" not in r, r
        assert r["trained_tokens_per_second"]["median"] > 0
        assert r["all_tokens_per_second"]["median"] > r["trained_tokens_per_second"]["median"]
        assert r["peak_memory_gb"] > 0 and r["mfu"]["median"] > 0  # no upper bound: CPU timings are noisy
        assert r["trained_tokens_per_step"] == 2 * 16  # batch 2 × the second half of 32 tokens
        assert len(r["loss"]) == 2 and all(v > 0 for v in r["loss"].values())
    # the two sides train the same thing: same trainable parameters, same LoRA
    assert config["trmlx"]["setup"]["trainable_parameters"] == config["hf"]["setup"]["trainable_parameters"]
    assert config["speed_ratio"] > 0 and config["memory_ratio"] > 0
    assert last["configs"][0]["speed_ratio"] == config["speed_ratio"]


def test_big_shape_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the 7b shape is allowed")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "7b", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "benchmarks/cuda_qlora.py: --shape 7b needs an NVIDIA GPU and none is visible; on the CPU only --shape tiny "
        "runs"]
    assert not list(tmp_path.iterdir())
