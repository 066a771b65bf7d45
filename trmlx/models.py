"""What a local model folder holds, decided once for every command: its kind (decoder LM, encoder-decoder or
encoder, read from config.json) and whether it is complete (config, weights, tokenizer files).

`generate --model DIR` takes the task from `model_kind`; recipe loading refuses a task that contradicts the model
(`kind_problem`); both backends call `check_model_folder` before they load, so a bad folder is one line naming the
path and what was expected, never a loader's traceback. Only local folders are judged: a hub id is left alone.
Reads headers and JSON only; imports neither mlx nor torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trmlx.errors import UserError
from trmlx.integrity import safetensors_problem

# model_type values of encoder-decoders (transformers' AutoModelForSeq2SeqLM families) and of encoders that have
# no decoder head; everything else with a config is a decoder LM. is_encoder_decoder in a config also counts.
ENCODER_DECODER_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart", "marian", "pegasus", "pegasus_x",
    "m2m_100", "nllb-moe", "fsmt", "blenderbot", "blenderbot-small", "led", "plbart", "prophetnet",
    "bigbird_pegasus", "mvp", "encoder-decoder"})
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "electra", "deberta",
    "deberta-v2", "mpnet", "albert", "modernbert", "nomic_bert", "megatron-bert", "convbert", "ernie", "rembert",
    "roformer", "data2vec-text", "jina_bert", "xmod", "nezha", "esm", "luke", "splinter", "squeezebert", "funnel",
    "mobilebert", "ibert", "yoso", "nystromformer", "mra", "canine"})
DESCRIPTIONS = {"causal": "a decoder LM (causal)", "seq2seq": "an encoder-decoder (seq2seq)",
                "embedding": "an encoder (embedding)"}
NEEDS = {"causal": "a decoder LM (Llama, Qwen, ...)", "seq2seq": "an encoder-decoder (T5, mT5, ...)",
         "embedding": "an encoder (BERT, XLM-R, a sentence-transformers folder)"}
# Files one of which a loadable tokenizer needs (fast, SentencePiece, WordPiece, byte-level BPE, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json", "vocab.model")
DATA_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
FOLDER_HINT = "expected a Hugging Face model folder (config.json, model weights, tokenizer files)"


def transformer_config(folder: Path) -> Path | None:
    """config.json of a sentence-transformers folder whose Transformer module sits in a subfolder
    (modules.json: {"type": "...Transformer", "path": "0_Transformer"}); None when there is none."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sub = next((m.get("path", "") for m in entries if str(m.get("type", "")).endswith("Transformer")), "")
    config = folder / sub / "config.json"
    return config if config.is_file() else None


@dataclass(frozen=True)
class ModelKind:
    """A model's kind (causal | seq2seq | embedding, the recipe task names), its model_type, and whether the
    config said so (`sure`) or the kind is the decoder default for an unknown model_type."""

    kind: str
    model_type: str
    sure: bool = True

    def describe(self) -> str:
        return f"model_type {self.model_type!r}, {DESCRIPTIONS[self.kind]}"


def model_kind(config: dict[str, Any], sentence_transformers: bool = False) -> ModelKind:
    """The kind of model a config.json describes; a sentence-transformers folder is always an encoder."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = str(config.get("model_type") or text.get("model_type") or "")
    architectures = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    if sentence_transformers:
        return ModelKind("embedding", model_type)
    if config.get("is_encoder_decoder") or model_type in ENCODER_DECODER_TYPES:
        return ModelKind("seq2seq", model_type)
    if model_type in ENCODER_TYPES or any(a.endswith("ForMaskedLM") for a in architectures):
        return ModelKind("embedding", model_type)
    decoder = bool(text) or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                for a in architectures)
    return ModelKind("causal", model_type, sure=decoder)


def local_folder(spec: str) -> Path | None:
    """model.path / --model as a local folder, or None when it names no local folder (a hub id, say)."""
    path = Path(spec).expanduser() if spec else None
    return path if path is not None and path.is_dir() else None


def _transformer_dir(folder: Path) -> Path:
    """The folder whose config.json and weights describe the network (a sentence-transformers Transformer module
    may sit in a subfolder such as 0_Transformer)."""
    config = transformer_config(folder)
    return config.parent if config is not None else folder


def read_model_config(folder: Path, key: str = "model.path") -> tuple[dict[str, Any], Path]:
    """(config.json as a dict, its path) of a local model folder; a missing, unreadable or typeless config is a
    one-line UserError naming the path and what was expected."""
    config_path = _transformer_dir(folder) / "config.json"
    if not config_path.is_file():
        data = sorted(p.name for p in folder.iterdir() if p.suffix in DATA_SUFFIXES)[:3]
        seen = f" (it holds {', '.join(data)}: a data folder?)" if data else ""
        if (folder / "adapter_config.json").is_file():  # a PEFT / mlx-lm adapter goes on top of its base model
            seen = " (it holds adapter_config.json: an adapter, which needs its base model; pass it with --adapter)"
        raise UserError(f"{key}: {folder}: no config.json{seen}; {FOLDER_HINT}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not valid JSON"
        raise UserError(f"{key}: {config_path}: cannot read it ({reason}); expected the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}: {config_path}: expected a JSON object, found {type(config).__name__}")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if not (config.get("model_type") or text.get("model_type")):
        raise UserError(f"{key}: {config_path}: no model_type; expected a Hugging Face config.json that names its "
                        "architecture (e.g. \"model_type\": \"llama\")")
    return config, config_path


def folder_kind(folder: Path, key: str = "model.path") -> ModelKind:
    """The kind of the model in a local folder (reads its config.json)."""
    config, _ = read_model_config(folder, key)
    return model_kind(config, sentence_transformers=transformer_config(folder) is not None
                      or (folder / "modules.json").is_file())


def kind_problem(task: str, spec: str) -> str | None:
    """Why a recipe's task contradicts its model (None when they agree, or when the model's config is not on this
    machine or does not say: hub ids are never fetched for this)."""
    folder = local_folder(spec)
    if folder is None:
        return None
    try:
        found = folder_kind(folder)
    except UserError:
        return None  # the loaders report a bad folder with its own message
    if found.kind == task or (found.kind == "causal" and not found.sure):
        return None
    return (f"{spec} is {found.describe()}, but task = \"{task}\" needs {NEEDS[task].split(' (')[0]}; set "
            f"task = \"{found.kind}\" or use {NEEDS[task]}")


def check_model_folder(spec: str, task: str | None = None, key: str = "model.path") -> None:
    """Before a backend loads a local model: config.json readable with a model_type, its kind agreeing with the task,
    complete weights, tokenizer files and a vocab_size the tokenizer fits in. Each failure is one line naming the
    path; hub ids pass through."""
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.exists() and not path.is_dir():
        raise UserError(f"{key}: {spec}: a file; {FOLDER_HINT}")
    folder = local_folder(spec)
    if folder is None:
        return
    kind = folder_kind(folder, key)
    if task is not None and (problem := kind_problem(task, spec)):
        raise UserError(f"{key}: {problem}")
    network = _transformer_dir(folder)
    weights = sorted({*network.glob("*.safetensors"), *folder.glob("*.safetensors")}
                     - {*network.glob("adapter*.safetensors")})
    if not weights and not any(network.glob("pytorch_model*.bin")):
        raise UserError(f"{key}: {folder}: no model weights (model.safetensors or pytorch_model.bin) beside "
                        f"config.json ({kind.describe()})")
    for file in weights:
        if problem := safetensors_problem(file):
            raise UserError(f"{key}: {folder}: {problem}; expected complete weights (download them again)")
    if not any((d / name).is_file() for d in {folder, network} for name in TOKENIZER_FILES) \
            and not any(network.glob("*.tiktoken")):
        raise UserError(f"{key}: {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); expected "
                        "the model's tokenizer beside config.json (save it with tokenizer.save_pretrained)")
    if problem := vocabulary_problem(read_model_config(folder, key)[0], folder, network):
        raise UserError(f"{key}: {folder}: {problem}")


def _ids(entries: Any) -> list[int]:
    """Token ids of a vocabulary in any of its file shapes: {piece: id}, [[piece, score], ...] (Unigram: the
    position is the id) or [{"id": ...}, ...] (added tokens)."""
    if isinstance(entries, dict):
        return [v for v in entries.values() if isinstance(v, int)]
    if isinstance(entries, list):
        return [e["id"] if isinstance(e, dict) and isinstance(e.get("id"), int) else i for i, e in enumerate(entries)]
    return []


def tokenizer_size(*folders: Path) -> int | None:
    """len(tokenizer) of the first folder with tokenizer files, from the files alone (highest id + 1, with added
    tokens): tokenizer.json, else vocab.json / vocab.txt. None when only a SentencePiece or tiktoken model says."""
    for folder in folders:
        ids: list[int] = []
        try:
            if (folder / "tokenizer.json").is_file():
                spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
                ids = _ids((spec.get("model") or {}).get("vocab")) + _ids(spec.get("added_tokens"))
            elif (folder / "vocab.json").is_file():
                ids = _ids(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
            elif (folder / "vocab.txt").is_file():  # WordPiece: one token a line, the line number is the id
                ids = list(range(len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())))
            if not ids:
                continue
            for name, key in (("added_tokens.json", None), ("tokenizer_config.json", "added_tokens_decoder")):
                if (folder / name).is_file():
                    extra = json.loads((folder / name).read_text(encoding="utf-8"))
                    extra = extra.get(key) if key else extra
                    ids += [int(k) for k in extra if k.isdigit()] if key and isinstance(extra, dict) else _ids(extra)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return None  # a tokenizer file this cannot read: the tokenizer's own loader reports it
        if ids:
            return max(ids) + 1
    return None


def vocabulary_problem(config: dict[str, Any], *folders: Path) -> str | None:
    """Why the tokenizer does not fit the model's embedding table: a token id at or past config.json's vocab_size
    has no row (an index error mid-training on CUDA, garbage on MLX). A table larger than the tokenizer is normal
    (padded for speed, as Qwen's)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = config.get("vocab_size", text.get("vocab_size"))
    size = tokenizer_size(*folders)
    if not isinstance(vocab, int) or size is None or size <= vocab:
        return None
    return (f"the tokenizer has {size} tokens but config.json's vocab_size is {vocab} (ids {vocab}-{size - 1} have "
            "no embedding row); expected vocab_size >= the tokenizer's size (a config.json or tokenizer from "
            "another model?)")
