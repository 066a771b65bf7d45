"""mlx-lm's adapter format both ways: adapters made by mlx-lm itself (its LoRALinear/DoRALinear, random non-zero
weights, saved as mlx_lm.lora saves them) generate the same greedy text through trmlx on MLX and on the CUDA backend
(CPU) as through mlx-lm's own `load(adapter_path=...)`; `trmlx export --format mlx-lm` writes a run's adapter so that
mlx-lm reproduces trmlx's text; bad mlx-lm folders are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx-lm adapters are made with mlx-lm (pip install 'trmlx[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm adapters are made with mlx-lm (pip install 'trmlx[mlx]')")

from tests.conftest import REPO  # noqa: E402
from trmlx import mlxlm  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.toml"
TINY = REPO / "recipes" / "models" / "tiny-llama-tr"
PROMPT = "English: The cat sat on the mat.\nTurkish: "
IDS = [[1, 45, 77, 300, 12, 9, 500, 33], [1, 8, 8, 120, 640, 2, 17, 71]]
# lora: mlx-lm's defaults (every linear of every block); dora: some modules of the last block only.
KINDS = {"lora": (-1, None), "dora": (1, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])}


def make_mlxlm_adapter(folder, kind: str):
    """An adapter built and saved by mlx-lm's own code (linear_to_lora_layers; the trainer's save), with random
    A, B and DoRA magnitudes so that it changes the output."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load, save_config

    num_layers, keys = KINDS[kind]
    params = {"rank": 4, "scale": 6.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    model, _ = load(str(TINY))
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    mx.random.seed(3)
    trained = []
    for key, value in tree_flatten(model.trainable_parameters()):
        if key.endswith(("lora_a", "lora_b")):
            trained.append((key, mx.random.normal(value.shape) * 0.3))
        else:  # DoRA's magnitude m
            trained.append((key, value * (1 + 0.2 * mx.random.normal(value.shape))))
    model.update(tree_unflatten(trained))
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params, "model": str(TINY),
                 "iters": 10, "learning_rate": 1e-5}, folder / "adapter_config.json")
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlxlm")
    return {kind: make_mlxlm_adapter(root / kind, kind) for kind in KINDS}


def mlx_lm_text(adapter_path, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    """mlx-lm's own greedy generation (stream_generate, what mlx_lm.generate runs) with the adapter it loads itself;
    its tokens decoded in one piece (mlx-lm's streaming detokenizer drops a leading space, trmlx keeps it)."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(TINY), adapter_path=str(adapter_path) if adapter_path else None)
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
              if r.finish_reason != "stop"]
    return tokenizer._tokenizer.decode(tokens)


def mlx_lm_logits(adapter_path) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(str(TINY), adapter_path=str(adapter_path))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def trmlx_text(cli, *target: str, backend: str = "mlx", max_tokens: int = 12) -> str:
    result = cli("generate", *target, "-p", PROMPT, "--raw", "--json", "--backend", backend,
                 "--max-tokens", str(max_tokens))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


def test_conversion_rescales_and_transposes(adapters, tmp_path):
    """PEFT form: lora_alpha = scale * r, A/B transposed, the blocks and modules mlx-lm adapted; back again the
    tensors are the same."""
    from safetensors.numpy import load_file

    for kind, (_, keys) in KINDS.items():
        peft = mlxlm.mlxlm_to_peft(adapters[kind], tmp_path / kind)
        assert (peft["peft_type"], peft["r"], peft["lora_alpha"], peft["use_dora"]) == ("LORA", 4, 24.0,
                                                                                       kind == "dora")
        assert peft["target_modules"] == sorted(keys or ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj"])
        assert peft["layers_to_transform"] == ([1] if kind == "dora" else [0, 1])
        theirs = mlxlm.read_tensors(adapters[kind] / "adapters.safetensors")
        ours = load_file(str(tmp_path / kind / "adapter_model.safetensors"))
        stem = "model.layers.1.self_attn.q_proj"
        assert np.array_equal(ours[f"base_model.model.{stem}.lora_A.weight"], theirs[f"{stem}.lora_a"].T)
        assert np.array_equal(ours[f"base_model.model.{stem}.lora_B.weight"], theirs[f"{stem}.lora_b"].T)
        assert (f"base_model.model.{stem}.lora_magnitude_vector" in ours) == (kind == "dora")
        back = mlxlm.peft_to_mlxlm(tmp_path / kind, tmp_path / f"{kind}-back", str(TINY), 2)
        assert back["num_layers"] == KINDS[kind][0] and back["lora_parameters"]["scale"] == 6.0
        again = mlxlm.read_tensors(tmp_path / f"{kind}-back" / "adapters.safetensors")
        assert again.keys() == theirs.keys() and all(np.array_equal(again[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_with_an_mlxlm_adapter_matches_mlx_lm(cli, adapters, kind):
    expected = mlx_lm_text(adapters[kind])
    assert expected != mlx_lm_text(None)  # the adapter changes the text
    assert trmlx_text(cli, str(QUICKSTART), "--adapter", str(adapters[kind])) == expected


@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_backend_reads_mlxlm_adapters(cli, adapters, kind):
    torch = pytest.importorskip("torch", reason="the CUDA backend needs torch")
    pytest.importorskip("peft", reason="the CUDA backend needs peft")
    from trmlx.backend import get_backend
    from trmlx.recipe import load_recipe

    assert trmlx_text(cli, str(QUICKSTART), "--adapter", str(adapters[kind]), backend="cuda") == \
        mlx_lm_text(adapters[kind])
    loaded = get_backend("cuda").load(load_recipe(QUICKSTART, backend="cuda"), mlxlm.as_peft_adapter(adapters[kind]))
    with torch.no_grad():
        logits = loaded.model.eval()(torch.tensor(IDS)).logits.float().numpy()
    reference = mlx_lm_logits(adapters[kind])
    assert np.abs(logits - reference).max() / np.abs(reference).max() < 1e-4


def test_eval_with_an_mlxlm_adapter_is_the_same_on_both_backends(cli, adapters, tmp_path):
    pytest.importorskip("peft", reason="the CUDA backend needs peft")
    results = {}
    for backend in ("mlx", "cuda"):
        out = tmp_path / backend
        result = cli("eval", str(QUICKSTART), "--adapter", str(adapters["lora"]), "--backend", backend,
                     "--max-samples", "4", "--output", str(out), "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["adapter"] == str(adapters["lora"])  # the user's folder, not the converted copy
        results[backend] = (report["metrics"]["loss"], (out / "predictions" / "test.jsonl").read_text())
    assert results["mlx"][1] == results["cuda"][1]
    assert results["mlx"][0] == pytest.approx(results["cuda"][0], rel=1e-4)


def test_merged_export_of_an_mlxlm_adapter_has_its_logits(cli, adapters, tmp_path):
    from mlx_lm import load

    out = tmp_path / "merged"
    result = cli("export", str(QUICKSTART), str(out), "--adapter", str(adapters["dora"]), "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == str(adapters["dora"])
    merged = np.array(load(str(out))[0](mx.array(IDS)).astype(mx.float32))
    reference = mlx_lm_logits(adapters["dora"])
    assert np.abs(merged - reference).max() / np.abs(reference).max() < 1e-4


@pytest.mark.parametrize("method,extra", [
    ("lora", ()),
    ("dora", ("peft.method=dora", "peft.layers=1", 'peft.targets=["q_proj", "down_proj"]')),
])
def test_export_mlxlm_round_trip(cli, tmp_path, method, extra):
    """A trmlx run exported with --format mlx-lm: mlx-lm loads it and writes the text trmlx generates."""
    pytest.importorskip("torch", reason="the run fixture of test_export needs torch")
    from tests.test_export import make_run

    run, _ = make_run(tmp_path, method, extra)
    out = tmp_path / "mlxlm"
    result = cli("export", str(run), str(out), "--format", "mlx-lm", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["format"], report["method"], report["rank"], report["scale"]) == ("mlx-lm", method, 4, 2.0)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == (1 if method == "dora" else -1)
    if method == "dora":
        assert config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj"]
    expected = trmlx_text(cli, str(run))
    assert expected != trmlx_text(cli, str(run), "--no-adapter")
    assert mlx_lm_text(out) == expected


def test_bad_mlxlm_folders_are_one_line_errors(cli, adapters, tmp_path):
    def refused(folder, *command: str) -> str:
        result = cli(*(command or ("generate", str(QUICKSTART), "-p", "x", "--adapter")), str(folder))
        assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
        return result.stderr

    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2,
                                                          "lora_parameters": None}))
    (full / "adapters.safetensors").write_bytes((adapters["lora"] / "adapters.safetensors").read_bytes())
    assert "fine_tune_type 'full' is an mlx-lm full fine-tune" in refused(full)

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((adapters["lora"] / "adapter_config.json").read_text())
    assert f"{missing}: no adapters.safetensors beside the mlx-lm adapter_config.json" in refused(missing)

    no_scale = tmp_path / "no_scale"
    no_scale.mkdir()
    (no_scale / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                              "lora_parameters": {"rank": 4, "alpha": 8}}))
    assert "lora_parameters: scale must be a positive number, got None" in refused(no_scale)

    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    assert "a PROMPT_TUNING adapter has no mlx-lm counterpart" in refused(
        prompt, "export", str(QUICKSTART), str(tmp_path / "out"), "--format", "mlx-lm", "--adapter")
    assert not (tmp_path / "out").exists()
