"""A tiny, deterministic mT5-style encoder-decoder built offline, for the seq2seq quickstarts and tests.

Gated-GELU feed-forward (wi_0, wi_1, wo) and an untied head like mT5 / T5 v1.1, relative position buckets, and a
byte-level BPE tokenizer trained on the shipped Turkish text that appends </s> like T5's. numpy + tokenizers only.

    python -m trmlx.tiny.t5 recipes/models/tiny-mt5-tr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from trmlx.tiny.tokenizer import EOS, PAD, SPECIAL_TOKENS, save_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_DATA = ("recipes/data/tr_news_summary", "recipes/data/tr_reading_qa", "recipes/data/tr_legal_qa")
TEXT_FIELDS = ("text", "summary", "context", "question", "answer", "source", "target")


def shipped_texts(folders: Sequence[str | Path]) -> list[str]:
    """All text fields of the folders' JSONL files, in sorted file order."""
    texts: list[str] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    texts.extend(str(row[k]) for k in TEXT_FIELDS if isinstance(row.get(k), str) and row[k])
    if not texts:
        raise ValueError(f"no text in {', '.join(map(str, folders))}")
    return texts


def t5_tokenizer(texts: list[str], vocab_size: int) -> "PreTrainedTokenizerFast":
    """The tiny byte-level BPE, with T5's conventions: no BOS, </s> appended to every sequence, pad = 0."""
    from tokenizers import processors

    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, SPECIAL_TOKENS.index(EOS))])
    tokenizer.chat_template = None
    return tokenizer


def t5_config(vocab_size: int, d_model: int, d_ff: int, num_layers: int, num_heads: int) -> dict:
    return {
        "architectures": ["MT5ForConditionalGeneration"], "model_type": "mt5", "torch_dtype": "float32",
        "vocab_size": vocab_size, "d_model": d_model, "d_kv": d_model // num_heads, "d_ff": d_ff,
        "num_layers": num_layers, "num_decoder_layers": num_layers, "num_heads": num_heads,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": True,
        "pad_token_id": SPECIAL_TOKENS.index(PAD), "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "decoder_start_token_id": SPECIAL_TOKENS.index(PAD),
    }


def t5_weights(config: dict, seed: int = 0) -> dict:
    """HF T5 parameter names; normal(0, 1/sqrt(fan_in)) matrices so signals keep unit scale (T5 has no
    attention scaling), norms at 1, drawn in a fixed order from one seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, ff, inner = config["d_model"], config["d_ff"], config["num_heads"] * config["d_kv"]

    def normal(out_dim: int, in_dim: int, std: float | None = None) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * (in_dim ** -0.5 if std is None else std)).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones(d, dtype=np.float32)

    weights = {"shared.weight": normal(config["vocab_size"], d, std=1.0)}
    for stack in ("encoder", "decoder"):
        for i in range(config["num_layers"]):
            p = f"{stack}.block.{i}.layer."
            attention = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
            for j, kind in enumerate(attention):
                for name in "qkv":
                    weights[f"{p}{j}.{kind}.{name}.weight"] = normal(inner, d)
                weights[f"{p}{j}.{kind}.o.weight"] = normal(d, inner)
                if i == 0 and kind == "SelfAttention":
                    weights[f"{p}{j}.{kind}.relative_attention_bias.weight"] = normal(
                        config["relative_attention_num_buckets"], config["num_heads"], std=0.1)
                weights[f"{p}{j}.layer_norm.weight"] = ones()
            f = len(attention)
            weights[f"{p}{f}.DenseReluDense.wi_0.weight"] = normal(ff, d)
            weights[f"{p}{f}.DenseReluDense.wi_1.weight"] = normal(ff, d)
            weights[f"{p}{f}.DenseReluDense.wo.weight"] = normal(d, ff)
            weights[f"{p}{f}.layer_norm.weight"] = ones()
        weights[f"{stack}.final_layer_norm.weight"] = ones()
    weights["lm_head.weight"] = normal(config["vocab_size"], d)
    return weights


def build_tiny_t5(out_dir: str | Path, texts: list[str], *, vocab_size: int = 1024, d_model: int = 64,
                  d_ff: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files (untrained weights) into out_dir."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = t5_tokenizer(texts, vocab_size)
    tokenizer.model_max_length = 512
    config = t5_config(vocab_size, d_model, d_ff, num_layers, num_heads)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(t5_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    save_tokenizer(tokenizer, out)
    config_path = out / "tokenizer_config.json"  # no chat template for T5
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m trmlx.tiny.t5", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The cwd's data folders, else those beside the package in a source checkout.
    folders = [Path(d) if Path(d).is_dir() else Path(__file__).resolve().parents[2] / d for d in DEFAULT_DATA]
    out = build_tiny_t5(args.out_dir, shipped_texts(folders), seed=args.seed)
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return out


if __name__ == "__main__":
    main()
