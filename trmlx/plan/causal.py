"""`trmlx plan` for causal (decoder-only) recipes: the decoder's shape and its memory plan, term by term.

Peak = the larger of the training peak and the eval-generation peak, plus framework overhead:

  training   weights (quantised at load, as the backend does it) + adapter, its gradients and optimizer state
             + activations kept for the backward pass (every layer from the first adapted one; with checkpointing
             a per-layer remainder plus one recomputed layer) + logits and cross-entropy (vocabulary-sized)
  eval       weights + adapter + the KV cache of one eval batch (prompt + max_new_tokens) + one prefill layer
  overhead   what the allocator counters cannot see: CUDA context and workspaces, the runtime's own libraries

Weights, adapter, optimizer and KV cache are arithmetic on config.json. The activation and logits coefficients
are per backend and measured (CALIBRATION; `python benchmarks/plan_calibration.py` refits them): MLX's
mx.get_peak_memory() and, for torch, the allocator-level peak read from the profiler's memory events (the CPU
twin of torch.cuda.max_memory_allocated), on tiny random Llamas on a CPU. Nothing here imports mlx or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trmlx.adapters import match_targets
from trmlx.errors import UserError
from trmlx.loop import chunked_loss
from trmlx.plan.base import (GB, PAD_MULTIPLE, Plan, Target, Term, apply_batch, batch_settings, bnb_4bit_bytes,
                             fit_micro_batch, kv_positions, loss_fp32_copies, mlx_quantised_bytes, overhead_term,
                             parameter_terms, trainable_parameters)
from trmlx.recipe.schema import Recipe

# Measured coefficients, in elements of the activation dtype per token (fitted on fp32 CPU runs; the bytes scale
# with the dtype). h = hidden size, q/kv = query/key-value widths, I = MLP width, heads·T = attention scores
# (T = padded positions; zero where attention is fused, as torch's SDPA is on a GPU).
#   act_*          per layer in the gradient path, kept for the backward pass without checkpointing
#   ckpt_h         per layer with checkpointing. torch: 1.0 = the layer's input, as non-reentrant checkpointing
#                  keeps; MLX: ~15·h — mx.checkpoint on MLX 0.32 (CPU) frees far less than a layer's activations
#   ckpt_layer_*   the one layer live in full while it is recomputed and differentiated (after the loss's
#                  temporaries are freed: the plan counts the larger of the two)
#   logits_fp32    fp32 vocabulary-sized rows per token besides the model-dtype logits (softmax / loss / gradient);
#                  quant_logits_fp32 more when MLX's head is quantised. Unchunked only (train.loss_chunk_size = 0,
#                  prompt / prefix tuning), which the calibration sets no longer run: kept from the last fit that did
#   chunk_fp32     with a chunked loss: fp32 copies of one chunk's rows × vocabulary live at once (logits,
#                  softmax, its gradient and the temporaries between) when more chunks follow; single_chunk_fp32
#                  when the batch's targets fit one chunk. Measured at 7B width (vocabulary 128,256-152,064): torch
#                  ~2 alone (logits + logsumexp's temporary), ~3 with a next chunk (the previous chunk's gradient
#                  is still referenced); MLX ~3.4 alone, ~4.7 with several (the forward-gradient chunks)
#   prefill_*      eval generation: one layer's forward over the prompt chunk (no gradients)
# Refit with `python benchmarks/plan_calibration.py --width`: one fit over the tiny Llamas of
# benchmarks/results/plan_calibration-cpu.json (hidden 64-256) and the 1-2 layer models of Qwen2.5-7B's and
# Llama-3-8B's width of benchmarks/results/plan_calibration_width-cpu.json (the data and the errors of both).
CALIBRATION: dict[str, dict[str, float]] = {
    "mlx": {
        "act_h": 5.24, "act_qkv": 0, "act_mlp": 8.0, "act_scores": 1.616, "ckpt_h": 16.916, "ckpt_layer_h": 0,
        "ckpt_layer_qkv": 0, "ckpt_layer_mlp": 13.839, "ckpt_layer_scores": 3.55, "logits_fp32": 1.447,
        "quant_logits_fp32": 1.657, "chunk_fp32": 4.122, "single_chunk_fp32": 2.523, "prefill_h": 2.695,
        "prefill_mlp": 4.078, "prefill_scores": 1.63},
    "torch": {
        "act_h": 5.199, "act_qkv": 1.05, "act_mlp": 3.919, "act_scores": 0.042, "ckpt_h": 0.953, "ckpt_layer_h": 0,
        "ckpt_layer_qkv": 3.13, "ckpt_layer_mlp": 6.474, "ckpt_layer_scores": 0.044, "logits_fp32": 2.021,
        "quant_logits_fp32": 0, "chunk_fp32": 3.222, "single_chunk_fp32": 1.961, "prefill_h": 3.68,
        "prefill_mlp": 3.979, "prefill_scores": 0.076},
}
# Where CALIBRATION was measured: result file -> the hidden sizes of its models (tests/test_plan_width.py checks
# these against the files). trmlx plan names them, and says whether the planned model's width is among them.
CALIBRATED_ON: dict[str, tuple[int, ...]] = {
    "benchmarks/results/plan_calibration-cpu.json": (64, 128, 256),
    "benchmarks/results/plan_calibration_width-cpu.json": (3584, 4096),
}
TRAIN_KEYS = ("act_h", "act_qkv", "act_mlp", "act_scores", "ckpt_h", "ckpt_layer_h", "ckpt_layer_qkv",
              "ckpt_layer_mlp", "ckpt_layer_scores", "logits_fp32", "quant_logits_fp32", "chunk_fp32",
              "single_chunk_fp32")
EVAL_KEYS = ("prefill_h", "prefill_mlp", "prefill_scores")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on, read from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied: bool
    qkv_bias: bool
    storage_dtype: str
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> "ModelShape":
        text = config.get("text_config") or config
        if config.get("is_encoder_decoder") or "d_model" in text:
            raise UserError(f"{source}: plan covers decoder-only causal LMs; this is an encoder-decoder model")
        try:
            h, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            return cls(model_type=str(text.get("model_type", "")), vocab_size=int(text["vocab_size"]),
                       hidden_size=h, num_layers=int(text["num_hidden_layers"]), num_heads=heads,
                       num_kv_heads=int(text.get("num_key_value_heads") or heads),
                       head_dim=int(text.get("head_dim") or h // heads),
                       intermediate_size=int(text["intermediate_size"]),
                       tied=bool(text.get("tie_word_embeddings", False)),
                       qkv_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
                       storage_dtype=str(text.get("torch_dtype") or text.get("dtype") or "float32")
                       .removeprefix("torch."), source=source)
        except KeyError as err:
            raise UserError(f"{source}: config.json has no {err.args[0]!r}; plan needs a Llama-like decoder "
                            "config (hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, "
                            "vocab_size)") from None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one block, under the names both backends use."""
        h, i = self.hidden_size, self.intermediate_size
        return {"self_attn.q_proj": (h, self.q_dim), "self_attn.k_proj": (h, self.kv_dim),
                "self_attn.v_proj": (h, self.kv_dim), "self_attn.o_proj": (self.q_dim, h),
                "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}

    def block_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def small_parameters(self) -> int:
        """Norm weights and attention biases: never quantised."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.num_layers * (2 * self.hidden_size + bias) + self.hidden_size

    def parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tied else 2) + self.num_layers * self.block_linear_parameters() \
            + self.small_parameters()

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "parameters": self.parameters()}


Shape = ModelShape  # every task module names its shape class Shape (trmlx.plan.tasks reads it)


def calibration_note(shape: ModelShape) -> str:
    """One line for the printed plan: which measurements the coefficients come from, and whether this width is
    one of them."""
    files = "; ".join(f"{path} (hidden {', '.join(f'{h:,}' for h in widths)})"
                      for path, widths in CALIBRATED_ON.items())
    measured = any(shape.hidden_size in widths for widths in CALIBRATED_ON.values())
    return (f"coefficients fitted on {files}: hidden {shape.hidden_size:,} is "
            + ("a measured width" if measured else "not a measured width (the fit carried over)"))


def padded_positions(seq_len: int) -> int:
    """Positions a causal batch of seq_len-token rows computes (inputs are one shorter, padded to 8)."""
    return -(-(seq_len - 1) // PAD_MULTIPLE) * PAD_MULTIPLE


def target_names(shape: ModelShape, targets: str | list[str]) -> list[str]:
    """Paths of the block's linears that peft.targets names (the rule both backends use)."""
    return match_targets(shape.linears(), targets)


def weight_bytes(recipe: Recipe, shape: ModelShape, target: Target) -> tuple[float, str]:
    """Bytes of the frozen base as loaded: quantised where the backend quantises at load."""
    model = recipe.model
    bits, group = model.quantize_bits, model.quant_group_size
    embed = shape.vocab_size * shape.hidden_size
    heads = 1 if shape.tied else 2
    linear = shape.num_layers * shape.block_linear_parameters()
    if target.backend == "mlx":
        stored = target.act_bytes  # set_dtype(model.dtype) before quantising; auto = as stored
        rest = shape.small_parameters() * stored
        if not bits:
            return (linear + heads * embed) * stored + rest, f"{shape.storage_dtype} as stored"
        per_weight, mode = mlx_quantised_bytes(recipe, stored)
        # quantise_blockwise quantises every linear (and the embedding/head) whose input width divides the group.
        quantised = shape.num_layers * sum(a * b for a, b in shape.linears().values() if a % group == 0) \
            + (heads * embed if shape.hidden_size % group == 0 else 0)
        plain = linear + heads * embed - quantised
        return quantised * per_weight + plain * stored + rest, f"{bits}-bit {mode} g{group} (embedding and head too)"
    compute = target.act_bytes
    rest = (heads * embed + shape.small_parameters()) * compute
    if not bits:
        return (linear + heads * embed + shape.small_parameters()) * compute, f"{target.compute_dtype}"
    if bits == 8:
        return linear * 1 + shape.num_layers * sum(o for _, o in shape.linears().values()) * 4 + rest, \
            "bitsandbytes int8 (embedding and head unquantised)"
    per_weight, mode = bnb_4bit_bytes(recipe)
    return linear * per_weight + rest, f"bitsandbytes {mode}{' double-quant' if model.double_quant else ''} " \
                                       "(embedding and head unquantised)"


def plan_memory(recipe: Recipe, backend: str, shape: ModelShape, target: Target, *, batch_size: int | None = None,
                grad_accum: int | None = None, grad_checkpoint: bool | None = None, seq_len: int | None = None,
                eval_batch_size: int | None = None, prompt_len: int | None = None,
                max_new_tokens: int | None = None, target_tokens: int | None = None, budget: float | None = None,
                coefficients: dict[str, float] | None = None) -> Plan:
    """The memory plan of one configuration; unset keywords come from the recipe (seq_len: data.max_length, the
    longest batch training can meet; prompt_len: the same, the longest prompt eval can meet; target_tokens: the
    micro-batch's tokens that carry a loss, at most every position). `coefficients` replaces CALIBRATION[family]
    (the calibration script fits them)."""
    coef = coefficients or CALIBRATION[target.family]
    batch, accum, ckpt = batch_settings(recipe, batch_size, grad_accum, grad_checkpoint)
    seq_len = seq_len or recipe.data.max_length
    eval_batch = eval_batch_size or recipe.eval.batch_size
    new_tokens = max_new_tokens or recipe.eval.max_new_tokens
    prompt_len = prompt_len or seq_len
    dt = target.act_bytes
    h, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    positions = padded_positions(seq_len)
    tokens = batch * positions

    weights, how = weight_bytes(recipe, shape, target)
    params, grad_layers = trainable_parameters(recipe, shape)
    full = recipe.peft.method == "full"
    param_bytes = dt if full else 4  # LoRA / virtual-token weights are fp32 on both backends
    # MLX holds the step's summed gradients and their scaled copy; torch keeps .grad only.
    grad_copies = 2 if target.backend == "mlx" else 1

    fused = target.fused_attention
    per_layer = coef["act_h"] * h + coef["act_qkv"] * (shape.q_dim + 2 * shape.kv_dim) + coef["act_mlp"] * inter \
        + (0.0 if fused else coef["act_scores"] * shape.num_heads * positions)
    recomputed = coef["ckpt_layer_h"] * h + coef["ckpt_layer_qkv"] * (shape.q_dim + 2 * shape.kv_dim) \
        + coef["ckpt_layer_mlp"] * inter + (0.0 if fused else coef["ckpt_layer_scores"] * shape.num_heads * positions)
    kept = tokens * dt * grad_layers * coef["ckpt_h"] * h
    with_ckpt = kept + tokens * dt * recomputed
    without = tokens * dt * grad_layers * per_layer
    activations = kept if ckpt else without
    act_doc = (f"{grad_layers} layers in the gradient path × {tokens:,} tokens × {dt} B × "
               + (f"{coef['ckpt_h']:g}·h kept per layer (+ recompute: one layer live in full); without "
                  f"checkpointing: {without / GB:.3f} GB" if ckpt else
                  f"{per_layer:,.0f} elements per token (h, q/k/v, MLP{'' if fused else ', attention scores'}); "
                  f"with checkpointing: {with_ckpt / GB:.3f} GB"))
    fp32_copies = loss_fp32_copies(coef, recipe, target, h)
    logits = tokens * vocab * (dt + 4 * fp32_copies)  # the head's output in the model dtype + fp32 loss copies
    logits_doc = (f"{tokens:,} tokens × vocabulary {vocab:,} × (one {dt}-byte logits row + {fp32_copies:.2f} fp32 "
                  "rows for softmax / cross-entropy and its gradient)")
    chunk = recipe.train.loss_chunk_size if chunked_loss(shape.model_type, recipe.peft.method) else 0
    if chunk:  # the head over target rows only, one chunk of them at a time (backends/*/loss.py)
        targets = min(target_tokens or tokens, tokens)
        rows = min(chunk, -(-targets // 64) * 64)
        copies = coef["chunk_fp32"] if targets > rows else coef["single_chunk_fp32"]
        logits = rows * vocab * 4 * copies + 2 * targets * h * dt
        logits_doc = (f"chunked (train.loss_chunk_size = {chunk}): {rows:,} target rows × vocabulary {vocab:,} × "
                      f"{copies:g} fp32 copies at a time, + the {targets:,} target rows' hidden states "
                      f"and their gradient (unchunked: {tokens * vocab * (dt + 4 * fp32_copies) / GB:.3f} GB)")

    cached = kv_positions(prompt_len + new_tokens, target)
    kv_cache = 2 * shape.num_layers * shape.kv_dim * eval_batch * cached * dt
    prefill_tokens = eval_batch * min(prompt_len, 512)
    prefill = prefill_tokens * dt * (coef["prefill_h"] * h + coef["prefill_mlp"] * inter
                                     + (0 if target.fused_attention else
                                        coef["prefill_scores"] * shape.num_heads * min(prompt_len, 512)))
    prefill_doc = f"eval generation: one layer's forward over batch {eval_batch} × {min(prompt_len, 512)} prompt " \
                  "positions"
    if target.backend == "mlx" and shape.num_layers == 1:
        # MLX's prefill evaluates only the caches, so the last layer's attention and MLP never run: with one layer
        # that leaves its input, the normed input and K/V (with RoPE'd K) — measured at 7B width
        prefill = prefill_tokens * dt * (2 * h + 3 * shape.kv_dim)
        prefill_doc += " (one layer: its K/V projections only)"
    terms = (
        Term("weights", weights, f"frozen base, {shape.parameters() / 1e9:.3f}B parameters: {how}", "both"),
        *parameter_terms(recipe, params, param_bytes, grad_copies, f"{grad_copies} gradient "
                         f"cop{'y' if grad_copies == 1 else 'ies'} of the trainable parameters"),
        Term("activations", activations, act_doc, "train"),
        # With checkpointing the loss's temporaries are gone before the backward pass recomputes a layer: the
        # larger of the two counts, not their sum (measured at 7B width, where both are hundreds of MB).
        *((Term("recompute", with_ckpt - kept, f"the layer recomputed in the backward pass, live in full: "
                                               f"{tokens:,} tokens × {recomputed:,.0f} elements × {dt} B",
                "train:backward"),) if ckpt else ()),
        Term("logits_loss", logits, logits_doc, "train:loss" if ckpt else "train"),
        Term("kv_cache", kv_cache, f"eval generation: 2 × {shape.num_layers} layers × {shape.kv_dim} × "
                                   f"batch {eval_batch} × {cached} positions (prompt {prompt_len} + "
                                   f"{new_tokens} new) × {dt} B", "eval"),
        Term("prefill", prefill, prefill_doc, "eval"),
        overhead_term(target),
    )
    settings = {"backend": backend, "batch_size": batch, "grad_accum": accum, "effective_batch": batch * accum,
                "grad_checkpoint": ckpt, "seq_len": seq_len, "positions": positions, "eval_batch_size": eval_batch,
                "prompt_len": prompt_len, "max_new_tokens": new_tokens, "optimizer": recipe.train.optimizer,
                "quantize_bits": recipe.model.quantize_bits, "peft": recipe.peft.method,
                "adapted_layers": grad_layers, "calibration": calibration_note(shape)}
    return Plan(terms, settings, shape, target, budget)


def fit(recipe: Recipe, backend: str, shape: ModelShape, target: Target, budget: float) -> tuple[Plan, list[Plan]]:
    """The largest micro-batch (and checkpointing only if needed) whose training peak fits the budget."""
    return fit_micro_batch(plan_memory, recipe, backend, shape, target, budget)


apply = apply_batch  # what fit chose goes into the recipe as micro-batch, grad_accum and checkpointing
