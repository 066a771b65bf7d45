"""`trmlx plan` for embedding recipes: BERT / XLM-R encoders trained with MultipleNegativesRankingLoss.

Peak = the larger of the training peak and the eval-encoding peak, plus framework overhead (base.OVERHEAD_GB):

  training   weights as loaded (encoders are never quantised: the recipe checks refuse it) + the trainable
             parameters (full or LoRA), their gradients and optimizer state
             + activations of every text of the contrastive batch — batch queries at the query length and
             batch × (1 + num_negatives) passages at the passage length, padded to the longest (synthetic rows
             in bench are exactly that long) — for every layer in the gradient path; with cached MNRL
             (embedding.mini_batch_size) only one mini-batch's graph plus the stored embeddings and their
             gradients; with checkpointing (torch only: MLX encoders refuse it) the layer inputs plus one layer
             + the similarity matrix (queries × documents, fp32) and the loss's copies of it
  eval       weights + one layer's forward over eval.batch_size passages (no gradients)

For MNRL the micro-batch IS the contrastive batch (every other text of the batch is a negative), so `fit` never
splits it into grad_accum: it turns on checkpointing and/or cached MNRL, which keep the loss and its gradients
exact. Coefficients per backend family are measured (CALIBRATION; `python benchmarks/plan_calibration_embedding.py`
refits them). Nothing here imports mlx or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trmlx.errors import UserError
from trmlx.plan.base import (DTYPE_BYTES, Plan, Target, Term, nothing_fits, overhead_term, parameter_terms,
                             trainable_parameters)
from trmlx.recipe.schema import Recipe

# Elements of the activation dtype per token (fp32 CPU runs; bytes scale with the dtype). h = hidden size,
# I = MLP width, heads·T = attention scores (T = the padded length of that text's column).
#   grad_extra   gradient copies besides .grad, in units of the trainable parameters; cached_grad: more with
#                cached MNRL (MLX sums each chunk's gradients into the step's)
#   emb_h        the embedding layer's outputs (sum, LayerNorm, dropout), once per token
#   act_*        per layer in the gradient path, kept for the backward pass
#   ckpt_h       per layer with checkpointing (torch's non-reentrant checkpoint keeps the layer input)
#   enc_*        eval encoding: one layer's forward, no gradients
# Fitted by `python benchmarks/plan_calibration_embedding.py` (~5 min here) on tiny random BERTs/XLM-Rs
# (benchmarks/results/plan_calibration_embedding-cpu.json: the data and the errors).
CALIBRATION: dict[str, dict[str, float]] = {  # 14 configurations × 2 backends, largest error 10.3%
    "mlx": {"grad_extra": 0.221, "cached_grad": 1.807, "emb_h": 0.434, "act_h": 18.346, "act_mlp": 2.947,
            "act_scores": 3.681, "ckpt_h": 0.0, "enc_h": 15.852, "enc_mlp": 1.865, "enc_scores": 1.135},
    "torch": {"grad_extra": 0.0, "cached_grad": 0.249, "emb_h": 0.0, "act_h": 6.025, "act_mlp": 3.257,
              "act_scores": 3.358, "ckpt_h": 0.517, "enc_h": 3.333, "enc_mlp": 2.1, "enc_scores": 0.068},
}
TRAIN_KEYS = ("grad_extra", "cached_grad", "emb_h", "act_h", "act_mlp", "act_scores", "ckpt_h")
EVAL_KEYS = ("enc_h", "enc_mlp", "enc_scores")
LOSS_FP32_COPIES = 4  # scores, softmax/logsumexp, and their gradients: tiny next to the encoder, not fitted
STORED_EMBEDDING_COPIES = 3  # cached MNRL: the pieces, their concatenation and its gradient (fp32)


@dataclass(frozen=True)
class EncoderShape:
    """The numbers of a BERT-style encoder (BERT, RoBERTa, XLM-R, BGE-M3) that memory and FLOPs depend on."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    storage_dtype: str
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> "EncoderShape":
        if config.get("is_encoder_decoder") or "d_model" in config:
            raise UserError(f"{source}: embedding recipes train BERT-style encoders; this is an encoder-decoder")
        try:
            return cls(model_type=str(config.get("model_type", "")), vocab_size=int(config["vocab_size"]),
                       hidden_size=int(config["hidden_size"]), num_layers=int(config["num_hidden_layers"]),
                       num_heads=int(config["num_attention_heads"]),
                       intermediate_size=int(config["intermediate_size"]),
                       max_positions=int(config.get("max_position_embeddings", 512)),
                       type_vocab_size=int(config.get("type_vocab_size", 2)),
                       storage_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32")
                       .removeprefix("torch."), source=source)
        except KeyError as err:
            raise UserError(f"{source}: config.json has no {err.args[0]!r}; plan needs a BERT-like encoder config "
                            "(hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, "
                            "vocab_size)") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear of one block, under Hugging Face's names (LoRA targets match these)."""
        h, i = self.hidden_size, self.intermediate_size
        return {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
                "attention.output.dense": (h, h), "intermediate.dense": (h, i), "output.dense": (i, h)}

    def block_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def block_parameters(self) -> int:
        """Linear weights and biases plus the two LayerNorms of one block."""
        return self.block_linear_parameters() + sum(o for _, o in self.linears().values()) + 4 * self.hidden_size

    def embedding_parameters(self) -> int:
        """Word, position and token-type embeddings plus their LayerNorm."""
        return (self.vocab_size + self.max_positions + self.type_vocab_size + 2) * self.hidden_size

    def parameters(self) -> int:
        """The encoder both backends train (BertModel / XLMRobertaModel without the pooler, which sentence-
        transformers loads but never uses)."""
        return self.embedding_parameters() + self.num_layers * self.block_parameters()

    def pooler_parameters(self) -> int:
        return self.hidden_size * self.hidden_size + self.hidden_size

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "parameters": self.parameters()}


# ------------------------------------------------------------------------------------------------------- plan

def padded(length: int, shape: EncoderShape) -> int:
    """Positions of a text column: tokenisers pad to the longest text, capped by the model's positions (XLM-R
    reserves two of max_position_embeddings for padding_idx)."""
    cap = shape.max_positions - (2 if shape.model_type in ("roberta", "xlm-roberta", "camembert") else 0)
    return min(length, cap)


def dtypes(recipe: Recipe, target: Target) -> tuple[int, int]:
    """(weight bytes, activation bytes): MLX casts the encoder to model.dtype (auto = fp32); torch keeps fp32
    weights (sentence-transformers' fit) and autocasts activations to the target's dtype."""
    if target.backend == "mlx":
        size = 4 if recipe.model.dtype == "auto" else DTYPE_BYTES[recipe.model.dtype]
        return size, size
    return 4, target.act_bytes


def plan_memory(recipe: Recipe, backend: str, shape: EncoderShape, target: Target, *, batch_size: int | None = None,
                grad_accum: int | None = None, grad_checkpoint: bool | None = None, seq_len: int | None = None,
                query_len: int | None = None, num_negatives: int | None = None,
                mini_batch_size: int | None = None, eval_batch_size: int | None = None, budget: float | None = None,
                coefficients: dict[str, float] | None = None, **_ignored: Any) -> Plan:
    """The memory plan of one embedding configuration (plan.plan_memory's keywords; seq_len = the passage length,
    query_len the query length, both defaulting to the recipe's). Keywords of other tasks (prompt_len,
    max_new_tokens) are accepted and ignored, so plan's callers need not know the task."""
    train, emb, coef = recipe.train, recipe.embedding, coefficients or CALIBRATION[target.family]
    batch = batch_size or (train.batch_size if isinstance(train.batch_size, int) else train.effective_batch)
    accum = grad_accum or (train.grad_accum if isinstance(train.batch_size, int) else 1)
    ckpt = train.grad_checkpoint if grad_checkpoint is None else grad_checkpoint
    chunk = emb.mini_batch_size if mini_batch_size is None else mini_batch_size
    negatives = (0 if emb.negatives == "none" else emb.num_negatives) if num_negatives is None else num_negatives
    q_default, p_default = recipe.embedding_lengths()
    t_p = padded(seq_len or p_default, shape)
    t_q = padded(min(query_len or q_default, seq_len or q_default), shape)
    eval_batch = eval_batch_size or recipe.eval.batch_size
    w_bytes, dt = dtypes(recipe, target)
    h, inter, heads = shape.hidden_size, shape.intermediate_size, shape.num_heads
    n_docs = batch * (1 + negatives)
    fused = target.fused_attention

    params, grad_layers = trainable_parameters(recipe, shape)
    full = recipe.peft.method == "full"
    param_bytes = w_bytes if full else 4  # LoRA weights are fp32 on both backends
    # One gradient copy, plus measured extra copies: MLX holds the summed gradients and their scaled / clipped
    # copies (one more while cached MNRL adds a chunk's), torch the clipped-norm temporaries.
    grad_copies = 1 + coef["grad_extra"] + (coef["cached_grad"] if chunk else 0.0)
    weights = shape.parameters() * w_bytes + (shape.pooler_parameters() * w_bytes if target.family == "torch" else 0)
    if full:  # the trainable weights are the weights: count them once, under "adapter"
        weights -= shape.parameters() * w_bytes

    def per_token(t: int, keep_layers: bool) -> float:
        layer = coef["act_h"] * h + coef["act_mlp"] * inter + (0.0 if fused else coef["act_scores"] * heads * t)
        kept = grad_layers * (coef["ckpt_h"] * h) + layer if keep_layers else grad_layers * layer
        return coef["emb_h"] * h * (1 if full else 0) + kept

    keep = ckpt and target.family == "torch"  # MLX encoders refuse checkpointing (recipe checks)
    if chunk:  # one mini-batch's graph at a time, the larger of a query chunk and a passage chunk
        rows_q, rows_p = min(chunk, batch), min(chunk, n_docs)
        activations = max(rows_q * t_q * per_token(t_q, keep), rows_p * t_p * per_token(t_p, keep)) * dt
        stored = (batch + n_docs) * h * 4 * STORED_EMBEDDING_COPIES
    else:
        activations = (batch * t_q * per_token(t_q, keep) + n_docs * t_p * per_token(t_p, keep)) * dt
        stored = 0.0
    dims = len(emb.matryoshka_dims) or 1
    loss = batch * n_docs * 4 * LOSS_FP32_COPIES * dims + stored
    tokens = batch * t_q + n_docs * t_p
    act_doc = (f"{batch} queries × {t_q} + {n_docs} passages × {t_p} positions ({tokens:,} tokens), "
               f"{grad_layers} layers in the gradient path × {dt} B"
               + (f"; cached MNRL: one mini-batch of {chunk} texts at a time" if chunk else "")
               + (f"; checkpointing keeps {coef['ckpt_h']:g}·h per layer + one layer live" if keep else ""))
    eval_tokens = eval_batch * t_p
    encoding = eval_tokens * dt * (coef["enc_h"] * h + coef["enc_mlp"] * inter
                                   + (0.0 if fused else coef["enc_scores"] * heads * t_p))
    how = f"{'fp32' if w_bytes == 4 else recipe.model.dtype}" + (" + the unused pooler sentence-transformers loads"
                                                                 if target.family == "torch" else "")
    terms = (
        Term("weights", weights, f"frozen encoder, {shape.parameters() / 1e6:.1f}M parameters: {how}"
             + (" (trained in full: counted under adapter)" if full else ""), "both"),
        *parameter_terms(recipe, params, param_bytes, grad_copies,
                         f"{grad_copies:.2f} gradient copies of the trainable parameters (measured)"),
        Term("activations", activations, act_doc, "train"),
        Term("similarity_loss", loss, f"{batch} × {n_docs} fp32 similarity matrix × {LOSS_FP32_COPIES} copies"
             + (f" × {dims} Matryoshka dims" if dims > 1 else "")
             + (f" + {batch + n_docs} stored fp32 embeddings × {STORED_EMBEDDING_COPIES}" if chunk else ""), "train"),
        Term("encoding", encoding, f"eval: one layer's forward over {eval_batch} passages × {t_p} positions",
             "eval"),
        overhead_term(target),
    )
    settings = {"backend": backend, "batch_size": batch, "grad_accum": accum, "effective_batch": batch * accum,
                "grad_checkpoint": ckpt, "mini_batch_size": chunk, "seq_len": t_p, "query_len": t_q,
                "passage_len": t_p, "num_negatives": negatives, "texts_per_batch": batch + n_docs,
                "eval_batch_size": eval_batch, "optimizer": train.optimizer, "quantize_bits": 0,
                "peft": recipe.peft.method, "adapted_layers": grad_layers}
    compute = target.compute_dtype if target.family == "torch" else "fp32" if dt == 4 else recipe.model.dtype
    return Plan(terms, settings, shape, dataclasses.replace(target, compute_dtype=compute), budget)


# --------------------------------------------------------------------------------------------------------- fit

Shape = EncoderShape  # every task module names its shape class Shape (trmlx.plan.tasks reads it)


def fit(recipe: Recipe, backend: str, shape: EncoderShape, target: Target, budget: float) -> tuple[Plan, list[Plan]]:
    """Keep the contrastive batch (splitting it would change the loss) and find what makes it fit: as it is, then
    checkpointing (torch), then cached MNRL with the largest mini-batch that fits (exact gradients, one more
    forward pass), then both. Returns the choice and every plan tried."""
    train = recipe.train
    batch = train.effective_batch if train.batch_size == "auto" else train.batch_size
    accum = 1 if train.batch_size == "auto" else train.grad_accum
    ckpt_options = [False] if backend == "mlx" else ([True] if train.grad_checkpoint else [False, True])
    given = recipe.embedding.mini_batch_size
    chunks = [given] if given else [0] + [c for c in (256, 128, 64, 32, 16, 8, 4, 2, 1) if c < batch]
    tried = []
    for chunk in chunks:
        for ckpt in ckpt_options:
            plan = plan_memory(recipe, backend, shape, target, batch_size=batch, grad_accum=accum,
                               grad_checkpoint=ckpt, mini_batch_size=chunk, budget=budget)
            tried.append(plan)
            if plan.train_peak + plan.overhead <= budget:
                return plan, tried
    smallest = min(tried, key=lambda p: p.train_peak).settings["mini_batch_size"]
    raise nothing_fits(tried, budget, f"mini_batch_size {smallest}", "try peft.method = \"lora\", shorter "
                       "embedding.max_passage_length or a smaller train.batch_size",
                       kept=f" with the contrastive batch of {batch}")


def apply(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with the plan's chosen numbers (batch, grad_accum, checkpointing, cached-MNRL mini-batch)."""
    s = plan.settings
    return dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                                          grad_checkpoint=s["grad_checkpoint"]),
        embedding=dataclasses.replace(recipe.embedding, mini_batch_size=s["mini_batch_size"]))
