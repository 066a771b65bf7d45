"""Packed batches (data.packing): rows of several examples with block-diagonal causal attention give each example
exactly its unpacked loss (1e-5) and the same gradients, on both backends; the packing itself is deterministic and
fills rows best-fit; packed training resumes exactly; recipes and models that cannot pack exactly are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trmlx.backend import get_backend
from trmlx.data import prepare_data
from trmlx.data.examples import Example, collate, tokenize, with_loss_rows
from trmlx.data.packing import TrainBatches, collate_rows, pack_rows
from trmlx.errors import UserError
from trmlx.loop import require_packable
from trmlx.recipe import load_recipe
from tests.test_damaged_runs import BACKENDS, SHORT, _at_report, records, resume, start
from trmlx import run as runner
from trmlx.errors import TrainingInterrupted

PACKED = [*SHORT, "data.packing=true", "train.batch_size=2"]  # rows of 128 positions, two examples each

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.toml"


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_pack_rows_is_best_fit_decreasing_and_deterministic():
    positions = [5, 9, 3, 4, 2, 7]
    rows = pack_rows(positions, 10)
    # 9 opens row 0, 7 row 1, 5 row 2; 4 fits best into row 2 (1 left), 3 into row 1 (0 left), 2 into row 3.
    assert rows == [(1,), (5, 2), (0, 3), (4,)]
    assert all(sum(positions[i] for i in row) <= 10 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(positions)))
    assert pack_rows(positions, 10) == rows
    with pytest.raises(ValueError, match="example 1 fills 9 positions, more than the row width 8"):
        pack_rows(positions, 8)


def test_packed_row_holds_each_example_shifted_on_its_own_with_a_block_diagonal_mask():
    a = Example((1, 2, 3, 4), prompt_len=2)
    b = Example((5, 6, 7), prompt_len=1)
    row = collate_rows([[a, b]], width=8, pad_id=0)
    assert row["inputs"].tolist() == [[1, 2, 3, 5, 6, 0, 0, 0]]
    assert row["targets"].tolist() == [[2, 3, 4, 6, 7, 0, 0, 0]]  # a's last input predicts a's EOS, not b's start
    assert row["mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]
    segment = [1, 1, 1, 2, 2, 0, 0, 0]
    expected = [[segment[i] == segment[j] and j <= i for j in range(8)] for i in range(8)]
    assert row["attend"].shape == (1, 1, 8, 8) and row["attend"][0, 0].tolist() == expected


def packed_and_unpacked(backend: str):
    """The quickstart model with random LoRA B, six training examples as packed rows and one at a time."""
    recipe = load_recipe(QUICKSTART, ["peft.dropout=0.0", "data.packing=true", "train.loss_chunk_size=24"],
                         backend=backend)
    loaded = get_backend(backend).load(recipe)
    examples, _ = tokenize(prepare_data(recipe).train[:6], recipe, loaded.tokenizer)
    data = TrainBatches(examples, loaded.tokenizer.pad_token_id, None, 24, True, 128)
    assert len(data.rows) < len(examples) and all(len(r) >= 1 for r in data.rows)
    return loaded, examples, data


def per_example_masks(data: TrainBatches, batch: dict) -> list[tuple[int, dict]]:
    """(example index, the packed batch with the loss on that example's positions only) for every example."""
    out, pad = [], data.pad_id
    for r, row in enumerate(data.rows):
        start = 0
        for i in row:
            length = len(data.examples[i].input_ids) - 1
            mask = np.zeros_like(batch["mask"])
            mask[r, start:start + length] = batch["mask"][r, start:start + length]
            out.append((i, with_loss_rows({**batch, "mask": mask}, data.loss_chunk)))
            start += length
    return out


def test_mlx_packed_losses_and_gradients_equal_the_unpacked():
    pytest.importorskip("mlx.core")
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from trmlx.backends.mlx.train import to_mx, token_loss

    loaded, examples, data = packed_and_unpacked("mlx")
    model = loaded.model
    mx.random.seed(1)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    packed = data.collate(list(range(len(data.rows))))
    for i, batch in per_example_masks(data, packed):
        alone = with_loss_rows(collate([examples[i]], data.pad_id), 24)
        (loss, count), (ref, ref_count) = token_loss(model, to_mx(batch)), token_loss(model, to_mx(alone))
        assert float(count) == float(ref_count) > 0
        assert abs(float(loss) / float(ref) - 1) < 1e-5, i
    grad_fn = nn.value_and_grad(model, token_loss)
    (loss, _), grads = grad_fn(model, to_mx(packed))
    (ref, _), ref_grads = grad_fn(model, to_mx(with_loss_rows(collate(examples, data.pad_id), 24)))
    assert abs(float(loss) / float(ref) - 1) < 1e-5
    ref_flat = dict(tree_flatten(ref_grads))
    for name, grad in tree_flatten(grads):
        assert relative(np.array(grad), np.array(ref_flat[name])) < 1e-5, name


def test_torch_packed_losses_and_gradients_equal_the_unpacked():
    pytest.importorskip("peft")
    import torch

    from trmlx.backends.cuda.train import to_torch, token_loss

    loaded, examples, data = packed_and_unpacked("cuda")
    model = loaded.model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    packed = data.collate(list(range(len(data.rows))))
    with torch.no_grad():
        for i, batch in per_example_masks(data, packed):
            alone = with_loss_rows(collate([examples[i]], data.pad_id), 24)
            (loss, count), (ref, ref_count) = token_loss(model, to_torch(batch)), token_loss(model, to_torch(alone))
            assert float(count) == float(ref_count) > 0
            assert abs(float(loss) / float(ref) - 1) < 1e-5, i

    def gradients(batch: dict) -> tuple[float, dict[str, np.ndarray]]:
        model.zero_grad()
        loss, _ = token_loss(model, to_torch(batch))
        loss.backward()
        return float(loss.detach()), {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = gradients(packed)
    ref, ref_grads = gradients(with_loss_rows(collate(examples, data.pad_id), 24))
    assert abs(loss / ref - 1) < 1e-5
    for name, grad in grads.items():
        assert relative(grad, ref_grads[name]) < 1e-5, name


def test_packing_refuses_what_it_cannot_keep_exact():
    recipe = load_recipe(QUICKSTART, ["data.packing=true"])
    with pytest.raises(UserError, match=r"^data.packing: model type 'gpt2' cannot be packed exactly; packing "
                                        r"supports llama, mistral, qwen2, qwen3 \(rotary positions\); set "
                                        r"data.packing = false$"):
        require_packable(recipe, {"model_type": "gpt2"}, head_splits=True)
    with pytest.raises(UserError, match=r"sliding window \(64 tokens\) is narrower than a packed row \(128\)"):
        require_packable(recipe, {"model_type": "mistral", "sliding_window": 64}, head_splits=True)
    require_packable(recipe, {"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": False}, True)
    require_packable(load_recipe(QUICKSTART), {"model_type": "gpt2"}, head_splits=False)  # packing off: no check


@pytest.mark.parametrize("override, message", [
    ("peft.method=\"prompt\"", "data.packing: prompt tuning puts its virtual tokens before a whole row, which "
                               "packed examples would share; use lora, dora or full, or set data.packing = false"),
])
def test_recipes_that_cannot_pack_are_refused_by_check(cli, override, message):
    result = cli("check", str(QUICKSTART), "--set", "data.packing=true", "--set", override)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_seq2seq_recipe_cannot_pack(cli):
    result = cli("check", str(REPO / "recipes" / "seq2seq_quickstart.toml"), "--set", "data.packing=true")
    assert result.exit_code == 2
    assert ("data.packing: packs causal examples; a seq2seq recipe trains unpacked (set data.packing = false)"
            in result.stderr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_training_resumes_exactly(tmp_path, straight_packed, backend):
    """Ctrl-C in the consumer at step 4's report, then --resume: the packed run's record equals the uninterrupted
    one, every loss and validation bit for bit, and so does the adapter."""
    with pytest.raises(TrainingInterrupted):
        runner.train(start(tmp_path, "b", backend, PACKED), backend, on_report=_at_report(4))
    resume(tmp_path / "b", backend)
    expected = straight_packed(backend)
    assert records(tmp_path / "b") == records(expected)
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "b" / weights).read_bytes() == (expected / weights).read_bytes()


@pytest.fixture(scope="module")
def straight_packed(tmp_path_factory):
    done = {}

    def get(backend: str):
        if backend not in done:
            out = tmp_path_factory.mktemp(f"packed-{backend}")
            runner.train(start(out, "run", backend, PACKED), backend)
            done[backend] = out / "run"
        return done[backend]

    return get


def test_batch_layout_counts_padding_both_ways():
    from trmlx.data.packing import batch_layout

    examples = [Example(tuple(range(1, n + 1)), prompt_len=1) for n in (5, 9, 3)]  # 4, 8, 2 positions
    # bucketed: [3, 5] padded to 8 positions each (rounded to 8), [9] to 8: 24 positions for 14 real
    # packed into rows of 8: [9], [5 + 3]: 16 positions
    assert batch_layout(examples, batch_size=2, max_length=9) == {
        "bucketed": {"batches": 2, "padding": round(1 - 14 / 24, 4)},
        "packed": {"batches": 1, "rows": 2, "width": 8, "padding": round(1 - 14 / 16, 4)}}


def test_check_shows_both_batch_layouts(cli):
    result = cli("check", str(QUICKSTART), "--set", "data.packing=true")
    assert result.exit_code == 0, result.stderr
    assert ("train batches of 8: bucketed 34 a pass, 7% padding; packed 17 of 128-position rows, 5% padding "
            "(in use)") in result.stdout


def test_packed_training_gives_the_same_losses_on_both_backends(tmp_path):
    """Two packed steps with gradient checkpointing on, dropout off: the same losses on MLX and torch."""
    for backend in ("mlx", "cuda"):
        pytest.importorskip("mlx.core" if backend == "mlx" else "peft")
    flags = ["data.packing=true", "train.grad_checkpoint=true", "train.steps=2", "train.warmup_steps=0",
             "train.eval_every=0", "train.save_every=0", "train.log_every=1", "peft.dropout=0.0"]
    losses = {}
    for backend in ("mlx", "cuda"):
        runner.train(start(tmp_path, backend, backend, flags), backend)
        losses[backend] = [r["loss"] for r in records(tmp_path / backend) if r["kind"] == "train"]
    assert len(losses["mlx"]) == 2
    for ours, theirs in zip(losses["mlx"], losses["cuda"]):
        assert abs(ours / theirs - 1) < 1e-5
