"""Every recipe field, its type, default and one-line doc — the single source for validation, `--help` and
`trmlx recipe explain`. Backends read these frozen dataclasses; nothing else holds a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union


def doc(default: Any, text: str, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A dataclass field with its documentation (and optional numeric range) stored beside the default."""
    meta = {"doc": text, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


TaskKind = Literal["causal", "seq2seq", "embedding"]
PeftMethod = Literal["lora", "dora", "prefix", "prompt", "full"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("", "Hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or model directory, relative to the recipe file.")
    quantize_bits: Literal[0, 2, 3, 4, 5, 6, 8] = doc(0, "Quantise the frozen base at load: 0 = off, 4 = QLoRA.")
    quant_group_size: Literal[32, 64, 128] = doc(64, "Weights sharing one scale (MLX affine quantisation).")
    quant_mode: Literal["auto", "affine", "mxfp4", "nvfp4", "mxfp8", "nf4", "fp4", "int8"] = doc(
        "auto", "Quantisation scheme: auto = affine on MLX, nf4 (4-bit) / int8 (8-bit) on CUDA."
    )
    double_quant: bool = doc(True, "CUDA: bitsandbytes double quantisation of the scales (~0.4 bit/weight saved).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "auto", "Compute dtype. auto: MLX keeps the checkpoint's dtype; CUDA uses bf16 where the GPU has it, else "
                "fp16 with loss scaling (fp32 for T5, which overflows in fp16)."
    )
    trust_remote_code: bool = doc(False, "Allow model code from the hub (transformers trust_remote_code).")


@dataclass(frozen=True)
class TaskConfig:
    """One task of a multitask mixture (seq2seq summarise + QA, say)."""

    name: str = doc("", "Task name used in logs and per-task metrics, e.g. summarize or qa.")
    train: Union[str, list[str]] = doc("", "Training file(s) of this task, relative to the recipe file.")
    valid: Union[str, list[str]] = doc("", "Validation file(s) of this task.")
    test: Union[str, list[str]] = doc("", "Test file(s) of this task.")
    columns: dict[str, str] = doc({}, "Map from role (input, target, ...) to column name in this task's files.")
    template: str = doc("", "Text with {column} placeholders; empty = the data section's template.")
    prefix: str = doc("", "Task prefix put before the input, e.g. 'summarize: ' for T5.")
    weight: float = doc(0.0, "Sampling weight in the mixture; 0 = use the data section's mixture rule.", minimum=0)
    upsample: float = doc(1.0, "Repeat this task's training rows this many times (2.0 doubles QA).", minimum=0)
    metrics: list[str] = doc([], "Metrics for this task; empty = the eval section's metrics.")
    min_target_chars: int = doc(0, "Drop rows whose target is shorter than this (e.g. 3 for tiny QA answers).",
                                minimum=0)
    min_input_chars: int = doc(0, "Drop rows whose input is shorter than this (e.g. 50 for QA contexts).", minimum=0)


@dataclass(frozen=True)
class DataConfig:
    train: Union[str, list[str]] = doc("", "Training file(s): .jsonl .json .csv .tsv .parquet or a save_to_disk dir.")
    valid: Union[str, list[str]] = doc("", "Validation file(s); empty = split off valid_ratio of train.")
    test: Union[str, list[str]] = doc("", "Test file(s); empty = split off test_ratio of train.")
    dataset: str = doc("", "Hub dataset (e.g. wmt16, from the cache when offline) or a local folder in hub layout "
                           "(data/train-*.parquet, validation-*, test-*), instead of data.train files.")
    dataset_config: str = doc("", "Hub dataset config, e.g. tr-en.")
    dataset_split: str = doc("train", "Dataset split that becomes the training data.")
    dataset_valid_split: str = doc("auto", "Dataset split that becomes validation unless data.valid is given; auto = "
                                           "validation, valid or dev if the dataset has one; \"\" = none.")
    dataset_test_split: str = doc("auto", "Dataset split that becomes the test data (trmlx eval) unless data.test is "
                                          "given; auto = test if the dataset has one; \"\" = none.")
    columns: dict[str, str] = doc(
        {}, "Map from role to column, e.g. {source = 'en', target = 'tr'}; a dotted path reaches into nested "
            "fields ('translation.en'); a target holding a list (answers.text) trains on the first, scores on all."
    )
    template: str = doc("", "Input text with {column} placeholders, e.g. 'Translate to Turkish: {source}' or "
                            "'{translation.en}'; empty = the source/input column as it is.")
    chat: bool = doc(False, "Format prompts with the tokenizer's chat template (causal).")
    system_prompt: str = doc("", "System message for chat formatting.")
    max_length: int = doc(512, "Longest tokenised example (prompt + target for causal; input for seq2seq).",
                          minimum=8)
    max_target_length: int = doc(128, "Longest tokenised target (seq2seq) and default generation budget.", minimum=1)
    too_long: Literal["truncate", "drop"] = doc("truncate", "What to do with rows longer than max_length.")
    packing: bool = doc(False, "Causal training: place examples side by side in rows of max_length tokens (one "
                               "batch shape, almost no padding); attention stays inside each example, so each "
                               "loss is its unpacked one. RoPE families (llama, mistral, qwen2, qwen3); not with "
                               "prefix or prompt tuning. train.batch_size then counts rows.")
    on_empty: Literal["drop", "error"] = doc("drop", "Rows with an empty or whitespace-only field: drop (counted) "
                                                     "or stop with an error naming file and line.")
    dedup: bool = doc(False, "Remove exact duplicate rows (they are always counted and reported).")
    valid_ratio: float = doc(0.0, "Fraction of train split off for validation when no valid file is given.",
                             minimum=0, maximum=0.5)
    test_ratio: float = doc(0.0, "Fraction of train split off for testing when no test file is given.",
                            minimum=0, maximum=0.5)
    split_seed: int = doc(0, "Seed of the ratio split, so the split is the same on every machine.")
    mixture: Literal["proportional", "temperature", "weights"] = doc(
        "proportional", "How multitask rows are mixed: as found, temperature-smoothed, or by each task's weight."
    )
    temperature: float = doc(2.0, "Mixture temperature: task share ∝ rows^(1/T); 1 = proportional.", minimum=1)
    tasks: list[TaskConfig] = doc([], "Multitask mixture: one [[data.tasks]] table per task.")


@dataclass(frozen=True)
class PeftConfig:
    method: PeftMethod = doc("lora", "lora | dora | prefix (prefix tuning) | prompt (soft prompt) | full fine-tuning.")
    rank: int = doc(16, "LoRA/DoRA rank r.", minimum=1, maximum=1024)
    alpha: float = doc(32.0, "LoRA alpha; the update is scaled by alpha / rank (PEFT's convention, both backends).",
                       minimum=0)
    dropout: float = doc(0.05, "Dropout on the LoRA input.", minimum=0, maximum=0.9)
    targets: Union[str, list[str]] = doc(
        "all-linear", "Module names to adapt (q_proj, v_proj, wi_0, ...) or 'all-linear'."
    )
    layers: int = doc(0, "Adapt only the last N transformer layers; 0 = all.", minimum=0)
    num_virtual_tokens: int = doc(20, "Virtual tokens for prefix and prompt tuning.", minimum=1, maximum=512)
    prefix_projection: bool = doc(False, "Prefix tuning: reparameterise the prefix through an MLP (more stable).")
    prompt_init_text: str = doc("", "Prompt tuning: initialise the soft prompt from this text's embeddings.")
    init_adapter: str = doc(
        "", "Start training from this LoRA/DoRA adapter folder (PEFT, or mlx-lm's adapters.safetensors + "
            "adapter_config.json), relative to the recipe file; its rank, alpha, targets, layers and method replace "
            "the ones above (a note says which changed); optimizer state starts fresh. \"\" = a new adapter.")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = doc(0.0, "Passes over the training data; set epochs or steps, not both.", minimum=0)
    steps: int = doc(0, "Optimizer steps; 0 = derived from epochs (1 epoch if neither is set).", minimum=0)
    batch_size: Union[int, Literal["auto"]] = doc(
        4, 'Examples per micro-batch; "auto" = the largest that fits train.memory_budget (see trmlx plan).',
        minimum=1)
    grad_accum: int = doc(1, "Micro-batches per optimizer step (effective batch = batch_size * grad_accum).",
                          minimum=1)
    lr: float = doc(1e-4, "Peak learning rate.", minimum=0, maximum=1)
    schedule: Literal["cosine", "linear", "constant"] = doc("cosine", "Learning-rate decay after warm-up.")
    warmup_steps: int = doc(0, "Linear warm-up steps from 0 to lr.", minimum=0)
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.", minimum=0)
    optimizer: Literal["adamw", "adafactor", "paged_adamw_8bit"] = doc("adamw", "Optimizer; paged_adamw_8bit is CUDA-only.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 = off.", minimum=0)
    grad_checkpoint: bool = doc(False, "Recompute activations in the backward pass (less memory, ~30% slower).")
    loss_chunk_size: int = doc(
        128, "Target tokens per chunk of the output head and cross-entropy (causal LMs of the Llama / Qwen / "
        "Mistral families, and T5 / mT5 seq2seq models over their decoder's target positions, except T5 prefix "
        "tuning): the head runs over target positions only, chunk by chunk, so the full tokens × vocabulary "
        "logits never exist; same loss and gradients. 128 (measured, benchmarks/results/loss_chunking-cpu.json): at a "
        "152k vocabulary and 4,096 tokens the loss layer takes 0.77 GB on MLX and 0.24 GB on torch instead of 5.0 and "
        "7.5, and steps are 2.3-3.2x faster (mT5's 250k vocabulary: loss_chunking_seq2seq-cpu.json). 0 = one "
        "unchunked head over every position.", minimum=0)
    memory_budget: str = doc("", 'Peak-memory budget, e.g. "16GB": micro-batch, grad_accum and grad_checkpoint are '
                                 'chosen to fit it, keeping the effective batch (trmlx plan); "" = off.')
    effective_batch: int = doc(16, 'Examples per optimizer step kept when batch_size = "auto" (micro-batch × '
                                   'grad_accum).', minimum=1)
    seed: int = doc(0, "Seed for weights init, shuffling and dropout.")
    eval_every: int = doc(200, "Validation loss every N steps; 0 = only at the end.", minimum=0)
    save_every: int = doc(200, "Checkpoint every N steps; 0 = only at the end.", minimum=0)
    log_every: int = doc(10, "Step report every N steps.", minimum=1)
    max_eval_batches: int = doc(25, "Cap on validation batches per evaluation during training.", minimum=1)


@dataclass(frozen=True)
class EvalConfig:
    metrics: list[str] = doc([], "Metrics to report, e.g. ['bleu', 'chrf']; empty = the task kind's defaults.")
    lang: Literal["tr", "en"] = doc("tr", "Language rules for metric normalisation (Turkish casing, punctuation).")
    max_samples: int = doc(500, "Cap on test examples evaluated (per task in multitask recipes); 0 = all.", minimum=0)
    batch_size: int = doc(16, "Examples per batched generation.", minimum=1)
    max_new_tokens: int = doc(128, "Generation budget per example.", minimum=1)
    temperature: float = doc(0.0, "Sampling temperature; 0 = greedy.", minimum=0)
    top_p: float = doc(1.0, "Nucleus sampling threshold.", minimum=0, maximum=1)
    top_k: int = doc(0, "Sample from the k most likely tokens; 0 = off.", minimum=0)
    repetition_penalty: float = doc(1.0, "Penalty > 1 discourages repeated tokens.", minimum=0.5, maximum=3)
    bleu_tokenize: Literal["13a", "intl", "char"] = doc("13a", "sacrebleu tokenizer for BLEU.")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Retrieval-encoder training (task = "embedding"): loss, pooling, prefixes and hard negatives."""

    pooling: Literal["auto", "mean", "cls", "max"] = doc(
        "auto", "Sentence pooling: auto = the model folder's own (mean for a bare HF encoder); BGE uses cls.")
    normalize: bool = doc(True, "The saved model L2-normalises embeddings (cosine = dot product, as FAISS "
                                "IndexFlatIP needs).")
    scale: float = doc(20.0, "MultipleNegativesRankingLoss scale on cosine similarities (1 / temperature).",
                       minimum=0.01, maximum=1000)
    mini_batch_size: int = doc(0, "0 = plain MNRL; N > 0 = cached MNRL (GradCache): all of a batch's texts are "
                                  "negatives, but only N texts go through the model at once.", minimum=0)
    matryoshka_dims: list[int] = doc([], "MatryoshkaLoss over these leading dimensions, e.g. [384, 256, 128, 64]; "
                                         "empty = off.")
    query_prefix: str = doc("", "Text put before every query, e.g. a BGE instruction or 'query: ' for E5.")
    passage_prefix: str = doc("", "Text put before every answer and negative, e.g. 'passage: ' for E5.")
    max_query_length: int = doc(0, "Longest tokenised query; 0 = data.max_length.", minimum=0)
    max_passage_length: int = doc(0, "Longest tokenised answer or negative; 0 = data.max_length.", minimum=0)
    negatives: Literal["auto", "none", "explicit", "mined", "random"] = doc(
        "auto", "Hard negatives: explicit (the data's), mined (with the base model), random (other answers) or none "
                "(in-batch only); auto = the data's where a row has them, mined for the other rows.")
    num_negatives: int = doc(3, "Hard negatives per query (explicit lists are cut to this many).", minimum=1,
                             maximum=64)
    mine_skip: int = doc(2, "Mining: skip this many top-ranked other answers (often unlabelled positives).",
                         minimum=0)
    mine_margin: float = doc(0.95, "Mining: a negative may score at most this fraction of the positive's score.",
                             minimum=0, maximum=1)
    mine_depth: int = doc(50, "Mining: negatives come from this many top-ranked other answers.", minimum=1)
    top_k: int = doc(10, "Answers per query in eval predictions and `trmlx search` output.", minimum=1)


@dataclass(frozen=True)
class Recipe:
    task: TaskKind = doc("causal", "causal (decoder LM) | seq2seq (T5/mT5) | embedding (retrieval encoder).")
    name: str = doc("", "Run name; default is the recipe file's name.")
    description: str = doc("", "Free text shown in `trmlx check`.")
    model: ModelConfig = doc(ModelConfig(), "The base model and how it is loaded.")
    data: DataConfig = doc(DataConfig(), "Where the data is and how rows become examples.")
    peft: PeftConfig = doc(PeftConfig(), "Parameter-efficient method and its settings.")
    train: TrainConfig = doc(TrainConfig(), "Optimisation and checkpointing.")
    eval: EvalConfig = doc(EvalConfig(), "Evaluation metrics and generation settings.")
    embedding: EmbeddingConfig = doc(EmbeddingConfig(), "Embedding (retrieval) training: loss, pooling, prefixes, "
                                                        "hard negatives.")
    backend: dict[str, Any] = doc(
        {}, "Per-backend overrides: [backend.mlx.train] batch_size = 2 applies only with --backend mlx."
    )

    def embedding_lengths(self) -> tuple[int, int]:
        """(query, passage) token limits: the embedding section's, where 0 means data.max_length."""
        emb, default = self.embedding, self.data.max_length
        return emb.max_query_length or default, emb.max_passage_length or default


BACKEND_NAMES = ("mlx", "cuda")  # the one list of backends: folders under backends/, --backend choices

# The row layouts each task kind accepts, tried in order: a layout applies when all its roles have a column.
TASK_LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "causal": (("source", "target"), ("prompt", "completion"), ("messages",)),
    "seq2seq": (("input", "target"),),
    "embedding": (("query", "positive"),),
}
# Roles a layout may also use when present.
OPTIONAL_ROLES: dict[str, tuple[str, ...]] = {"causal": (), "seq2seq": ("task",), "embedding": ("negatives",)}
# Column names tried for a role when data.columns does not name one (users' existing files, unchanged).
ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "query": ("query", "question", "anchor"),
    "positive": ("positive", "answer", "pos"),
    "negatives": ("negatives", "neg"),
}
