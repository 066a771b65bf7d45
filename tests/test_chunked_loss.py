"""Chunked cross-entropy (train.loss_chunk_size): the head over target positions only, chunk by chunk, gives the
unchunked loss and gradients within 1e-5 relative in fp32, on both backends, with prompt and padding positions
masked; and the fused torch function's gradients (hidden, weight, bias) equal autograd's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trmlx.backend import get_backend
from trmlx.data import prepare_data
from trmlx.data.examples import collate, tokenize, with_loss_rows
from trmlx.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.toml"
CHUNK = 24  # not a divisor of the batch's target-token count: the last chunk is padded


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def quickstart(backend: str, overrides: tuple[str, ...] = ()):
    recipe = load_recipe(QUICKSTART, [f"train.loss_chunk_size={CHUNK}", "peft.dropout=0.0", *overrides],
                         backend=backend)
    loaded = get_backend(backend).load(recipe)
    examples, _ = tokenize(prepare_data(recipe).train[:6], recipe, loaded.tokenizer)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    assert (batch["mask"] == 0).any() and (batch["mask"] == 1).sum() > CHUNK  # prompts and padding are masked
    return loaded, batch


def randomised_trainable(model) -> list:
    """The (name, parameter) pairs a torch model trains, set to N(0, 0.05) (LoRA's B starts at zero, and so would
    A's gradient)."""
    import torch

    torch.manual_seed(1)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for _, p in trainable:
            p.normal_(0, 0.05)
    return trainable


def torch_loss_and_gradients(model, arrays: dict, trainable: list) -> tuple[float, float, dict[str, np.ndarray]]:
    """The CUDA backend's training loss on one batch, its target count and the trainable parameters' gradients."""
    from trmlx.backends.cuda.train import to_torch, token_loss

    model.zero_grad()
    loss, count = token_loss(model, to_torch(arrays))
    loss.backward()
    return loss.item(), count.item(), {n: p.grad.numpy().copy() for n, p in trainable}


def mlx_loss_and_gradients(model, arrays: dict) -> tuple[float, float, dict[str, np.ndarray]]:
    """The MLX backend's training loss on one batch, its target count and the trainable parameters' gradients."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from trmlx.backends.mlx.train import to_mx, token_loss

    model.train()
    (loss, count), grads = nn.value_and_grad(model, token_loss)(model, to_mx(arrays))
    return float(loss), float(count), {n: np.array(g) for n, g in tree_flatten(grads)}


def unchunked_and_chunked(backend: str, model, batch: dict) -> list[tuple[float, float, dict[str, np.ndarray]]]:
    """(loss, target count, gradients) of one batch unchunked, then chunked CHUNK rows at a time, with the trainable
    parameters randomised first (LoRA's B starts at zero, and so would A's gradient)."""
    both = (batch, with_loss_rows(batch, CHUNK))
    if backend == "mlx":
        import mlx.core as mx
        from mlx.utils import tree_map

        mx.random.seed(1)
        model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
        return [mlx_loss_and_gradients(model, arrays) for arrays in both]
    trainable = randomised_trainable(model)
    return [torch_loss_and_gradients(model, arrays, trainable) for arrays in both]


def test_with_loss_rows_keeps_exactly_the_target_positions():
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=np.float32)
    batch = with_loss_rows({"mask": mask}, 4)
    assert batch["loss_rows"].tolist() == [[2, 3, 6, 7], [8, 9, 9, 9]]  # padded with the last position
    assert batch["loss_weights"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert with_loss_rows({"mask": mask}, 1000)["loss_rows"].shape == (1, 64)  # small batches: one 64-row chunk
    assert with_loss_rows({"mask": mask}, 0) == {"mask": mask}


@pytest.mark.parametrize("bits", [0, 4])
def test_mlx_chunked_loss_and_gradients_equal_the_unchunked(bits):
    pytest.importorskip("mlx.core")
    loaded, batch = quickstart("mlx", (f"model.quantize_bits={bits}",))
    assert loaded.handle["loss_chunk"] == CHUNK
    (full, count, full_grads), (chunked, chunked_count, chunked_grads) = unchunked_and_chunked("mlx", loaded.model,
                                                                                                 batch)
    assert count == chunked_count == batch["mask"].sum()
    assert abs(chunked / full - 1) < 1e-5
    assert full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():
        assert relative(chunked_grads[name], grad) < 1e-5, name


def test_torch_chunked_loss_and_gradients_equal_the_unchunked():
    pytest.importorskip("peft")
    loaded, batch = quickstart("cuda")
    assert loaded.handle["loss_chunk"] == CHUNK
    (full, count, full_grads), (chunked, chunked_count, chunked_grads) = unchunked_and_chunked("cuda", loaded.model,
                                                                                                 batch)
    assert count == chunked_count and abs(chunked / full - 1) < 1e-5
    for name, grad in full_grads.items():
        assert relative(chunked_grads[name], grad) < 1e-5, name


def test_torch_fused_function_gradients_equal_autograd_for_a_trained_head():
    """Full fine-tuning trains the head too: its weight and bias gradients come out of the same chunks."""
    import torch

    from trmlx.backends.cuda.loss import _LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets, weights = torch.randint(0, 50, (37,)), (torch.rand(37) > 0.3).double()
    reference = (torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                                   reduction="none") * weights).sum()
    expected = torch.autograd.grad(reference * 3.0, (hidden, weight, bias))
    fused = _LinearCrossEntropy.apply(hidden, weight, bias, targets, weights, 8)
    got = torch.autograd.grad(fused * 3.0, (hidden, weight, bias))
    assert abs(fused.item() / reference.item() - 1) < 1e-12
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)


def test_on_a_gpu_with_liger_installed_padding_rows_become_its_ignored_targets(monkeypatch):
    """Where liger-kernel runs (CUDA), its fused linear cross-entropy takes the chunked rows: padding rows (weight
    0) must reach it as ignore_index targets, so its sum equals ours. A stand-in with liger's signature and
    semantics (plain torch: CI has no GPU) checks that mapping, for the loss and the LoRA gradients."""
    pytest.importorskip("peft")
    import torch

    import trmlx.backends.cuda.loss as cuda_loss

    def liger_semantics(input, weight, target, bias=None, ignore_index=-100, reduction="mean"):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(input, weight, bias).float(), target,
                                                 ignore_index=ignore_index, reduction=reduction)

    real_gate = cuda_loss.liger_loss
    assert real_gate(torch.zeros(2, 2)) is None  # a CPU tensor: always our chunked function
    loaded, batch = quickstart("cuda")
    model, arrays = loaded.model, with_loss_rows(batch, CHUNK)
    assert (arrays["loss_weights"] == 0).any()  # the last chunk is padded
    trainable = randomised_trainable(model)
    results = []
    for fused in (None, liger_semantics):
        monkeypatch.setattr(cuda_loss, "liger_loss", lambda hidden, f=fused: f)
        results.append(torch_loss_and_gradients(model, arrays, trainable))
    (ours, _, our_grads), (liger, _, liger_grads) = results
    assert abs(liger / ours - 1) < 1e-6
    for name, grad in our_grads.items():
        assert relative(liger_grads[name], grad) < 1e-5, name


def test_models_whose_head_cannot_be_split_keep_the_unchunked_loss():
    pytest.importorskip("mlx.core")
    loaded, _ = quickstart("mlx", ('peft.method="prompt"',))
    assert loaded.handle["loss_chunk"] == 0


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_the_planner_counts_one_chunk_of_logits(backend):
    """At Qwen2.5-7B's width and vocabulary, 4,096 target tokens in fp32 (as benchmarks/loss_chunking.py measures),
    the planned loss layer is one chunk's logits plus the target rows' hidden states, a fraction of the unchunked
    term (measured: 1/6.5 on MLX, 1/31 on torch); families that cannot chunk keep the full term."""
    from trmlx.plan.base import make_target
    from trmlx.plan.causal import CALIBRATION, ModelShape, plan_memory
    from trmlx.plan.config import PRESETS

    def logits_term(chunk: int, model_type: str = "qwen2") -> float:
        recipe = load_recipe(QUICKSTART, [f"train.loss_chunk_size={chunk}", 'model.dtype="fp32"'], backend=backend)
        shape = ModelShape.from_config({**PRESETS["qwen2.5-7b"], "model_type": model_type})
        plan = plan_memory(recipe, backend, shape, make_target(recipe, backend, shape, "cpu"), batch_size=1,
                           seq_len=4097, target_tokens=4096)
        return next(t.bytes for t in plan.terms if t.name == "logits_loss")

    unchunked, chunked = logits_term(0), logits_term(128)
    coef = CALIBRATION["mlx" if backend == "mlx" else "torch"]["chunk_fp32"]
    assert chunked == pytest.approx(128 * 152064 * 4 * coef + 2 * 4096 * 3584 * 4)
    assert chunked <= unchunked / (5 if backend == "mlx" else 20)
    assert logits_term(128, "gemma2") == unchunked  # a soft-capped head is not split off
