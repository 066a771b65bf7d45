"""`trmlx bench` for embedding recipes (bench.BENCH_TASKS["embedding"]): the workers and the plan settings.

  trmlx                  trmlx's own path: the backend's embed module (trmlx.backends.<b>.embed) load + train_loop
                         on synthetic (query, positive, negatives) rows — MNRL with in-batch and hard negatives,
                         cached MNRL when embedding.mini_batch_size is set — then timed encoding of passages
  sentence-transformers  the peer: SentenceTransformerTrainer + MultipleNegativesRankingLoss (Cached… when
                         mini_batch_size is set) on the same rows, model, batch and lengths

sentence-transformers is the tool people fine-tune retrieval encoders with today on a Kaggle GPU (CUDA) and on a
Mac (torch on MPS): it is the peer for both backends, and one measurement per configuration serves both. On a
machine without a GPU both sides run on the CPU.

Rows: random texts of whole-word vocabulary tokens, exactly query_len tokens per query and passage_len per
passage with the special tokens (no padding, no truncation on either side), every text distinct (so no in-batch
duplicate is skipped). Every token is trained (contrastive training back-propagates through all of them).
FLOPs per step: 6·N per token for full fine-tuning, 4·N for LoRA (no weight gradients of the frozen base), N =
the blocks' linear weights (embedding lookups are no matmuls), plus the attention products (QKᵀ and AV,
4·T·h per token per layer forward, × the same 3 or 2); cached MNRL's extra forward pass is not counted (as
checkpointing's recompute is not).

    python -m trmlx.bench.harness trmlx.bench.embedding:NAME SPEC.json RESULT.json
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from trmlx.bench.causal import _trainable_parameters, bench_overrides
from trmlx.bench.harness import Probe, max_rss, measure_matmul, profiled_peak, time_training, trial_times

ROWS = ("synthetic (query, positive, num_negatives hard negatives): exactly query_len / passage_len (= --seq-len) "
        "tokens per text, all trained")


# ----------------------------------------------------------------------------------------------------- the rows

def word_pool(tokenizer: Any, size: int = 2000) -> list[str]:
    """Vocabulary entries that tokenise to exactly one token on their own (whole alphabetic words)."""
    special = set(tokenizer.all_special_tokens)
    pool = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = token.lstrip("▁Ġ")
        if token in special or not word.isalpha() or not word.islower() or len(word) < 3:
            continue
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            pool.append(word)
            if len(pool) == size:
                break
    return pool


def synthetic_rows(spec: dict[str, Any], tokenizer: Any) -> list[tuple[str, str, list[str]]]:
    """(query, positive, negatives) rows of exact token lengths, enough for every step, all texts distinct."""
    import numpy as np

    pool = word_pool(tokenizer)
    rng = np.random.default_rng(spec["seed"])
    special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    seen: set[str] = set()

    def text(length: int) -> str:
        while True:
            words = " ".join(pool[i] for i in rng.integers(0, len(pool), max(length - special, 1)))
            if words not in seen and len(tokenizer(words)["input_ids"]) == length:
                seen.add(words)
                return words

    count = spec["batch_size"] * spec["grad_accum"] * spec["total_steps"]
    return [(text(spec["query_len"]), text(spec["passage_len"]),
             [text(spec["passage_len"]) for _ in range(spec["num_negatives"])]) for _ in range(count)]


def embed_overrides(spec: dict[str, Any]) -> list[str]:
    return [*bench_overrides(spec), f"embedding.max_query_length={spec['query_len']}",
            f"embedding.max_passage_length={spec['passage_len']}", f"embedding.num_negatives={max(spec['num_negatives'], 1)}",
            f"embedding.mini_batch_size={spec['mini_batch_size']}", "embedding.matryoshka_dims=[]",
            'embedding.query_prefix=""', 'embedding.passage_prefix=""']


def step_flops(spec: dict[str, Any], shape: Any, full: bool) -> float:
    """Model FLOPs of one optimizer step (module docstring)."""
    per_pass = 6 if full else 4
    texts = [(spec["query_len"], 1), (spec["passage_len"], 1 + spec["num_negatives"])]
    rows = spec["batch_size"] * spec["grad_accum"]
    h, linear = shape.hidden_size, shape.num_layers * shape.block_linear_parameters()
    return sum(rows * count * t * per_pass / 2 * (2 * linear + 4 * t * h * shape.num_layers) for t, count in texts)


def _shape(spec: dict[str, Any]) -> Any:
    import json

    from trmlx.plan.embedding import EncoderShape

    return EncoderShape.from_config(json.loads((Path(spec["model_dir"]) / "config.json").read_text()))


# ------------------------------------------------------------------------------------------------------ workers

def worker_trmlx(spec: dict[str, Any]) -> dict[str, Any]:
    """trmlx's embed load + train_loop on the synthetic rows, then timed encoding (the workers' raw format)."""
    from trmlx.backend import get_embedding_backend
    from trmlx.embedding.examples import EmbeddingExample
    from trmlx.recipe import load_recipe

    module = get_embedding_backend(spec["backend"])
    probe = Probe(spec["backend"])
    recipe = load_recipe(spec["recipe"], embed_overrides(spec), backend=spec["backend"])
    matmul = measure_matmul(spec["backend"]) if spec.get("measure_matmul") else None
    rss_before = max_rss()
    gc.collect()
    baseline = probe.active()  # what this process held before (other configurations, in tests): not ours
    start = time.perf_counter()
    model = module.load(recipe, train=True)
    load_s = time.perf_counter() - start
    model_bytes = probe.active()
    tokenizer = model.encoder.tokenizer if spec["backend"] == "mlx" else model.model.tokenizer
    rows = synthetic_rows(spec, tokenizer)
    examples = [EmbeddingExample(q, p, tuple(n)) for q, p, n in rows]
    train_steps = spec["warmup"] + spec["steps"] * spec["trials"]
    with tempfile.TemporaryDirectory() as run_dir:
        reports = module.train_loop(model, recipe, examples, [], Path(run_dir))
        step_seconds, losses, train_peak = time_training(reports, probe, train_steps)
    train_peak -= baseline
    gc.collect()
    texts = [p for _, p, _ in rows[: 4 * spec["eval_batch_size"]]]
    encode = lambda: model.encode(texts, spec["passage_len"], spec["eval_batch_size"])  # noqa: E731
    seconds = []
    encode()  # warm-up
    for _ in range(spec["trials"]):
        begin = probe.clock()
        encode()
        seconds.append(probe.clock() - begin)
    _, enc_peak = probe.peak_of(encode)
    net = model.encoder.model if spec["backend"] == "mlx" else model.model
    shape = _shape(spec)
    per_step = spec["batch_size"] * spec["grad_accum"] * (spec["query_len"]
                                                          + (1 + spec["num_negatives"]) * spec["passage_len"])
    return {"step_seconds": step_seconds, "trial_seconds": trial_times(step_seconds, spec), "losses": losses,
            "load_seconds": load_s, "load_peak_memory_gb": None, "model_memory_gb": (model_bytes - baseline) / 1e9,
            "baseline_memory_gb": baseline / 1e9, "forward_positions_per_step": per_step,
            "trained_tokens_per_step": per_step, "flops_per_step": step_flops(spec, shape, recipe.peft.method == "full"),
            "peak_memory_gb": train_peak / 1e9, "memory_kind": probe.counter(), "rss_peak_gb": max_rss() / 1e9,
            "rss_before_load_gb": rss_before / 1e9,
            "generation": {"texts": [len(texts)], "seconds": seconds, "peak_memory_gb": (enc_peak - baseline) / 1e9,
                           "batch_size": spec["eval_batch_size"], "passage_len": spec["passage_len"]},
            "device_kind": probe.kind, "matmul": matmul,
            "setup": {"dtype": model.dtype, "grad_checkpoint": recipe.train.grad_checkpoint,
                      "grad_accum": recipe.train.grad_accum, "optimizer": recipe.train.optimizer,
                      "mini_batch_size": recipe.embedding.mini_batch_size, "peft": recipe.peft.method,
                      "num_negatives": spec["num_negatives"],
                      "trainable_parameters": _trainable_parameters(net, spec["backend"])}}


def worker_sentence_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """The peer: SentenceTransformerTrainer with (Cached)MultipleNegativesRankingLoss on the same rows; step time
    between the trainer's step-end callbacks (data collation included, as in trmlx's loop)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from transformers import TrainerCallback

    from trmlx.backends.cuda.device import cpu_math
    from trmlx.backends.cuda.embed import st_modules
    from trmlx.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], embed_overrides(spec), backend="cuda")
    probe = Probe("cuda")
    cpu_math()  # the same denormal flushing trmlx's torch backend sets (LR warm-up on a CPU)
    start = time.perf_counter()
    model = SentenceTransformer(spec["model_dir"], device="cuda" if probe.gpu else "cpu")
    model.max_seq_length = spec["passage_len"]  # queries are exactly query_len tokens: never truncated
    load_s = time.perf_counter() - start
    rows = synthetic_rows(spec, model.tokenizer)
    columns = {"anchor": [q for q, _, _ in rows], "positive": [p for _, p, _ in rows]}
    for k in range(spec["num_negatives"]):
        columns[f"negative_{k + 1}"] = [n[k] for _, _, n in rows]
    losses = st_modules()[1]
    emb = recipe.embedding
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=emb.scale, mini_batch_size=emb.mini_batch_size)
            if emb.mini_batch_size else losses.MultipleNegativesRankingLoss(model, scale=emb.scale))
    train_steps = spec["warmup"] + spec["steps"] * spec["trials"]
    profiled = 0 if probe.gpu else 2
    clock: list[float] = []
    peaks: list[int] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            probe.reset()
            clock.append(probe.clock())

        def on_step_end(self, *args, **kwargs):
            clock.append(probe.clock())

    class Trainer(SentenceTransformerTrainer):
        def training_step(self, *args, **kwargs):  # the last steps under the profiler on a CPU (no counters)
            if self.state.global_step >= train_steps:
                out, peak = profiled_peak(lambda: super(Trainer, self).training_step(*args, **kwargs))
                peaks.append(peak)
                return out
            return super().training_step(*args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        args = Args(output_dir=tmp, per_device_train_batch_size=spec["batch_size"],
                    gradient_accumulation_steps=spec["grad_accum"], learning_rate=recipe.train.lr,
                    max_steps=train_steps + profiled, warmup_steps=0, seed=spec["seed"], logging_steps=1,
                    save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
                    gradient_checkpointing=recipe.train.grad_checkpoint,
                    bf16=probe.gpu and torch.cuda.is_bf16_supported(), use_cpu=not probe.gpu)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
                          callbacks=[Clock()])
        trainer.train()
    step_seconds = [b - a for a, b in zip(clock, clock[1:])][:train_steps]
    peak = max(peaks) if peaks else probe.peak()
    per_step = spec["batch_size"] * spec["grad_accum"] * (spec["query_len"]
                                                          + (1 + spec["num_negatives"]) * spec["passage_len"])
    return {"step_seconds": step_seconds, "trial_seconds": trial_times(step_seconds, spec),
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r], "load_seconds": load_s,
            "load_peak_memory_gb": None, "model_memory_gb": None, "forward_positions_per_step": per_step,
            "trained_tokens_per_step": per_step,
            "flops_per_step": step_flops(spec, _shape(spec), recipe.peft.method == "full"),
            "peak_memory_gb": peak / 1e9, "memory_kind": probe.counter(), "rss_peak_gb": max_rss() / 1e9,
            "device_kind": probe.kind,
            "setup": {"dtype": "bf16 autocast" if args.bf16 else "fp32", "grad_checkpoint": args.gradient_checkpointing,
                      "grad_accum": spec["grad_accum"], "optimizer": "adamw (Trainer default)",
                      "mini_batch_size": emb.mini_batch_size, "peft": "full",
                      "num_negatives": spec["num_negatives"],
                      "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}}


# --------------------------------------------------------------------------- the embedding task's bench interface

WORKERS = {"trmlx": worker_trmlx, "sentence-transformers": worker_sentence_transformers}
PEERS = {"mlx": "sentence-transformers", "cuda": "sentence-transformers"}
PEER_NEEDS = {"sentence-transformers": ("sentence_transformers", "datasets", "accelerate", "torch")}


def default_seq_len(recipe: Any) -> int:
    """bench's --seq-len for embedding recipes is the passage length: the recipe's when not given."""
    return recipe.embedding_lengths()[1]


def spec_fields(recipe: Any, shape: Any, seq_len: int) -> dict[str, Any]:
    emb = recipe.embedding
    return {"query_len": min(recipe.embedding_lengths()[0], seq_len), "passage_len": seq_len,
            "num_negatives": 0 if emb.negatives == "none" else emb.num_negatives,
            "mini_batch_size": emb.mini_batch_size}


def plan_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """plan_embedding.plan_memory's keywords for exactly the configuration a spec measures."""
    return {"batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"],
            "grad_checkpoint": spec["grad_checkpoint"], "seq_len": spec["passage_len"],
            "query_len": spec["query_len"], "num_negatives": spec["num_negatives"],
            "mini_batch_size": spec["mini_batch_size"], "eval_batch_size": spec["eval_batch_size"]}
