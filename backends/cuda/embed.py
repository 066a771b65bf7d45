"""The torch embedding loop: the MLX embed loop's twin, with sentence-transformers' own loss classes —
MultipleNegativesRankingLoss(scale), CachedMultipleNegativesRankingLoss (GradCache) when
embedding.mini_batch_size is set, MatryoshkaLoss around either when embedding.matryoshka_dims is set.

Examples, negatives, batch order, LR curve and checkpoint layout come from the core (trmlx.embedding,
trmlx.loop). Each batch goes to the loss as two columns: the queries, and the documents = the batch's positives
followed by all its hard negatives — the loss scores every query against all documents and takes row i's
positive from the first rows, exactly sentence-transformers' (anchor, positive, negative_1..n) arithmetic,
while letting queries have different numbers of negatives. Saved with `model.save` (LoRA merged first).
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from trmlx.embedding.batches import QueryWindow, UniqueBatchCursor, steps_for, unique_text_batches
from trmlx.embedding.examples import EmbeddingExample
from trmlx.errors import TrainingInterrupted, UserError
from trmlx.recipe.checks import model_path
from trmlx.loop import (Checkpoints, Position, Schedule, diverged, due_records, interrupts_deferred,
                        require_examples, rewind, step_records, step_seed)
from trmlx.precision import choose_dtype
from trmlx.recipe.schema import Recipe
from trmlx.report import StepReport
from trmlx.rundir import RunDir
from trmlx.schedule import learning_rate

from trmlx.backends.cuda.device import cpu_math, describe_device, memory
from trmlx.backends.cuda.model import enable_checkpointing, wrap_lora
from trmlx.backends.cuda.train import apply_update

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def st_modules() -> tuple[Any, Any]:
    """sentence-transformers' (modules, losses) packages: v6 paths, else v5's (deprecated in v6)."""
    try:
        from sentence_transformers.sentence_transformer import losses, modules
    except ImportError:
        from sentence_transformers import losses
        from sentence_transformers import models as modules
    return modules, losses


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    return describe_device()["name"]


@dataclass
class TorchEmbedder:
    """A SentenceTransformer on this device; `dtype` is the autocast dtype (weights stay fp32, as in ST's fit)."""

    model: Any
    dtype: str
    peft: bool = False

    def limit(self, max_length: int) -> int:
        config = self.model[0].auto_model.config
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        return min(max_length, config.max_position_embeddings - offset)

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        batch = self.model.tokenizer(list(texts), padding=True, truncation=True, max_length=self.limit(max_length),
                                     return_tensors="pt")
        return {k: v.to(device()) for k, v in batch.items()}

    def autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=device().type, dtype=DTYPES[self.dtype])

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int, batch_size: int = 32) -> np.ndarray:
        """float32 embeddings in eval mode, longest texts batched together, returned in the input order."""
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(texts), self.model.get_embedding_dimension()), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            with self.autocast():
                vectors = self.model(self.tokenize([texts[i] for i in chunk], max_length))["sentence_embedding"]
            out[chunk] = vectors.float().cpu().numpy()
        self.model.train(was_training)
        return out


def load(recipe: Recipe, path: str | Path | None = None, train: bool = False) -> TorchEmbedder:
    """The recipe's base model (pooling per embedding.pooling, Normalize per embedding.normalize) or a saved folder
    as it is; with train=True, peft LoRA/DoRA attached (A from the core's seeded init) or all weights trainable."""
    from sentence_transformers import SentenceTransformer

    source = str(path or model_path(recipe))
    if path is None:
        from trmlx.models import check_model_folder

        check_model_folder(source, recipe.task)  # a bad local folder is one line (the only one), not a traceback
    models = st_modules()[0]
    info = describe_device()
    cpu_math()
    if train and info["kind"] == "cpu":
        print("trmlx: no CUDA GPU visible; the cuda backend runs on the CPU (slow, fp32)", file=sys.stderr)
    emb = recipe.embedding
    try:
        if path is None and emb.pooling != "auto":
            transformer = models.Transformer(source)
            model = SentenceTransformer(modules=[transformer, models.Pooling(
                transformer.get_embedding_dimension(), pooling_mode=emb.pooling)], device=str(device()))
        else:
            model = SentenceTransformer(source, device=str(device()))
    except OSError as err:
        raise UserError(f"model.path: cannot load {source!r} ({str(err).splitlines()[0][:160]})") from None
    if path is None:
        _set_normalize(model, emb.normalize)
    dtype, _ = choose_dtype(recipe.task, recipe.model.dtype, info["bf16"], on_gpu=info["kind"] == "gpu")
    embedder = TorchEmbedder(model, dtype)
    if train:
        torch.manual_seed(recipe.train.seed)
        if recipe.peft.method in ("lora", "dora"):
            attach_lora(model, recipe)
            embedder.peft = True
        elif recipe.peft.method != "full":
            raise UserError(f"peft.method: {recipe.peft.method!r} does not apply to embedding models; use lora, "
                            "dora or full")
        if recipe.train.grad_checkpoint:
            enable_checkpointing(model[0].auto_model)
    return embedder


def _set_normalize(model: Any, normalize: bool) -> None:
    """Append or drop the Normalize module so the saved model normalises exactly when the recipe says so."""
    models = st_modules()[0]
    names = [name for name, module in model.named_children() if type(module).__name__ == "Normalize"]
    if normalize and not names:
        model.append(models.Normalize())
    elif not normalize:
        for name in names:
            del model._modules[name]


def attach_lora(model: Any, recipe: Recipe) -> None:
    """peft LoRA/DoRA on the same linears as the MLX backend (all-linear = every linear of each block), through
    the backend's one LoRA attach (alpha / r, A from trmlx.adapters.lora_a_init, B zero)."""
    from trmlx.adapters import layer_indices, match_targets

    cfg = recipe.peft
    base = model[0].auto_model
    blocks = base.encoder.layer
    linears = sorted(n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear))
    keys = match_targets(linears, cfg.targets)
    layers = layer_indices(len(blocks), cfg.layers)
    model[0].model = wrap_lora(base, cfg, recipe.train.seed,
                               target_modules=[f"encoder.layer.{i}.{k}" for i in layers for k in keys])


def make_loss(model: Any, recipe: Recipe) -> torch.nn.Module:
    losses = st_modules()[1]
    emb = recipe.embedding
    if emb.mini_batch_size:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=emb.scale, mini_batch_size=emb.mini_batch_size)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=emb.scale)
    if emb.matryoshka_dims:
        dimension = model.get_embedding_dimension()
        if max(emb.matryoshka_dims) > dimension:
            raise UserError(f"embedding.matryoshka_dims: {max(emb.matryoshka_dims)} exceeds the model's {dimension} "
                            "dimensions")
        loss = losses.MatryoshkaLoss(model, loss, list(emb.matryoshka_dims))
    return loss


def features(model: TorchEmbedder, examples: Sequence[EmbeddingExample], recipe: Recipe):
    """[queries, documents] feature dicts, and the number of real tokens in them."""
    emb = recipe.embedding
    q_len, p_len = recipe.embedding_lengths()
    docs = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
    columns = [model.tokenize([emb.query_prefix + e.query for e in examples], q_len),
               model.tokenize([emb.passage_prefix + d for d in docs], p_len)]
    return columns, int(sum(c["attention_mask"].sum().item() for c in columns))


@torch.no_grad()
def validation_loss(model: TorchEmbedder, loss_fn: torch.nn.Module, examples: Sequence[EmbeddingExample],
                    recipe: Recipe, max_batches: int = 0) -> float:
    batches = unique_text_batches(examples, recipe.train.batch_size, seed=0, shuffle=False)
    was_training = model.model.training
    model.model.eval()
    total, count = 0.0, 0
    for indices in batches[:max_batches] if max_batches else batches:
        columns, _ = features(model, [examples[i] for i in indices], recipe)
        with model.autocast():
            total += loss_fn(columns, None).item() * len(indices)
        count += len(indices)
    model.model.train(was_training)
    return total / max(count, 1)


def train_loop(model: TorchEmbedder, recipe: Recipe, train_set: Sequence[EmbeddingExample],
               valid_set: Sequence[EmbeddingExample], run_dir: Path, resume: bool = False) -> Iterator[StepReport]:
    """Train, yielding a report every log_every steps and after each validation; checkpoint atomically."""
    from trmlx.backends.cuda.train import make_optimizer, restore_state, save_state

    cfg, st = recipe.train, model.model
    require_examples(train_set)
    checkpoints = Checkpoints(RunDir(Path(run_dir)))
    steps = steps_for(train_set, recipe)
    schedule = Schedule(cfg, steps)
    loss_fn = make_loss(st, recipe)
    params = [p for p in st.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    scaler = torch.amp.GradScaler(device().type, enabled=model.dtype == "fp16")
    position, last_checkpoint, step, step_start = Position(), None, 0, (0, 0)
    if resume:
        last_checkpoint, position = checkpoints.latest()
        restore_state(last_checkpoint, st, optimizer, scaler)
    batches = UniqueBatchCursor(train_set, cfg.batch_size, cfg.seed, position)
    window = QueryWindow(position)
    st.train()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def peak() -> float:
        return memory().peak / 1e9

    def validation() -> tuple[float, dict[str, float]]:
        return validation_loss(model, loss_fn, valid_set, recipe, cfg.max_eval_batches), {}

    try:
        # A resume first delivers what the interrupted step still owed the log (e.g. a cut-off validation).
        yield from step_records(position, window, batches.epoch, learning_rate(position.step, cfg, steps), peak,
                                validation)
        while position.step < steps:
            step_start = (position.epoch, position.cursor)
            step, lr = position.step + 1, learning_rate(position.step + 1, cfg, steps)
            torch.manual_seed(step_seed(cfg, position.step))
            micro = [[train_set[i] for i in batches.next()] for _ in range(cfg.grad_accum)]
            total = sum(len(m) for m in micro)
            loss_sum, tokens = 0.0, 0
            for examples in micro:
                columns, count = features(model, examples, recipe)
                with model.autocast():
                    loss = loss_fn(columns, None)  # mean over this micro-batch's queries
                scaler.scale(loss * (len(examples) / total)).backward()
                loss_sum, tokens = loss_sum + loss.item() * len(examples), tokens + count
            if not math.isfinite(loss_sum):
                raise diverged(loss_sum, step, cfg.lr, last_checkpoint)
            with interrupts_deferred():  # the update and the position that counts it: both or neither
                apply_update(optimizer, scaler, params, cfg.grad_clip, lr)
                window.add(loss_sum, total, tokens)
                position.pending = due_records(schedule, step, bool(valid_set))
                position.step = step
            yield from step_records(position, window, batches.epoch, lr, peak, validation)
            if schedule.save(step):
                last_checkpoint = checkpoints.save(position, lambda f: save_state(f, st, optimizer, scaler))
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        rewind(position, step, step_start)
        raise TrainingInterrupted(str(checkpoints.save(position, lambda f: save_state(f, st, optimizer, scaler))))


def save(model: TorchEmbedder, recipe: Recipe, path: Path) -> None:
    """sentence-transformers' own save (LoRA merged into the weights first) into `path` (a run's
    trmlx.embedding.flow swaps it in when complete); the recipe's prefixes become the model's query/document
    prompts."""
    st = model.model
    if model.peft:
        st[0].model = st[0].model.merge_and_unload()
        model.peft = False
    st.max_seq_length = model.limit(recipe.embedding_lengths()[1])
    st.prompts = {"query": recipe.embedding.query_prefix, "document": recipe.embedding.passage_prefix}
    st.save(str(path))
