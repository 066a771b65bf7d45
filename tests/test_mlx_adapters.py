"""PEFT-format adapters move between MLX and torch+peft: same weights → same logits (fp32, tiny Llama)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the parity check needs torch (pip install 'trmlx[cuda]')")
peft_lib = pytest.importorskip("peft", reason="the parity check needs peft (pip install 'trmlx[cuda]')")

from trmlx.errors import UserError  # noqa: E402
from trmlx.recipe.schema import PeftConfig  # noqa: E402
from trmlx.tiny.llama import build_tiny_llama  # noqa: E402

IDS = [[1, 45, 77, 300, 12, 9, 500, 33], [1, 8, 8, 120, 640, 2, 17, 71]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "llama"
    return build_tiny_llama(out, ["merhaba dünya", "hello world", "İstanbul'da ışık"], vocab_size=1024)


def mlx_model(path):
    from mlx_lm.utils import load

    model, _ = load(str(path))
    return model


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def torch_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomise_lora(model, seed: int = 0) -> None:
    """Fresh LoRA has B = 0 (no effect); give both factors values so the test can fail."""
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    params = [(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.trainable_parameters())
              if k.endswith(("lora_a", "lora_b"))]
    model.update(tree_unflatten(params))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mlx_adapter_loads_in_peft_with_same_logits(tiny_dir, tmp_path, method):
    from trmlx.backends.mlx.adapters import apply_lora, peft_config, save_adapter

    model = mlx_model(tiny_dir)
    base = mlx_logits(model)
    peft = PeftConfig(method=method, rank=4, alpha=8.0, dropout=0.0, targets="all-linear", layers=1)
    adapted = apply_lora(model, peft)
    assert adapted == [f"model.layers.1.{n}" for n in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                       "self_attn.v_proj")]
    randomise_lora(model)
    ours = mlx_logits(model)
    assert relative_error(ours, base) > 1e-2  # the adapter really changes the output
    save_adapter(model, tmp_path / "adapter", peft_config(peft, model, str(tiny_dir)))

    theirs = peft_lib.PeftModel.from_pretrained(torch_model(tiny_dir), str(tmp_path / "adapter")).eval()
    assert relative_error(torch_logits(theirs), ours) < 1e-4


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_in_mlx_with_same_logits(tiny_dir, tmp_path, use_dora):
    from trmlx.backends.mlx.adapters import load_adapter

    torch.manual_seed(0)
    config = peft_lib.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False, use_dora=use_dora, task_type="CAUSAL_LM")
    theirs = peft_lib.get_peft_model(torch_model(tiny_dir), config).eval()
    theirs.save_pretrained(str(tmp_path / "adapter"))
    model = mlx_model(tiny_dir)
    loaded = load_adapter(model, tmp_path / "adapter")
    assert (loaded.rank, loaded.alpha, loaded.method) == (4, 16.0, "dora" if use_dora else "lora")
    assert relative_error(mlx_logits(model), torch_logits(theirs)) < 1e-4


def test_unknown_target_names_the_linear_layers(tiny_dir):
    from trmlx.backends.mlx.adapters import apply_lora

    with pytest.raises(UserError) as err:
        apply_lora(mlx_model(tiny_dir), PeftConfig(targets=["q_proj", "wi"]))
    assert err.value.problems == ["peft.targets: 'wi' matches no linear layer of this model; its linear layers "
                                  "are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"]
    with pytest.raises(UserError, match="requested to adapt 5 layers but the model only has 2"):
        apply_lora(mlx_model(tiny_dir), PeftConfig(layers=5))
