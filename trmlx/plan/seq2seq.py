"""`trmlx plan` for seq2seq (T5 / mT5) recipes: the encoder-decoder's shape and its memory plan, term by term.

Same structure as the causal plan (trmlx.plan.base: Plan, Term, Target, overhead, quantisation rules), with an encoder
over source positions and a decoder over target positions:

  training   weights (quantised as each backend quantises T5 at load) + adapter, gradients, optimizer state
             + encoder activations (source positions) + decoder activations (target positions: self attention,
             cross attention whose keys/values span the source) + logits and loss (target tokens × vocabulary)
  eval       weights + adapter + encoder output + cross-attention K/V + the decoder's self-attention KV cache
             + one encoder layer's forward over the prompts (the prefill)

The activation, logits and prefill coefficients are measured per backend family (CALIBRATION below).
Nothing here imports mlx or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trmlx.adapters import is_target, match_targets
from trmlx.errors import UserError
from trmlx.loop import chunked_loss
from trmlx.plan.base import (GB, Plan, Target, Term, apply_batch, batch_settings, bnb_4bit_bytes, fit_micro_batch,
                             kv_positions, loss_fp32_copies, mlx_quantised_bytes, overhead_term, padded,
                             parameter_terms)
from trmlx.recipe.schema import Recipe

# Elements of the activation dtype per token (fp32 CPU runs; bytes scale with the dtype). Per sublayer input: h
# (d_model), projected widths: qkv (heads·d_kv per q/k/v/attention output), mlp (d_ff, ×2 gated), scores (heads ×
# key positions). ckpt_h: kept per layer with checkpointing; ckpt_layer_*: one encoder and one decoder layer live in
# full while recomputed; mask_scores: the additive masks (heads × keys per query, once per step); logits_fp32: fp32
# vocabulary rows per target token unchunked (chunked: trmlx.plan.causal's chunk_fp32); prefill_*: one encoder
# layer over the prompts, no gradients.
# Refit: `python benchmarks/plan_calibration.py --task seq2seq` (data:
# benchmarks/results/plan_calibration_seq2seq-cpu.json).
CALIBRATION: dict[str, dict[str, float]] = {
    "mlx": {
        "act_h": 5.531, "act_qkv": 0.0, "act_mlp": 4.674, "act_scores": 0.401, "mask_scores": 3.759,
        "ckpt_h": 18.816, "ckpt_layer_h": 0.0, "ckpt_layer_qkv": 0.0, "ckpt_layer_mlp": 4.118,
        "ckpt_layer_scores": 0.0, "logits_fp32": 3.0, "quant_logits_fp32": 3.301, "chunk_fp32": 6.8,
        "single_chunk_fp32": 2.0, "prefill_h": 14.17, "prefill_mlp": 5.845, "prefill_scores": 1.996},
    "torch": {
        "act_h": 4.036, "act_qkv": 0.0, "act_mlp": 3.497, "act_scores": 0.0, "mask_scores": 1.402, "ckpt_h": 0.576,
        "ckpt_layer_h": 0.0, "ckpt_layer_qkv": 0.688, "ckpt_layer_mlp": 1.001, "ckpt_layer_scores": 0.05,
        "logits_fp32": 1.99, "quant_logits_fp32": 0.0, "chunk_fp32": 3.0, "single_chunk_fp32": 2.0,
        "prefill_h": 4.662, "prefill_mlp": 3.926, "prefill_scores": 0.093},
}
# Not fitted: logits_fp32 and quant_logits_fp32 count only with train.loss_chunk_size = 0, and the calibration runs
# chunked (the default); logits_fp32 is measured at mT5's vocabulary by `python benchmarks/loss_chunking.py --task
# seq2seq` (unchunked rows: 3.0 fp32 copies on MLX, 1.99 on torch, at 128 and 512 target tokens alike). So are
# chunk_fp32 / single_chunk_fp32 (fp32 copies of one chunk's rows × vocabulary at once, with more chunks to come /
# alone): MLX 5.9-6.8 at 4-8 chunks, 2.0 alone; torch 3.0 and 2.0 (the same code as causal LMs, whose fit at 7B
# width has MLX ~4.1: MLX's lazy graph overlaps more of a T5's chunks, measured).
TRAIN_KEYS = ("act_h", "act_qkv", "act_mlp", "act_scores", "mask_scores", "ckpt_h", "ckpt_layer_h", "ckpt_layer_qkv",
              "ckpt_layer_mlp", "ckpt_layer_scores")
EVAL_KEYS = ("prefill_h", "prefill_mlp", "prefill_scores")


@dataclass(frozen=True)
class Seq2SeqShape:
    """The numbers of a T5 / mT5 encoder-decoder that memory depends on, read from its config.json."""

    model_type: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    encoder_layers: int
    decoder_layers: int
    gated: bool  # v1.1 / mT5: wi_0, wi_1 (gated GELU); v1.0: one wi (ReLU)
    tied: bool  # v1.0: the head is the shared embedding; v1.1 / mT5: its own lm_head
    num_buckets: int
    storage_dtype: str
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> "Seq2SeqShape":
        kind = config.get("model_type")
        if kind not in ("t5", "mt5") or not config.get("is_encoder_decoder", True):
            raise UserError(f"{source}: seq2seq memory planning covers T5 / mT5 models; this config is "
                            f"model_type {kind!r}")
        try:
            layers = int(config["num_layers"])
            return cls(model_type=kind, vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]),
                       d_kv=int(config["d_kv"]), d_ff=int(config["d_ff"]), num_heads=int(config["num_heads"]),
                       encoder_layers=layers, decoder_layers=int(config.get("num_decoder_layers") or layers),
                       gated=str(config.get("feed_forward_proj", "relu")).startswith("gated-"),
                       tied=bool(config.get("tie_word_embeddings", True)),
                       num_buckets=int(config.get("relative_attention_num_buckets", 32)),
                       storage_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32")
                       .removeprefix("torch."), source=source)
        except KeyError as err:
            raise UserError(f"{source}: config.json has no {err.args[0]!r}; plan needs a T5 config (d_model, d_kv, "
                            "d_ff, num_heads, num_layers, vocab_size)") from None

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def hidden_size(self) -> int:  # the name bench and the CLI print
        return self.d_model

    def linears(self, stack: str) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear of one block of a stack, under the names both backends use."""
        d, inner, ff = self.d_model, self.inner, self.d_ff
        attention = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
        out = {f"layer.{i}.{a}.{n}": (d, inner) for i, a in enumerate(attention) for n in "qkv"}
        out.update({f"layer.{i}.{a}.o": (inner, d) for i, a in enumerate(attention)})
        f = f"layer.{len(attention)}.DenseReluDense"
        wi = {f"{f}.wi_0": (d, ff), f"{f}.wi_1": (d, ff)} if self.gated else {f"{f}.wi": (d, ff)}
        return {**out, **wi, f"{f}.wo": (ff, d)}

    def stack_parameters(self, stack: str) -> int:
        """Blocks, the first block's relative position table and the final norm of one stack."""
        layers = self.encoder_layers if stack == "encoder" else self.decoder_layers
        norms = 2 if stack == "encoder" else 3
        block = sum(a * b for a, b in self.linears(stack).values()) + norms * self.d_model
        return layers * block + self.num_buckets * self.num_heads + self.d_model

    def cross_kv_parameters(self) -> int:
        """The decoder's cross-attention k and v: they run over source positions, not target ones."""
        return self.decoder_layers * 2 * self.d_model * self.inner

    def parameters(self) -> int:
        embed = self.vocab_size * self.d_model
        return embed * (1 if self.tied else 2) + self.stack_parameters("encoder") + self.stack_parameters("decoder")

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "parameters": self.parameters()}


def adapted(recipe: Recipe, shape: Seq2SeqShape) -> tuple[int, int, int]:
    """(trainable parameters, encoder layers in the gradient path, decoder layers in the gradient path)."""
    peft, enc, dec = recipe.peft, shape.encoder_layers, shape.decoder_layers
    if peft.method in ("lora", "dora"):
        wanted = peft.targets
        match_targets([*shape.linears("encoder"), *shape.linears("decoder")], wanted)  # each target names a layer
        top = max(enc, dec)  # peft.layers = n: the last n block indices of both stacks
        first = top - min(peft.layers, top) if peft.layers else 0
        params = 0
        for stack, count in (("encoder", enc), ("decoder", dec)):
            names = [n for n in shape.linears(stack) if is_target(n, wanted)]
            per_block = sum(peft.rank * sum(shape.linears(stack)[n]) + (shape.linears(stack)[n][1]
                                                                        if peft.method == "dora" else 0)
                            for n in names)
            params += per_block * max(0, count - first)
        # An adapted encoder block puts every decoder layer in the path (each reads the encoder output).
        return params, max(0, enc - first), dec
    if peft.method == "prompt":
        return peft.num_virtual_tokens * shape.d_model, enc, dec
    if peft.method == "full":
        return shape.parameters(), enc, dec
    raise UserError(f"peft.method: seq2seq memory planning covers lora, dora, prompt and full, not {peft.method}")


def weight_bytes(recipe: Recipe, shape: Seq2SeqShape, target: Target) -> tuple[float, str]:
    """The frozen base as loaded. MLX: quantise_blockwise quantises every linear (and the shared embedding and an
    untied head) whose input width divides the group. CUDA: bitsandbytes quantises the block linears except `wo`,
    which transformers keeps in fp32 for T5 (also under fp16), and leaves embedding and head alone."""
    model, dt = recipe.model, target.act_bytes
    bits, group = model.quantize_bits, model.quant_group_size
    embed = shape.vocab_size * shape.d_model * (1 if shape.tied else 2)
    blocks = [(shape.encoder_layers, shape.linears("encoder")), (shape.decoder_layers, shape.linears("decoder"))]
    linear = sum(n * sum(a * b for a, b in lin.values()) for n, lin in blocks)
    small = shape.parameters() - linear - embed  # norms and relative position tables
    if target.backend == "mlx":
        if not bits:
            return shape.parameters() * dt, f"{shape.storage_dtype} as stored"
        per_weight, mode = mlx_quantised_bytes(recipe, dt)
        quantised = sum(n * sum(a * b for a, b in lin.values() if a % group == 0) for n, lin in blocks) \
            + (embed if shape.d_model % group == 0 else 0)
        return quantised * per_weight + (shape.parameters() - quantised) * dt, \
            f"{bits}-bit {mode} g{group} (embedding and head too)"
    wo = sum(n * a * b for n, lin in blocks for name, (a, b) in lin.items() if name.endswith(".wo"))
    wo_bytes = 4 if bits or target.compute_dtype == "fp16" else dt  # T5's _keep_in_fp32_modules = ["wo"]
    rest = (embed + small) * dt + wo * wo_bytes
    if not bits:
        return (linear - wo) * dt + rest, target.compute_dtype
    if bits == 8:
        outs = sum(n * b for n, lin in blocks for name, (_, b) in lin.items() if not name.endswith(".wo"))
        return (linear - wo) + 4 * outs + rest, "bitsandbytes int8 (wo, embedding and head unquantised)"
    per_weight, mode = bnb_4bit_bytes(recipe)
    return (linear - wo) * per_weight + rest, f"bitsandbytes {mode}{' double-quant' if model.double_quant else ''} " \
                                              "(wo in fp32, embedding and head unquantised)"


def _layer(coef: dict[str, float], prefix: str, shape: Seq2SeqShape, stack: str, positions: int, source: int,
           fused: bool) -> float:
    """Elements per token of one layer of a stack (per target token for the decoder, its cross-attention keys and
    values over the source folded in by the source/target ratio)."""
    d, inner, mlp = shape.d_model, shape.inner, shape.d_ff * (2 if shape.gated else 1)
    scores = 0.0 if fused else coef[f"{prefix}scores"] * shape.num_heads
    if stack == "encoder":
        return coef[f"{prefix}h"] * 2 * d + coef[f"{prefix}qkv"] * 4 * inner + coef[f"{prefix}mlp"] * mlp \
            + scores * positions
    return coef[f"{prefix}h"] * 3 * d + coef[f"{prefix}qkv"] * (6 * inner + 2 * inner * source / positions) \
        + coef[f"{prefix}mlp"] * mlp + scores * (positions + source)


def plan_memory(recipe: Recipe, backend: str, shape: Seq2SeqShape, target: Target, *, batch_size: int | None = None,
                grad_accum: int | None = None, grad_checkpoint: bool | None = None, seq_len: int | None = None,
                target_len: int | None = None, eval_batch_size: int | None = None, prompt_len: int | None = None,
                max_new_tokens: int | None = None, budget: float | None = None,
                coefficients: dict[str, float] | None = None) -> Plan:
    """The memory plan of one seq2seq configuration. Unset keywords come from the recipe: seq_len (source) =
    data.max_length, target_len = data.max_target_length, prompt_len (eval source) = seq_len."""
    coef = coefficients or CALIBRATION[target.family]
    batch, accum, ckpt = batch_settings(recipe, batch_size, grad_accum, grad_checkpoint)
    seq_len, target_len = seq_len or recipe.data.max_length, target_len or recipe.data.max_target_length
    eval_batch, new_tokens = eval_batch_size or recipe.eval.batch_size, max_new_tokens or recipe.eval.max_new_tokens
    prompt_len = prompt_len or seq_len
    dt, d, inner, vocab = target.act_bytes, shape.d_model, shape.inner, shape.vocab_size
    src, tgt = padded(seq_len), padded(target_len)
    src_tokens, tgt_tokens = batch * src, batch * tgt
    fused = target.fused_attention

    weights, how = weight_bytes(recipe, shape, target)
    params, enc_layers, dec_layers = adapted(recipe, shape)
    param_bytes = dt if recipe.peft.method == "full" else 4  # adapters are fp32 on both backends
    grad_copies = 2 if target.backend == "mlx" else 1  # MLX: the summed gradients and their scaled copy

    full_enc = src_tokens * _layer(coef, "act_", shape, "encoder", src, src, fused)
    full_dec = tgt_tokens * _layer(coef, "act_", shape, "decoder", tgt, src, fused)
    # The additive masks (position bias + padding / causal, heads × keys per query) live for the whole step.
    masks = 0.0 if fused else coef["mask_scores"] * shape.num_heads * (src_tokens * src + tgt_tokens * tgt)
    if ckpt:  # each layer's input kept, plus one encoder and one decoder layer live in full while recomputed
        enc_act = dt * (coef["ckpt_h"] * d * enc_layers * src_tokens
                        + src_tokens * _layer(coef, "ckpt_layer_", shape, "encoder", src, src, fused))
        dec_act = dt * (coef["ckpt_h"] * d * dec_layers * tgt_tokens
                        + tgt_tokens * _layer(coef, "ckpt_layer_", shape, "decoder", tgt, src, fused))
    else:
        enc_act, dec_act = dt * enc_layers * full_enc, dt * dec_layers * full_dec
    enc_act += dt * masks * src_tokens * src / max(src_tokens * src + tgt_tokens * tgt, 1)
    dec_act += dt * masks * tgt_tokens * tgt / max(src_tokens * src + tgt_tokens * tgt, 1)
    fp32_copies = loss_fp32_copies(coef, recipe, target, d)
    logits = tgt_tokens * vocab * (dt + 4 * fp32_copies)
    logits_doc = (f"{tgt_tokens:,} target tokens × vocabulary {vocab:,} × (one {dt}-byte row + {fp32_copies:.2f} "
                  "fp32 rows for softmax / cross-entropy)")
    chunk = recipe.train.loss_chunk_size if chunked_loss(shape.model_type, recipe.peft.method) else 0
    if chunk:  # the head over target rows only, one chunk at a time (backends/*/loss.py, as causal LMs)
        rows = min(chunk, -(-tgt_tokens // 64) * 64)
        measured = CALIBRATION[target.family]  # not fitted (see CALIBRATION): measured at mT5's vocabulary
        copies = measured["chunk_fp32"] if tgt_tokens > rows else measured["single_chunk_fp32"]
        logits = rows * vocab * 4 * copies + 2 * tgt_tokens * d * dt
        logits_doc = (f"chunked (train.loss_chunk_size = {chunk}): {rows:,} target rows × vocabulary {vocab:,} × "
                      f"{copies:g} fp32 copies at a time, + the {tgt_tokens:,} target rows' decoder states and their "
                      f"gradient (unchunked: {tgt_tokens * vocab * (dt + 4 * fp32_copies) / GB:.3f} GB)")

    cached = kv_positions(new_tokens + 1, target)  # the decoder's own positions: start token + generated ones
    prompt_tokens = eval_batch * prompt_len
    encoder_out = prompt_tokens * d * dt
    cross_kv = 2 * shape.decoder_layers * inner * prompt_tokens * dt
    kv_cache = 2 * shape.decoder_layers * inner * eval_batch * cached * dt
    prefill = prompt_tokens * dt * (coef["prefill_h"] * d + coef["prefill_mlp"] * shape.d_ff
                                    + (0 if fused else coef["prefill_scores"] * shape.num_heads * prompt_len))
    terms = (
        Term("weights", weights, f"frozen base, {shape.parameters() / 1e9:.3f}B parameters: {how}", "both"),
        *parameter_terms(recipe, params, param_bytes, grad_copies,
                         f"{grad_copies} gradient cop{'y' if grad_copies == 1 else 'ies'}"),
        Term("encoder_activations", enc_act, f"{enc_layers} encoder layers × {src_tokens:,} source positions × "
                                              f"{dt} B, {'with' if ckpt else 'without'} checkpointing", "train"),
        Term("decoder_activations", dec_act, f"{dec_layers} decoder layers × {tgt_tokens:,} target positions (self "
                                              f"attention, cross attention over {src} source positions) × {dt} B, "
                                              f"{'with' if ckpt else 'without'} checkpointing", "train"),
        Term("logits_loss", logits, logits_doc, "train"),
        Term("encoder_output", encoder_out, f"eval generation: encoder states, batch {eval_batch} × {prompt_len} "
                                            "source positions (held while decoding)", "eval"),
        # The encoder pass ends before decoding starts: only the larger of the two sub-phases counts.
        Term("prefill", prefill, f"eval, encoder pass: one encoder layer's forward over batch {eval_batch} × "
                                 f"{prompt_len} source positions", "eval:encode"),
        Term("cross_kv", cross_kv, f"eval, decoding: cross-attention K/V of {shape.decoder_layers} decoder layers "
                                   f"over the {prompt_len} source positions", "eval:decode"),
        Term("kv_cache", kv_cache, f"eval, decoding: self-attention KV, 2 × {shape.decoder_layers} layers × "
                                   f"{inner} × batch {eval_batch} × {cached} positions ({new_tokens} new)",
             "eval:decode"),
        overhead_term(target),
    )
    settings = {"backend": backend, "batch_size": batch, "grad_accum": accum, "effective_batch": batch * accum,
                "grad_checkpoint": ckpt, "seq_len": seq_len, "target_len": target_len, "source_positions": src,
                "target_positions": tgt, "eval_batch_size": eval_batch, "prompt_len": prompt_len,
                "max_new_tokens": new_tokens, "optimizer": recipe.train.optimizer,
                "quantize_bits": recipe.model.quantize_bits, "peft": recipe.peft.method,
                "adapted_layers": {"encoder": enc_layers, "decoder": dec_layers}}
    return Plan(terms, settings, shape, target, budget)


Shape = Seq2SeqShape  # every task module names its shape class Shape (trmlx.plan.tasks reads it)


def fit(recipe: Recipe, backend: str, shape: Seq2SeqShape, target: Target, budget: float) -> tuple[Plan, list[Plan]]:
    """The causal rule: the largest micro-batch (and checkpointing only if needed) whose training peak fits."""
    return fit_micro_batch(plan_memory, recipe, backend, shape, target, budget)


apply = apply_batch  # what fit chose goes into the recipe as micro-batch, grad_accum and checkpointing
