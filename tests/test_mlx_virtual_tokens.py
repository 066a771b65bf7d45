"""Prompt and prefix tuning on MLX: PEFT's semantics and file format (same logits as torch+peft both ways, fp32 tiny
Llama), generation with the virtual tokens in the cache, and a short training run that learns and evaluates."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the parity check needs torch (pip install 'trmlx[cuda]')")
peft_lib = pytest.importorskip("peft", reason="the parity check needs peft (pip install 'trmlx[cuda]')")

from tests.conftest import REPO  # noqa: E402
from trmlx.errors import UserError  # noqa: E402
from trmlx.recipe.schema import PeftConfig  # noqa: E402

TINY = REPO / "recipes" / "models" / "tiny-llama-tr"
QUICKSTART = REPO / "recipes" / "quickstart.toml"
IDS = [[1, 45, 77, 300, 12, 9, 500, 33], [1, 8, 8, 120, 640, 2, 17, 71]]
N = 5
# (method, prefix_projection, prompt_init_text)
MLX_CASES = [("prompt", False, ""), ("prompt", False, "merhaba dünya"), ("prefix", False, ""), ("prefix", True, "")]
PEFT_CASES = {
    "prompt": lambda: peft_lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                  prompt_tuning_init="SAMPLE_VOCAB"),
    "prefix": lambda: peft_lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix-projection": lambda: peft_lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                             prefix_projection=True),
}


def mlx_base():
    from mlx_lm.utils import load_model

    return load_model(TINY)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def torch_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()


def real_token_logits(model, method: str) -> np.ndarray:
    """peft returns logits for the virtual tokens too (prompt tuning); keep the real tokens'."""
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.float().numpy()
    return logits[:, N:] if method == "prompt" else logits


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Adapters saved by peft itself (random init), with their logits on IDS."""
    out = {}
    for name, make in PEFT_CASES.items():
        torch.manual_seed(0)
        model = peft_lib.get_peft_model(torch_model(), make()).eval()
        path = tmp_path_factory.mktemp("peft") / name
        model.save_pretrained(str(path))
        out[name] = (path, real_token_logits(model, name.split("-")[0]), model)
    return out


@pytest.mark.parametrize("method,projection,text", MLX_CASES)
def test_mlx_adapter_loads_in_peft_with_same_logits(tmp_path, method, projection, text):
    from mlx.utils import tree_flatten

    from trmlx.backends.mlx import virtual_tokens

    mx.random.seed(0)
    model, config = mlx_base()
    base = np.array(model(mx.array(IDS)))
    wrapped = virtual_tokens.attach(model, config, PeftConfig(method=method, num_virtual_tokens=N,
                                                              prefix_projection=projection, prompt_init_text=text),
                                    tokenizer())
    trainable = {k for k, _ in tree_flatten(wrapped.trainable_parameters())}
    assert trainable == ({"prompt"} if method == "prompt" else {"prefix"} if not projection else
                         {"embedding", "transform.layers.0.weight", "transform.layers.0.bias",
                          "transform.layers.2.weight", "transform.layers.2.bias"})
    ours = np.array(wrapped(mx.array(IDS)))
    assert ours.shape == base.shape and relative_error(ours, base) > 1e-2  # the virtual tokens really act
    cached = np.array(wrapped(mx.array(IDS[:1]), cache=wrapped.make_cache()))  # mlx-lm's cache, prefix first
    assert relative_error(cached, ours[:1]) < 1e-5
    virtual_tokens.save(wrapped, tmp_path / "adapter", str(TINY))

    theirs = peft_lib.PeftModel.from_pretrained(torch_model(), str(tmp_path / "adapter")).eval()
    assert relative_error(real_token_logits(theirs, method), ours) < 1e-4
    if text:  # PEFT's TEXT init: the text's ids (with BOS) repeated to N, their word embeddings
        ids = tokenizer()(text)["input_ids"]
        expected = model.model.embed_tokens(mx.array((ids * N)[:N]))
        assert np.allclose(np.array(wrapped.prompt), np.array(expected))


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_adapter_loads_in_mlx_with_same_logits_and_same_files(peft_adapters, tmp_path, name):
    from safetensors.numpy import load_file

    from trmlx.backends.mlx import virtual_tokens

    path, theirs, _ = peft_adapters[name]
    model, config = mlx_base()
    wrapped = virtual_tokens.load(model, config, path)
    assert relative_error(np.array(wrapped(mx.array(IDS))), theirs) < 1e-4
    # Saving it again writes what peft wrote: same keys, shapes and values, same geometry in the config.
    virtual_tokens.save(wrapped, tmp_path / "again", str(TINY))
    peft_weights, our_weights = (load_file(str(p / "adapter_model.safetensors")) for p in (path, tmp_path / "again"))
    assert list(our_weights) == list(peft_weights) == ["prompt_embeddings"]
    assert np.allclose(our_weights["prompt_embeddings"], peft_weights["prompt_embeddings"])
    peft_config, our_config = (json.loads((p / "adapter_config.json").read_text()) for p in (path, tmp_path / "again"))
    assert set(our_config) <= set(peft_config)
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "encoder_hidden_size"):
        assert our_config.get(key) == peft_config.get(key), key


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_batched_generation_on_both_backends_matches_the_fixed_reference(peft_adapters, name):
    # The reference is a NumPy full-forward loop (tests/reference_llama.py), not a library's generate: with
    # transformers 5.24 + peft 0.21.2, peft's own generate diverges from its forward pass (the cache kwarg rename).
    from safetensors.numpy import load_file

    from tests.reference_llama import ReferenceLlama
    from trmlx.backend import GenerationSettings, LoadedModel
    from trmlx.backends.cuda.generate import generate_tokens as cuda_generate
    from trmlx.backends.mlx import virtual_tokens
    from trmlx.backends.mlx.generate import generate_tokens as mlx_generate

    path, _, theirs = peft_adapters[name]
    virtual = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
    prompts = [[1, 45, 77, 300, 12, 9, 500, 33], [1, 8], [1, 640, 17, 71, 99, 100]]
    expected = [ReferenceLlama(TINY).greedy(name, virtual, p, max_new_tokens=8, eos_id=2) for p in prompts]
    settings = GenerationSettings(max_new_tokens=8)
    model, config = mlx_base()
    on_mlx = LoadedModel(virtual_tokens.load(model, config, path), tokenizer(), {"config": config})
    assert mlx_generate(on_mlx, prompts, settings) == expected  # batched (left-padded)
    assert [mlx_generate(on_mlx, [p], settings)[0] for p in prompts] == expected
    on_cuda = LoadedModel(theirs, tokenizer(), {"dtype": "fp32"})
    assert cuda_generate(on_cuda, prompts, settings) == expected
    assert [cuda_generate(on_cuda, [p], settings)[0] for p in prompts] == expected


def test_cuda_streaming_and_sampling_of_a_virtual_token_model(peft_adapters):
    from trmlx.backend import GenerationSettings, LoadedModel
    from trmlx.backends.cuda.generate import generate_tokens, stream_tokens

    loaded = LoadedModel(peft_adapters["prefix"][2], tokenizer(), {"dtype": "fp32"})
    prompt, greedy = [1, 45, 77, 300], GenerationSettings(max_new_tokens=6)
    assert list(stream_tokens(loaded, prompt, greedy)) == generate_tokens(loaded, [prompt], greedy)[0]
    sampled = GenerationSettings(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    first, again = (generate_tokens(loaded, [prompt, prompt[:2]], sampled) for _ in range(2))
    assert first == again and first != generate_tokens(loaded, [prompt, prompt[:2]], greedy)


def test_finished_rows_leave_the_cache_but_the_prefix_stays():
    from trmlx.backends.mlx import virtual_tokens
    from trmlx.data.examples import left_pad

    mx.random.seed(1)
    model, config = mlx_base()
    wrapped = virtual_tokens.attach(model, config, PeftConfig(method="prefix", num_virtual_tokens=N), tokenizer())
    prompts = [[1, 45, 77, 300, 12], [1, 8], [1, 640, 2, 17]]
    ids, attention = left_pad(prompts, 0)
    cache = wrapped.make_batch_cache((attention.shape[1] - attention.sum(axis=1)).tolist())
    wrapped(mx.array(ids), cache=cache)
    for c in cache:
        c.filter([1, 2])  # paddings 3 and 1: one padding column is dropped, the prefix is kept
    assert cache[0]._idx == N + 4 and cache[0].left_padding.tolist() == [2, 0]
    logits = np.array(wrapped(mx.array([[5], [6]]), cache=cache)[:, -1])
    alone = [np.array(wrapped(mx.array([p + [t]]))[0, -1]) for p, t in ((prompts[1], 5), (prompts[2], 6))]
    assert relative_error(logits, np.stack(alone)) < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_training_learns_saves_a_peft_adapter_and_evaluates(cli, tmp_path, write, method):
    # With grad_checkpoint: mx.checkpoint keeps only array arguments' gradients; the virtual tokens must be one.
    from trmlx import run as runner
    from trmlx.report import read_log

    rows = [json.loads(line) for line in (REPO / "recipes/data/en_tr/train.jsonl").read_text().splitlines()[:4]]
    data = write("four.jsonl", rows)  # one batch, seen every step: the loss must fall
    setup = runner.resolve_run(str(QUICKSTART), "mlx",
                               [f"peft.method={method}", f"data.train='{data}'", f"data.valid='{data}'",
                                "train.steps=6", "train.batch_size=4", "train.lr=0.3", "train.warmup_steps=1",
                                "train.log_every=1", "train.eval_every=0", "peft.num_virtual_tokens=8",
                                "train.grad_checkpoint=true"],
                               str(tmp_path / "run"), None)
    runner.train(setup, "mlx")
    train = [r["loss"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 6 and train[-1] < train[0] - 0.05, train
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == (f"{method.upper()}_TUNING", 8)
    result = cli("eval", str(tmp_path / "run"), "--max-samples", "4", "--json", "--set", "eval.max_new_tokens=8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["loss"] > 0


def test_unsupported_family_and_mismatched_adapter_are_user_errors(peft_adapters):
    from trmlx.backends.mlx import virtual_tokens

    model, config = mlx_base()
    with pytest.raises(UserError, match="supports the llama, mistral, qwen2 model families.*'gpt2'"):
        virtual_tokens.attach(model, {**config, "model_type": "gpt2"}, PeftConfig(method="prefix"), tokenizer())
    with pytest.raises(UserError, match=r"prompt_embeddings has shape \(5, 128\), but this model needs \(5, 256\)"):
        virtual_tokens.load(model, {**config, "num_hidden_layers": 4}, peft_adapters["prefix"][0])
