"""MLX embedding training: MultipleNegativesRankingLoss (in-batch + hard negatives, configurable scale, optional
Matryoshka dimensions and a GradCache variant for large batches) on the MLX BERT / XLM-R encoders, full or LoRA.

Examples, negatives, batch order, the LR curve and the report/checkpoint layout come from the core
(trmlx.embedding, trmlx.loop); this file turns texts into arrays, gradients and updates, and writes a folder that
plain `SentenceTransformer(path)` loads (LoRA merged into the weights).

Loss per query i, as sentence-transformers computes it: with d = [positives of the batch; all its negatives],
    loss_i = logsumexp_j(scale · cos(q_i, d_j)) − scale · cos(q_i, d_i)
summed over the queries of an optimizer step and divided once by their count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from trmlx.embedding.batches import QueryWindow, UniqueBatchCursor, steps_for, unique_text_batches
from trmlx.embedding.examples import EmbeddingExample
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.recipe.checks import model_path
from trmlx.loop import (Checkpoints, Position, Schedule, diverged, due_records, interrupts_deferred,
                        require_examples, rewind, step_records, step_seed)
from trmlx.recipe.schema import PeftConfig, Recipe
from trmlx.report import StepReport
from trmlx.rundir import RunDir, atomic_write
from trmlx.schedule import learning_rate

from trmlx.backends.mlx.encoder import SentenceEncoder, load_sentence_encoder, resolve_path

DTYPES = {"auto": mx.float32, "fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


@dataclass
class MLXEmbedder:
    """A SentenceEncoder with the trainable state of a run (LoRA config when adapted)."""

    encoder: SentenceEncoder
    peft: PeftConfig | None
    dtype: str

    def limit(self, max_length: int) -> int:
        return min(max_length, self.encoder.model.config.max_tokens)

    def encode(self, texts: Sequence[str], max_length: int, batch_size: int = 32) -> np.ndarray:
        """float32 embeddings in eval mode (no dropout), whatever mode training left the model in."""
        model = self.encoder.model
        was_training = model.training
        model.eval()
        try:
            if not texts:
                return np.zeros((0, self.encoder.dimension), np.float32)
            return self.encoder.encode(list(texts), batch_size=batch_size, max_length=self.limit(max_length))
        finally:
            model.train(was_training)


def device_name() -> str:
    from trmlx.backends.mlx.device import describe_device

    return describe_device()["name"]


def load(recipe: Recipe, path: str | Path | None = None, train: bool = False) -> MLXEmbedder:
    """The recipe's base model (pooling per embedding.pooling) or a saved model folder (its own pooling); with
    train=True, LoRA/DoRA attached (A from the core's seeded init, as on CUDA) or every weight trainable."""
    from trmlx.backends.mlx.adapters import apply_lora

    from trmlx.models import check_model_folder

    emb, base = recipe.embedding, path is None  # the base follows the recipe; a saved folder is what it says
    if base:
        check_model_folder(model_path(recipe), recipe.task)  # a bad local folder is one line, not a traceback
    encoder = load_sentence_encoder(path or model_path(recipe), dtype=DTYPES[recipe.model.dtype],
                                    pooling=emb.pooling if base and emb.pooling != "auto" else None,
                                    normalize=emb.normalize if base else None)
    peft = None
    if train:
        if recipe.peft.method in ("lora", "dora"):
            apply_lora(encoder.model, recipe.peft, seed=recipe.train.seed)
            peft = recipe.peft
        elif recipe.peft.method == "full":
            encoder.model.unfreeze()
        else:
            raise UserError(f"peft.method: {recipe.peft.method!r} does not apply to embedding models; use lora, "
                            "dora or full")
    return MLXEmbedder(encoder, peft, "fp32" if recipe.model.dtype == "auto" else recipe.model.dtype)


# ------------------------------------------------------------------------------------------------------- loss


def mnrl_sum(queries: mx.array, docs: mx.array, scale: float) -> mx.array:
    """Summed MNRL over queries; docs[:n] are the queries' positives, the rest in-batch hard negatives."""

    def unit(x: mx.array) -> mx.array:  # torch.nn.functional.normalize, as sentence-transformers' cos_sim
        x = x.astype(mx.float32)
        return x / mx.maximum(mx.sqrt((x * x).sum(axis=-1, keepdims=True)), 1e-12)

    scores = scale * (unit(queries) @ unit(docs).T)
    n = queries.shape[0]
    return (mx.logsumexp(scores, axis=1) - scores[mx.arange(n), mx.arange(n)]).sum()


def contrastive_sum(queries: mx.array, docs: mx.array, recipe: Recipe) -> mx.array:
    """MNRL, or MatryoshkaLoss's weight-1 sum of MNRL over the leading dimensions."""
    emb = recipe.embedding
    if not emb.matryoshka_dims:
        return mnrl_sum(queries, docs, emb.scale)
    if max(emb.matryoshka_dims) > queries.shape[-1]:
        raise UserError(f"embedding.matryoshka_dims: {max(emb.matryoshka_dims)} exceeds the model's "
                        f"{queries.shape[-1]} dimensions")
    return sum(mnrl_sum(queries[:, :d], docs[:, :d], emb.scale) for d in emb.matryoshka_dims)


@dataclass
class TextBatch:
    """A micro-batch tokenised for the model: queries, and documents = positives then negatives."""

    queries: dict[str, mx.array]
    docs: dict[str, mx.array]
    size: int
    tokens: int


def text_batch(model: MLXEmbedder, examples: Sequence[EmbeddingExample], recipe: Recipe) -> TextBatch:
    emb = recipe.embedding
    q_len, p_len = recipe.embedding_lengths()
    docs = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
    queries = model.encoder.tokenize([emb.query_prefix + e.query for e in examples], model.limit(q_len))
    documents = model.encoder.tokenize([emb.passage_prefix + d for d in docs], model.limit(p_len))
    tokens = int(queries["attention_mask"].sum().item() + documents["attention_mask"].sum().item())
    return TextBatch(queries, documents, len(examples), tokens)


def _rows(batch: dict[str, mx.array], start: int, stop: int) -> dict[str, mx.array]:
    return {k: v[start:stop] for k, v in batch.items()}


def batch_loss(model: MLXEmbedder, batch: TextBatch, recipe: Recipe) -> mx.array:
    embed = model.encoder.embed
    return contrastive_sum(embed(**batch.queries, normalize=False), embed(**batch.docs, normalize=False), recipe)


def cached_loss_and_grads(model: MLXEmbedder, batch: TextBatch, recipe: Recipe, chunk: int, seed: int):
    """GradCache: embed without a graph in chunks, take the loss gradient w.r.t. the embeddings, then
    back-propagate chunk by chunk (same dropout seed per chunk in both passes). Memory: one chunk's graph."""
    encoder = model.encoder
    parts = [("queries", s) for s in range(0, batch.size, chunk)]
    parts += [("docs", s) for s in range(0, batch.docs["input_ids"].shape[0], chunk)]

    def embed_part(index: int) -> mx.array:
        name, start = parts[index]
        mx.random.seed(seed + index)
        return encoder.embed(**_rows(getattr(batch, name), start, start + chunk), normalize=False)

    pieces = [mx.stop_gradient(embed_part(i)) for i in range(len(parts))]
    mx.eval(pieces)
    split = sum(name == "queries" for name, _ in parts)
    loss, (g_q, g_d) = mx.value_and_grad(lambda q, d: contrastive_sum(q, d, recipe), argnums=(0, 1))(
        mx.concatenate(pieces[:split]), mx.concatenate(pieces[split:]))
    grads = None
    for index, (name, start) in enumerate(parts):
        cached = (g_q if name == "queries" else g_d)[start:start + chunk]

        def surrogate(_model: nn.Module, index: int = index, cached: mx.array = cached) -> mx.array:
            return (embed_part(index) * cached).sum()  # its gradient is the loss gradient through this chunk

        _, g = nn.value_and_grad(encoder.model, surrogate)(encoder.model)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads)
    return loss, grads


def validation_loss(model: MLXEmbedder, examples: Sequence[EmbeddingExample], recipe: Recipe,
                    max_batches: int = 0) -> float:
    """Mean MNRL per query over unshuffled duplicate-free batches, in eval mode."""
    batches = unique_text_batches(examples, recipe.train.batch_size, seed=0, shuffle=False)
    batches = batches[:max_batches] if max_batches else batches
    was_training = model.encoder.model.training
    model.encoder.model.eval()
    total, count = 0.0, 0
    for indices in batches:
        batch = text_batch(model, [examples[i] for i in indices], recipe)
        total += batch_loss(model, batch, recipe).item()
        count += batch.size
    model.encoder.model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------------- loop


def train_loop(model: MLXEmbedder, recipe: Recipe, train_set: Sequence[EmbeddingExample],
               valid_set: Sequence[EmbeddingExample], run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
    """Train, yielding a report every log_every steps and after each validation; checkpoint atomically."""
    from trmlx.backends.mlx.train import compiled_update, make_optimizer, save_state

    cfg, chunk = recipe.train, recipe.embedding.mini_batch_size
    require_examples(train_set)
    net = model.encoder.model
    checkpoints = Checkpoints(RunDir(Path(run_dir)))
    steps = steps_for(train_set, recipe)
    schedule = Schedule(cfg, steps)
    optimizer = make_optimizer(recipe)
    net.train()
    grad_fn = nn.value_and_grad(net, lambda _m, batch: batch_loss(model, batch, recipe))
    position, last_checkpoint, step, step_start = Position(), None, 0, (0, 0)
    if resume:
        last_checkpoint, position = checkpoints.latest()
    apply_update = compiled_update(net, optimizer, last_checkpoint)
    batches = UniqueBatchCursor(train_set, cfg.batch_size, cfg.seed, position)
    window = QueryWindow(position)
    mx.reset_peak_memory()

    def peak() -> float:
        return mx.get_peak_memory() / 1e9

    def validation() -> tuple[float, dict[str, float]]:
        return validation_loss(model, valid_set, recipe, cfg.max_eval_batches), {}

    try:
        # A resume first delivers what the interrupted step still owed the log (e.g. a cut-off validation).
        yield from step_records(position, window, batches.epoch, learning_rate(position.step, cfg, steps), peak,
                                validation)
        while position.step < steps:
            step_start = (position.epoch, position.cursor)  # restored if Ctrl-C lands inside this step
            step, lr = position.step + 1, learning_rate(position.step + 1, cfg, steps)
            seed = step_seed(cfg, position.step)
            mx.random.seed(seed)
            grads, loss_sum, queries, tokens = None, mx.array(0.0), 0, 0
            for micro in range(cfg.grad_accum):
                batch = text_batch(model, [train_set[i] for i in batches.next()], recipe)
                if chunk:
                    loss, g = cached_loss_and_grads(model, batch, recipe, chunk, seed * 4099 + micro * 65_537)
                else:
                    loss, g = grad_fn(net, batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, queries, tokens = loss_sum + loss, queries + batch.size, tokens + batch.tokens
            grads = tree_map(lambda g, n=queries: g / n, grads)
            if cfg.grad_clip:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            mx.eval(loss_sum, grads)  # the backward pass runs here, where Ctrl-C may still cut in
            if not math.isfinite(loss_sum.item()):
                raise diverged(loss_sum.item(), step, cfg.lr, last_checkpoint)
            with interrupts_deferred():  # the update and the position that counts it: both or neither
                optimizer.learning_rate = lr
                apply_update(grads)
                mx.eval(net.trainable_parameters(), optimizer.state)
                window.add(loss_sum.item(), queries, tokens)
                position.pending = due_records(schedule, step, bool(valid_set))
                position.step = step
            yield from step_records(position, window, batches.epoch, lr, peak, validation)
            if schedule.save(step):
                last_checkpoint = checkpoints.save(position, lambda folder: save_state(folder, net, optimizer))
    except KeyboardInterrupt:
        rewind(position, step, step_start)
        folder = checkpoints.save(position, lambda folder: save_state(folder, net, optimizer))
        raise TrainingInterrupted(str(folder)) from None


# ------------------------------------------------------------------------------------------------------- save


def merged_weights(net: nn.Module) -> dict[str, mx.array]:
    """Every weight under Hugging Face's names, LoRA/DoRA merged into the linears it adapts."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    from trmlx.backends.mlx.export import fused_linear

    weights = dict(tree_flatten(net.parameters()))
    for path, module in net.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            dtype = module.linear.weight.dtype
            for key in [k for k in weights if k.startswith(path + ".")]:
                del weights[key]
            fused = fused_linear(module)
            weights[f"{path}.weight"] = fused.weight.astype(dtype)
            if "bias" in fused:
                weights[f"{path}.bias"] = fused.bias.astype(dtype)
    return weights


def _transformer_dir(folder: Path) -> Path:
    """The folder's Transformer module (the folder itself unless modules.json says otherwise)."""
    modules = folder / "modules.json"
    sub = ""
    if modules.is_file():
        sub = next((m.get("path", "") for m in json.loads(modules.read_text())
                    if str(m.get("type", "")).endswith("Transformer")), "")
    return folder / sub


def _pooler_weights(folder: Path) -> dict[str, mx.array]:
    """The base checkpoint's (untrained, unused) BERT pooler, so transformers loads the saved BertModel without a
    missing-weights report; read by key from safetensors, never the whole checkpoint."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                if key.split(".")[0] == "pooler" or key.split(".")[1:2] == ["pooler"]:
                    out[key[key.index("pooler."):]] = mx.array(f.get_tensor(key))
    return out


def save(model: MLXEmbedder, recipe: Recipe, path: Path) -> None:
    """A sentence-transformers folder: HF weights + config + tokenizer at the root, 1_Pooling, 2_Normalize when
    embedding.normalize, prompts from the prefixes. Written into `path` (a run's trmlx.embedding.flow writes it
    into a temp folder it swaps in when complete: trmlx.integrity.replace_folder)."""
    encoder, emb = model.encoder, recipe.embedding
    path = Path(path)
    (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
    source = _transformer_dir(resolve_path(encoder.path))
    weights = {**_pooler_weights(source), **merged_weights(encoder.model)}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    model_type = config.get("model_type", "bert")
    config["architectures"] = ["XLMRobertaModel" if model_type == "xlm-roberta" else
                               "RobertaModel" if model_type == "roberta" else "BertModel"]
    atomic_write(path / "config.json", json.dumps(config, indent=2))
    encoder.tokenizer.save_pretrained(str(path))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if emb.normalize:
        (path / "2_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    atomic_write(path / "modules.json", json.dumps(modules, indent=2))
    atomic_write(path / "sentence_bert_config.json", json.dumps(
        {"max_seq_length": model.limit(recipe.embedding_lengths()[1]), "do_lower_case": encoder.do_lower_case}, indent=2))
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
    pooling = {"word_embedding_dimension": encoder.dimension, **{key: encoder.pooling == mode
                                                                  for mode, key in modes.items()},
               "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}
    atomic_write(path / "1_Pooling" / "config.json", json.dumps(pooling, indent=2))
    atomic_write(path / "config_sentence_transformers.json", json.dumps(
        {"prompts": {"query": emb.query_prefix, "document": emb.passage_prefix}, "default_prompt_name": None,
         "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}, indent=2))
