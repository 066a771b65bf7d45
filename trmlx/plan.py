"""`trmlx plan`: predicted peak memory of a recipe on a backend, term by term, and the settings that fit a budget.

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

`resolve_batch` is the one place where `train.batch_size = "auto"` (or a `train.memory_budget`) becomes numbers:
the run's saved recipe holds the chosen micro-batch, grad_accum and grad_checkpoint, and backends only ever see
integers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any

from trmlx.adapters import match_targets
from trmlx.errors import UserError
from trmlx.model_shape import PRESETS, ModelShape, load_shape  # noqa: F401  (re-exported: plan's inputs)
from trmlx.recipe.checks import parse_size
from trmlx.recipe.schema import Recipe

GB = 1e9
PAD_MULTIPLE = 8  # trmlx.data.examples pads batch widths to a multiple of 8
MLX_KV_STEP = 256  # mlx-lm's KVCache grows in blocks of 256 positions

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}

# Measured coefficients, in elements of the activation dtype per token (fitted on fp32 CPU runs; the bytes scale
# with the dtype). h = hidden size, q/kv = query/key-value widths, I = MLP width, heads·T = attention scores
# (T = padded positions; zero where attention is fused, as torch's SDPA is on a GPU).
#   act_*          per layer in the gradient path, kept for the backward pass without checkpointing
#   ckpt_h         per layer with checkpointing. torch: 1.0 = the layer's input, as non-reentrant checkpointing
#                  keeps; MLX: ~16·h — mx.checkpoint on MLX 0.32 (CPU) frees far less than a layer's activations
#   ckpt_layer_*   the one layer live in full while it is recomputed and differentiated
#   logits_fp32    fp32 vocabulary-sized rows per token besides the model-dtype logits (softmax / loss / gradient);
#                  quant_logits_fp32 more when MLX's head is quantised
#   prefill_*      eval generation: one layer's forward over the prompt chunk (no gradients)
# Refit with `python benchmarks/plan_calibration.py` (benchmarks/results/plan_calibration-cpu.json: the data).
CALIBRATION: dict[str, dict[str, float]] = {
    "mlx": {
        "act_h": 0.0, "act_qkv": 4.203, "act_mlp": 7.3, "act_scores": 1.342, "ckpt_h": 16.473, "ckpt_layer_h": 0.0,
        "ckpt_layer_qkv": 0.0, "ckpt_layer_mlp": 9.942, "ckpt_layer_scores": 1.571, "logits_fp32": 1.195,
        "quant_logits_fp32": 0.883, "prefill_h": 5.301, "prefill_mlp": 3.914, "prefill_scores": 1.284},
    "torch": {
        "act_h": 5.652, "act_qkv": 0.741, "act_mlp": 4.145, "act_scores": 0.041, "ckpt_h": 0.767,
        "ckpt_layer_h": 6.644, "ckpt_layer_qkv": 0.0, "ckpt_layer_mlp": 0.223, "ckpt_layer_scores": 0.0,
        "logits_fp32": 1.844, "quant_logits_fp32": 0.0, "prefill_h": 3.908, "prefill_mlp": 4.009,
        "prefill_scores": 0.048},
}
# Not counted by the allocator counters, added before comparing with a budget. Estimates, not measured here
# (no GPU in the calibration runs): CUDA context + cuBLAS workspaces ≈ 0.5 GB plus ~0.1 GB allocator slack;
# Metal ≈ 0.3 GB; on a CPU the Python process with the backend imported (measured: RSS before loading a model).
OVERHEAD_GB = {("torch", "gpu"): 0.6, ("mlx", "gpu"): 0.6, ("mlx", "metal"): 0.3, ("torch", "cpu"): 0.45,
               ("mlx", "cpu"): 0.15}


# ------------------------------------------------------------------------------------------------------ target

@dataclass(frozen=True)
class Target:
    """Where the run would happen: backend family, device kind and activation dtype."""

    backend: str  # mlx | cuda
    kind: str  # cpu | gpu | metal
    compute_dtype: str  # activation dtype: fp32 | bf16 | fp16

    @property
    def family(self) -> str:
        return "mlx" if self.backend == "mlx" else "torch"

    @property
    def act_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute_dtype]

    @property
    def fused_attention(self) -> bool:
        """torch's SDPA on a GPU (flash / memory-efficient kernels) never materialises the score matrix."""
        return self.family == "torch" and self.kind == "gpu"


def detect_kind(backend: str) -> str:
    """The device this machine would run the backend on (imports the backend's framework)."""
    if backend == "cuda":
        try:
            import torch
        except ImportError:
            return "gpu"  # planning for a GPU machine from one without torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    try:
        from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
        import mlx.core as mx
    except ImportError:
        return "metal"
    if mx.metal.is_available():
        return "metal"
    return "gpu" if getattr(mx, "cuda", None) is not None and mx.cuda.is_available() else "cpu"


def make_target(recipe: Recipe, backend: str, shape: ModelShape, kind: str = "auto") -> Target:
    from trmlx.precision import choose_dtype

    kind = detect_kind(backend) if kind == "auto" else kind
    if backend == "mlx":  # MLX computes in model.dtype, auto = the checkpoint's own dtype
        stored = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(shape.storage_dtype, "bf16")
        dtype = stored if recipe.model.dtype == "auto" else recipe.model.dtype
    else:  # bf16 assumed available on a GPU: bf16 and fp16 take the same bytes
        dtype = choose_dtype(recipe.task, recipe.model.dtype, kind == "gpu", on_gpu=kind == "gpu")[0]
    return Target(backend, kind, dtype)


# -------------------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    doc: str
    phase: str  # train | eval | both | overhead


@dataclass(frozen=True)
class Plan:
    terms: tuple[Term, ...]
    settings: dict[str, Any]
    shape: ModelShape
    target: Target
    budget: float | None = None

    def total(self, phase: str) -> float:
        """The phase's terms plus those of "both". Sub-phases ("eval:encode", "eval:decode") happen one after the
        other, so only the largest of them counts."""
        steps: dict[str, float] = {}
        for t in self.terms:
            if t.phase.startswith(phase + ":"):
                steps[t.phase] = steps.get(t.phase, 0.0) + t.bytes
        return sum(t.bytes for t in self.terms if t.phase in (phase, "both")) + max(steps.values(), default=0.0)

    @property
    def train_peak(self) -> float:
        return self.total("train")

    @property
    def eval_peak(self) -> float:
        return self.total("eval")

    @property
    def overhead(self) -> float:
        return sum(t.bytes for t in self.terms if t.phase == "overhead")

    @property
    def peak(self) -> float:
        """The counted peak (what the allocator counters report) plus the overhead they do not see."""
        return max(self.train_peak, self.eval_peak) + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "model": self.shape.describe(), "target": dataclasses.asdict(self.target),
                "terms": [{"name": t.name, "phase": t.phase, "gb": round(t.bytes / GB, 4), "doc": t.doc}
                          for t in self.terms],
                "train_peak_gb": round(self.train_peak / GB, 4), "eval_peak_gb": round(self.eval_peak / GB, 4),
                "overhead_gb": round(self.overhead / GB, 4), "peak_gb": round(self.peak / GB, 4),
                "budget_gb": None if self.budget is None else round(self.budget / GB, 4), "fits": self.fits}


def padded_positions(seq_len: int) -> int:
    """Positions a causal batch of seq_len-token rows computes (inputs are one shorter, padded to 8)."""
    return -(-(seq_len - 1) // PAD_MULTIPLE) * PAD_MULTIPLE


def target_names(shape: ModelShape, targets: str | list[str]) -> list[str]:
    """Paths of the block's linears that peft.targets names (the rule both backends use)."""
    return match_targets(shape.linears(), targets)


def mlx_quantised_bytes(recipe: Recipe, stored: int) -> tuple[float, str]:
    """(bytes per weight, mode) of a weight MLX quantises at load (shared by every task's planner)."""
    model = recipe.model
    mode = "affine" if model.quant_mode == "auto" else model.quant_mode
    return {"mxfp4": 0.5 + 1 / 32, "nvfp4": 0.5 + 1 / 16, "mxfp8": 1 + 1 / 32}.get(
        mode, model.quantize_bits / 8 + 2 * stored / model.quant_group_size), mode  # affine: scale + bias per group


def bnb_4bit_bytes(recipe: Recipe) -> tuple[float, str]:
    """(bytes per weight, nf4|fp4) of a bitsandbytes 4-bit linear: codes + one absmax per 64 weights (fp32, or
    8-bit with an fp32 per 256 absmax when doubled)."""
    model = recipe.model
    return 0.5 + (1 / 64 + 4 / (64 * 256) if model.double_quant else 4 / 64), \
        "fp4" if model.quant_mode == "fp4" else "nf4"


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


def trainable_parameters(recipe: Recipe, shape: ModelShape) -> tuple[int, int]:
    """(trainable parameters, adapted layers in the gradient path)."""
    peft, layers = recipe.peft, shape.num_layers
    if peft.method in ("lora", "dora"):
        adapted = min(peft.layers, layers) if peft.layers else layers
        linears = shape.linears()
        per_layer = sum(peft.rank * (linears[n][0] + linears[n][1]) + (linears[n][1] if peft.method == "dora"
                                                                           else 0)
                        for n in target_names(shape, peft.targets))
        return adapted * per_layer, adapted
    if peft.method == "prompt":
        return peft.num_virtual_tokens * shape.hidden_size, layers
    if peft.method == "prefix":
        return peft.num_virtual_tokens * 2 * layers * shape.kv_dim, layers
    return shape.parameters(), layers


def plan_memory(recipe: Recipe, backend: str, shape: ModelShape, target: Target, *, batch_size: int | None = None,
                grad_accum: int | None = None, grad_checkpoint: bool | None = None, seq_len: int | None = None,
                eval_batch_size: int | None = None, prompt_len: int | None = None,
                max_new_tokens: int | None = None, budget: float | None = None,
                coefficients: dict[str, float] | None = None) -> Plan:
    """The memory plan of one configuration; unset keywords come from the recipe (seq_len: data.max_length, the
    longest batch training can meet; prompt_len: the same, the longest prompt eval can meet). `coefficients`
    replaces CALIBRATION[family] (the calibration script fits them)."""
    train, coef = recipe.train, coefficients or CALIBRATION[target.family]
    batch = batch_size or (train.batch_size if isinstance(train.batch_size, int) else 1)
    accum = grad_accum or train.grad_accum
    ckpt = train.grad_checkpoint if grad_checkpoint is None else grad_checkpoint
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
    optimizer = {"adamw": 2 * param_bytes, "paged_adamw_8bit": 2.0, "adafactor": 0.1 * param_bytes}[train.optimizer]

    fused = target.fused_attention
    per_layer = coef["act_h"] * h + coef["act_qkv"] * (shape.q_dim + 2 * shape.kv_dim) + coef["act_mlp"] * inter \
        + (0.0 if fused else coef["act_scores"] * shape.num_heads * positions)
    recomputed = coef["ckpt_layer_h"] * h + coef["ckpt_layer_qkv"] * (shape.q_dim + 2 * shape.kv_dim) \
        + coef["ckpt_layer_mlp"] * inter + (0.0 if fused else coef["ckpt_layer_scores"] * shape.num_heads * positions)
    with_ckpt = tokens * dt * (grad_layers * coef["ckpt_h"] * h + recomputed)
    without = tokens * dt * grad_layers * per_layer
    activations = with_ckpt if ckpt else without
    act_doc = (f"{grad_layers} layers in the gradient path × {tokens:,} tokens × {dt} B × "
               + (f"{coef['ckpt_h']:g}·h kept per layer + one layer live in full ({recomputed:,.0f} elements per "
                  f"token); without checkpointing: {without / GB:.3f} GB" if ckpt else
                  f"{per_layer:,.0f} elements per token (h, q/k/v, MLP{'' if fused else ', attention scores'}); "
                  f"with checkpointing: {with_ckpt / GB:.3f} GB"))
    quantised_head = target.backend == "mlx" and recipe.model.quantize_bits and h % recipe.model.quant_group_size == 0
    fp32_copies = coef["logits_fp32"] + (coef["quant_logits_fp32"] if quantised_head else 0.0)
    logits = tokens * vocab * (dt + 4 * fp32_copies)  # the head's output in the model dtype + fp32 loss copies

    kv_positions = prompt_len + new_tokens
    if target.backend == "mlx":
        kv_positions = math.ceil(kv_positions / MLX_KV_STEP) * MLX_KV_STEP
    kv_cache = 2 * shape.num_layers * shape.kv_dim * eval_batch * kv_positions * dt
    prefill_tokens = eval_batch * min(prompt_len, 512)
    prefill = prefill_tokens * dt * (coef["prefill_h"] * h + coef["prefill_mlp"] * inter
                                     + (0 if target.fused_attention else
                                        coef["prefill_scores"] * shape.num_heads * min(prompt_len, 512)))
    overhead = OVERHEAD_GB.get((target.family, target.kind), 0.5) * GB
    optimizer_name = train.optimizer
    terms = (
        Term("weights", weights, f"frozen base, {shape.parameters() / 1e9:.3f}B parameters: {how}", "both"),
        Term("adapter", params * param_bytes, f"{params:,} trainable parameters ({recipe.peft.method}) × "
                                              f"{param_bytes} B", "both"),
        Term("gradients", params * param_bytes * grad_copies,
             f"{grad_copies} gradient cop{'y' if grad_copies == 1 else 'ies'} of the trainable parameters", "train"),
        Term("optimizer", params * optimizer, f"{optimizer_name}: {optimizer:g} B per trainable parameter", "train"),
        Term("activations", activations, act_doc, "train"),
        Term("logits_loss", logits, f"{tokens:,} tokens × vocabulary {vocab:,} × (one {dt}-byte logits row + "
                                    f"{fp32_copies:.2f} fp32 rows for softmax / cross-entropy and its gradient)",
             "train"),
        Term("kv_cache", kv_cache, f"eval generation: 2 × {shape.num_layers} layers × {shape.kv_dim} × "
                                   f"batch {eval_batch} × {kv_positions} positions (prompt {prompt_len} + "
                                   f"{new_tokens} new) × {dt} B", "eval"),
        Term("prefill", prefill, f"eval generation: one layer's forward over batch {eval_batch} × "
                                 f"{min(prompt_len, 512)} prompt positions", "eval"),
        Term("overhead", overhead, f"not seen by the allocator counters ({target.family} on {target.kind}): "
                                   "runtime, CUDA context / workspaces; an estimate", "overhead"),
    )
    settings = {"backend": backend, "batch_size": batch, "grad_accum": accum, "effective_batch": batch * accum,
                "grad_checkpoint": ckpt, "seq_len": seq_len, "positions": positions, "eval_batch_size": eval_batch,
                "prompt_len": prompt_len, "max_new_tokens": new_tokens, "optimizer": optimizer_name,
                "quantize_bits": recipe.model.quantize_bits, "peft": recipe.peft.method,
                "adapted_layers": grad_layers}
    return Plan(terms, settings, shape, target, budget)


# Each task's planner, imported when needed ("module:function", the signature of plan_memory; seq2seq adds
# target_len). A task missing here is refused by plan, bench and batch_size = "auto" with a clear error.
PLANNERS = {"causal": "trmlx.plan:plan_memory", "seq2seq": "trmlx.plan_seq2seq:plan_memory"}
PLANNERS["embedding"] = "trmlx.plan_embedding:plan_memory"
# Tasks whose budget fitting is their own (module with fit(...) and apply(recipe, plan)): for MNRL the micro-batch
# is the contrastive batch, so the embedding planner keeps it and chooses checkpointing / cached MNRL instead.
FITTERS = {"embedding": "trmlx.plan_embedding"}


def plan_recipe(recipe: Recipe, backend: str, shape: Any, target: Target, **settings: Any) -> Plan:
    """plan_memory for the recipe's task (settings: plan_memory's keywords)."""
    if recipe.task not in PLANNERS:
        raise UserError(f"task: memory planning covers {', '.join(PLANNERS)} recipes, not {recipe.task}")
    module, name = PLANNERS[recipe.task].split(":")
    return getattr(__import__(module, fromlist=[name]), name)(recipe, backend, shape, target, **settings)


# ------------------------------------------------------------------------------------------------ fit a budget

def fit(recipe: Recipe, backend: str, shape: ModelShape, target: Target, budget: float) -> tuple[Plan, list[Plan]]:
    """The largest micro-batch that divides the effective batch and whose training peak fits, without
    checkpointing if any does, else with it (checkpointing costs ~30% more compute). Returns the choice and every
    plan tried. (Eval generation is planned too, but its batch is eval.batch_size, not chosen here.)"""
    if recipe.task in FITTERS:
        return __import__(FITTERS[recipe.task], fromlist=["fit"]).fit(recipe, backend, shape, target, budget)
    train = recipe.train
    effective = train.effective_batch if train.batch_size == "auto" else train.batch_size * train.grad_accum
    micro = [b for b in range(effective, 0, -1) if effective % b == 0]
    ckpt_options = [True] if train.grad_checkpoint else [False, True]
    mlx_dropout = backend == "mlx" and recipe.peft.dropout and recipe.peft.method in ("lora", "dora")
    if mlx_dropout and not train.grad_checkpoint:
        ckpt_options = [False]  # MLX refuses checkpointing with LoRA dropout (recipe checks)
    tried = []
    for ckpt in ckpt_options:
        for b in micro:
            plan = plan_recipe(recipe, backend, shape, target, batch_size=b, grad_accum=effective // b,
                               grad_checkpoint=ckpt, budget=budget)
            tried.append(plan)
            if plan.train_peak + plan.overhead <= budget:  # eval generation has its own knob (eval.batch_size)
                return plan, tried
    smallest = min(tried, key=lambda p: p.train_peak)
    biggest = max((t for t in smallest.terms if t.phase in ("train", "both")), key=lambda t: t.bytes)
    advice = " (MLX cannot checkpoint with LoRA dropout: set peft.dropout = 0 to allow it)" if mlx_dropout else ""
    raise UserError(f"train.memory_budget: nothing fits {budget / GB:.1f} GB: the smallest setting (micro-batch 1, "
                    f"grad_checkpoint = {str(smallest.settings['grad_checkpoint']).lower()}) needs "
                    f"{(smallest.train_peak + smallest.overhead) / GB:.2f} GB, most of it {biggest.name} "
                    f"({biggest.bytes / GB:.2f} GB); "
                    f"try model.quantize_bits = 4, a shorter data.max_length or fewer peft.layers{advice}")


def resolve_batch(recipe: Recipe, backend: str, kind: str = "auto", quiet: bool = False) -> Recipe:
    """`train.batch_size = "auto"` or a `train.memory_budget`: choose micro-batch, grad_accum and checkpointing
    that fit the budget and return the recipe with those integers (the one place this happens)."""
    train = recipe.train
    if train.batch_size != "auto" and not train.memory_budget:
        return recipe
    if not train.memory_budget:
        raise UserError('train.batch_size: "auto" needs a memory budget: set train.memory_budget = "16GB" or '
                        "pass --fit-budget 16GB")
    if recipe.task not in PLANNERS:
        raise UserError(f"train.memory_budget: memory planning covers {', '.join(PLANNERS)} recipes; set "
                        f"train.batch_size to a number for this {recipe.task} recipe")
    budget = parse_size(train.memory_budget, "train.memory_budget")
    shape = load_shape(recipe)
    target = make_target(recipe, backend, shape, kind)
    plan, _ = fit(recipe, backend, shape, target, budget)
    s = plan.settings
    chosen = dataclasses.replace(train, batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                                 grad_checkpoint=s["grad_checkpoint"])
    if not quiet:
        cached = f", embedding.mini_batch_size {s['mini_batch_size']}" if "mini_batch_size" in s else ""
        print(f"trmlx: memory budget {budget / GB:.1f} GB: micro-batch {s['batch_size']} × grad_accum "
              f"{s['grad_accum']}, grad_checkpoint {'on' if s['grad_checkpoint'] else 'off'}{cached} (planned peak "
              f"{plan.peak / GB:.2f} GB on {target.backend}/{target.kind})", file=sys.stderr)
    if recipe.task in FITTERS:  # the task's own knobs (embedding: the cached-MNRL mini-batch) go in the recipe too
        return __import__(FITTERS[recipe.task], fromlist=["apply"]).apply(recipe, plan)
    return dataclasses.replace(recipe, train=chosen)
