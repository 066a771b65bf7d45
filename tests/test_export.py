"""`trmlx export`: a run's LoRA/DoRA adapter merged into the tiny Llama loads in transformers and mlx-lm with the
adapted model's logits (fp32), a 4-bit base exports dequantised, fp16 writes fp16, OUT_DIR is never overwritten."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the transformers check needs torch (pip install 'trmlx[cuda]')")
pytest.importorskip("transformers", reason="the transformers check needs transformers")

from tests.conftest import REPO  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.toml"
TINY = REPO / "recipes" / "models" / "tiny-llama-tr"
IDS = [[1, 45, 77, 300, 12, 9, 500, 33], [1, 8, 8, 120, 640, 2, 17, 71]]
RUNS = {"lora": (), "dora": ("peft.method=dora",), "qlora": ("model.quantize_bits=4",)}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def hf_logits(path):
    """Logits of an exported folder through transformers, and its loading report."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.float().numpy(), info


def make_run(root, name: str, extra: tuple[str, ...]):
    """A finished run (recipe.toml, environment.json, adapter/) with a non-trivial rank-4 adapter, and the logits
    of the adapted MLX model (quantised at load when the recipe says so) it must export to."""
    from mlx.utils import tree_flatten, tree_unflatten

    from trmlx.backends.mlx import create_backend
    from trmlx.backends.mlx.adapters import peft_config, save_adapter
    from trmlx.recipe import load_recipe, recipe_to_toml

    recipe = load_recipe(QUICKSTART, ("peft.rank=4", "peft.alpha=8", "peft.targets=all-linear", *extra), "mlx")
    loaded = create_backend().load(recipe)
    mx.random.seed(1)
    params = []
    for key, value in tree_flatten(loaded.model.trainable_parameters()):
        if key.endswith(("lora_a", "lora_b")):  # a fresh LoRA has B = 0 and would change nothing
            params.append((key, mx.random.normal(value.shape) * 0.2))
        elif key.endswith(".m"):  # DoRA's magnitude is trained too
            params.append((key, value * (1 + 0.1 * mx.random.normal(value.shape))))
    loaded.model.update(tree_unflatten(params))
    run = root / name
    run.mkdir()
    (run / "recipe.toml").write_text(recipe_to_toml(recipe))
    (run / "environment.json").write_text(json.dumps({"backend": "mlx"}))
    save_adapter(loaded.model, run / "adapter", peft_config(recipe.peft, loaded.model, recipe.model.path))
    return run, mlx_logits(loaded.model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root, name, extra) for name, extra in RUNS.items()}


@pytest.fixture(scope="module")
def base_logits():
    from mlx_lm.utils import load

    return mlx_logits(load(str(TINY))[0])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_fp32_matches_adapted_model_in_transformers_and_mlx(cli, runs, base_logits, tmp_path, method):
    from mlx_lm.utils import load

    from trmlx.backends.mlx.export import checkpoint_keys

    run, ours = runs[method]
    assert relative_error(ours, base_logits) > 1e-2  # the adapter really changes the output
    out = tmp_path / "merged"
    result = cli("export", str(run), str(out), "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["method"], report["rank"], report["alpha"], report["dtype"]) == (method, 4, 8.0, "fp32")
    assert report["merged_layers"] == 14 and not report["dequantized"] and report["dropped"] == []
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert not list(tmp_path.glob(".merged.tmp-*"))
    assert checkpoint_keys(out) == checkpoint_keys(TINY)  # mlx-lm's llama names are HF's names
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["model_type"] == "llama"

    theirs, info = hf_logits(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert relative_error(theirs, ours) < 1e-4
    model, tokenizer = load(str(out))
    assert relative_error(mlx_logits(model), ours) < 1e-4
    assert tokenizer.encode("merhaba dünya") == load(str(TINY))[1].encode("merhaba dünya")


def test_quantised_base_exports_dequantised(cli, runs, tmp_path):
    from mlx_lm.utils import load

    run, ours = runs["qlora"]
    out = tmp_path / "merged"
    result = cli("export", str(run), str(out), "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dequantized"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if k.endswith((".scales", ".biases"))]
    assert all(v.dtype == mx.float32 for v in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (1024, 64)
    theirs, _ = hf_logits(out)
    assert relative_error(theirs, ours) < 1e-3
    assert relative_error(mlx_logits(load(str(out))[0]), ours) < 1e-3


def test_fp16_export_writes_fp16_and_generation_config(cli, runs, tmp_path):
    """fp16 tensors and config; the base's generation_config.json travels along (a copy of the tiny model that
    has one, chosen with --set model.path=...)."""
    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                             "max_new_tokens": 7}))
    run, _ = runs["lora"]
    out = tmp_path / "nested" / "fp16"
    result = cli("export", str(run), str(out), "--dtype", "fp16", "--set", f"model.path={base}")
    assert result.exit_code == 0, result.output
    assert "fp16" in result.stdout
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_sharded_export_loads_in_transformers(runs, tmp_path):
    from trmlx.backends.mlx.export import export_model
    from trmlx.recipe import load_recipe

    run, ours = runs["lora"]
    out = tmp_path / "sharded"
    report = export_model(load_recipe(run / "recipe.toml", backend="mlx"), run / "adapter", out, "fp32",
                          shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and report["dtype"] == "fp32"
    theirs, info = hf_logits(out)
    assert not info["missing_keys"] and relative_error(theirs, ours) < 1e-4


def test_refuses_non_empty_output_and_missing_adapter(cli, runs, tmp_path):
    run, _ = runs["lora"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("export", str(run), str(out))
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    result = cli("export", str(QUICKSTART), str(tmp_path / "new"))
    assert result.exit_code == 2 and "--adapter" in result.stderr
    assert not (tmp_path / "new").exists()

    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    result = cli("export", str(run), str(tmp_path / "new"), "--adapter", str(prompt))
    assert result.exit_code == 2 and "PROMPT_TUNING adapter has no weights to merge" in result.stderr
    assert not (tmp_path / "new").exists()


def test_default_dtype_is_the_base_dtype():
    from trmlx.backends.mlx.export import hf_config
    from trmlx.export import default_dtype

    assert default_dtype({"torch_dtype": "bfloat16"}) == "bf16"
    assert default_dtype({"dtype": "float32"}) == "fp32"
    assert default_dtype({}) == "fp16"
    config = hf_config({"quantization": {"bits": 4}, "quantization_config": {"bits": 4}, "dtype": "bfloat16"}, "fp16")
    assert config == {"torch_dtype": "float16", "dtype": "float16"}
