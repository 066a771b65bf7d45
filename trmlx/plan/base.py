"""What every task's planner shares: where the run happens (Target), the plan as terms (Term, Plan), the bytes of a
quantised weight, the trainable-parameter terms, the framework overhead, and the micro-batch search that fits a
budget. Nothing here imports mlx or torch at import time, nor any task's planner."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from trmlx.adapters import match_targets
from trmlx.errors import UserError
from trmlx.recipe.schema import Recipe

GB = 1e9
PAD_MULTIPLE = 8  # trmlx.data.examples pads batch widths to a multiple of 8
MLX_KV_STEP = 256  # mlx-lm's KVCache grows in blocks of 256 positions
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}

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
        return DTYPE_BYTES[self.compute_dtype]

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


def make_target(recipe: Recipe, backend: str, shape: Any, kind: str = "auto") -> Target:
    """The target of a recipe on a backend: the device kind (auto = this machine's) and the activation dtype."""
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
    phase: str  # train | eval | both | overhead; eval:<step> for steps of eval that follow one another


@dataclass(frozen=True)
class Plan:
    terms: tuple[Term, ...]
    settings: dict[str, Any]
    shape: Any  # the task's shape: causal.ModelShape, seq2seq.Seq2SeqShape or embedding.EncoderShape
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


# --------------------------------------------------------------------------------------------- shared arithmetic

def padded(n: int) -> int:
    """Batch widths are padded to a multiple of 8 (trmlx.data.examples)."""
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def kv_positions(positions: int, target: Target) -> int:
    """Positions a KV cache allocates: mlx-lm's grows in blocks of MLX_KV_STEP, torch's exactly."""
    return math.ceil(positions / MLX_KV_STEP) * MLX_KV_STEP if target.backend == "mlx" else positions


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


def loss_fp32_copies(coef: dict[str, float], recipe: Recipe, target: Target, width: int) -> float:
    """fp32 vocabulary-sized rows per token besides the logits (more when MLX's head of that width is quantised)."""
    quantised_head = target.backend == "mlx" and recipe.model.quantize_bits \
        and width % recipe.model.quant_group_size == 0
    return coef["logits_fp32"] + (coef["quant_logits_fp32"] if quantised_head else 0.0)


def trainable_parameters(recipe: Recipe, shape: Any) -> tuple[int, int]:
    """(trainable parameters, adapted layers in the gradient path) of a single stack of identical blocks (a
    decoder or an encoder: shape.num_layers, shape.linears(), shape.parameters())."""
    peft, layers = recipe.peft, shape.num_layers
    if peft.method in ("lora", "dora"):
        adapted = min(peft.layers, layers) if peft.layers else layers
        linears = shape.linears()
        per_layer = sum(peft.rank * (linears[n][0] + linears[n][1]) + (linears[n][1] if peft.method == "dora"
                                                                           else 0)
                        for n in match_targets(linears, peft.targets))
        return adapted * per_layer, adapted
    if peft.method == "prompt":
        return peft.num_virtual_tokens * shape.hidden_size, layers
    if peft.method == "prefix":
        return peft.num_virtual_tokens * 2 * layers * shape.kv_dim, layers
    return shape.parameters(), layers


def parameter_terms(recipe: Recipe, params: int, param_bytes: float, grad_copies: float,
                    grad_doc: str) -> tuple[Term, ...]:
    """The adapter (or fully trained weights), its gradients and the optimizer's state."""
    optimizer = recipe.train.optimizer
    per_parameter = {"adamw": 2 * param_bytes, "paged_adamw_8bit": 2.0, "adafactor": 0.1 * param_bytes}[optimizer]
    return (Term("adapter", params * param_bytes, f"{params:,} trainable parameters ({recipe.peft.method}) × "
                                                  f"{param_bytes:g} B", "both"),
            Term("gradients", params * param_bytes * grad_copies, grad_doc, "train"),
            Term("optimizer", params * per_parameter, f"{optimizer}: {per_parameter:g} B per trainable parameter",
                 "train"))


def overhead_term(target: Target) -> Term:
    return Term("overhead", OVERHEAD_GB.get((target.family, target.kind), 0.5) * GB,
                f"not seen by the allocator counters ({target.family} on {target.kind}): runtime, CUDA context / "
                "workspaces; an estimate", "overhead")


def batch_settings(recipe: Recipe, batch_size: int | None, grad_accum: int | None,
                   grad_checkpoint: bool | None) -> tuple[int, int, bool]:
    """(micro-batch, grad_accum, checkpointing): the keywords given, else the recipe's ("auto" plans batch 1)."""
    train = recipe.train
    batch = batch_size or (train.batch_size if isinstance(train.batch_size, int) else 1)
    return batch, grad_accum or train.grad_accum, train.grad_checkpoint if grad_checkpoint is None \
        else grad_checkpoint


# ------------------------------------------------------------------------------------------------ fit a budget

Planner = Callable[..., Plan]


def fit_micro_batch(plan_memory: Planner, recipe: Recipe, backend: str, shape: Any, target: Target,
                    budget: float) -> tuple[Plan, list[Plan]]:
    """The largest micro-batch that divides the effective batch and whose training peak fits, without
    checkpointing if any does, else with it (checkpointing costs ~30% more compute). Returns the choice and every
    plan tried. (Eval generation is planned too, but its batch is eval.batch_size, not chosen here.)"""
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
            plan = plan_memory(recipe, backend, shape, target, batch_size=b, grad_accum=effective // b,
                               grad_checkpoint=ckpt, budget=budget)
            tried.append(plan)
            if plan.train_peak + plan.overhead <= budget:  # eval generation has its own knob (eval.batch_size)
                return plan, tried
    advice = " (MLX cannot checkpoint with LoRA dropout: set peft.dropout = 0 to allow it)" if mlx_dropout else ""
    raise nothing_fits(tried, budget, "micro-batch 1", "try model.quantize_bits = 4, a shorter data.max_length or "
                                                       f"fewer peft.layers{advice}")


def nothing_fits(tried: list[Plan], budget: float, smallest_setting: str, advice: str, kept: str = "") -> UserError:
    """The error when no setting fits: what was kept, the smallest plan tried, its largest term, what to change."""
    smallest = min(tried, key=lambda p: p.train_peak)
    biggest = max((t for t in smallest.terms if t.phase in ("train", "both") or t.phase.startswith("train:")),
                  key=lambda t: t.bytes)
    return UserError(f"train.memory_budget: nothing fits {budget / GB:.1f} GB{kept}: the smallest setting "
                     f"({smallest_setting}, grad_checkpoint = {str(smallest.settings['grad_checkpoint']).lower()}) "
                     f"needs {(smallest.train_peak + smallest.overhead) / GB:.2f} GB, most of it {biggest.name} "
                     f"({biggest.bytes / GB:.2f} GB); {advice}")


def apply_batch(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with the plan's micro-batch, grad_accum and checkpointing."""
    s = plan.settings
    return dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, batch_size=s["batch_size"], grad_accum=s["grad_accum"], grad_checkpoint=s["grad_checkpoint"]))
