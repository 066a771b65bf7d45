"""A tiny, deterministic Llama built offline: a real HF-format model for the quickstart and the tests.

A new user can run train -> eval -> generate on a laptop CPU in minutes, and tests get a model whose files load in
both transformers and mlx-lm without touching the hub. Everything is seeded and sorted, so the same inputs give
byte-identical files (the committed `recipes/models/tiny-llama-tr` is checked against a rebuild).

Only numpy, safetensors and tokenizers/transformers' tokenizer classes are used: no torch, no mlx.

    python -m trmlx.tiny.llama recipes/models/tiny-llama-tr --data recipes/data/en_tr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from trmlx.tiny.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, save_tokenizer, train_tokenizer

DEFAULT_DATA = "recipes/data/en_tr"


def shipped_texts(data_dir: str | Path) -> list[str]:
    """Every `source` and `target` string of the folder's JSONL files, files in sorted order, so the tokenizer is
    trained on English and Turkish alike and the input order never depends on the filesystem."""
    texts: list[str] = []
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.extend(str(row[key]) for key in ("source", "target") if row.get(key))
    if not texts:
        raise ValueError(f"no source/target text in {data_dir}/*.jsonl")
    return texts


def llama_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, max_position_embeddings: int) -> dict:
    """The HF LlamaConfig fields, spelled out (no transformers_version) so the file does not change with the
    installed transformers."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads, "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": SPECIAL_TOKENS.index(BOS), "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }


def llama_weights(config: dict, seed: int = 0) -> dict:
    """float32 numpy weights under the exact HF Llama names (Linear weights are [out, in]); drawn in a fixed
    order from one seeded generator. Each matrix is normal(0, 1/sqrt(fan_in)) so activations and logits keep unit
    scale in this tiny net: with GPT-style 0.02 the frozen head caps logits near ±1 and LoRA cannot learn."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def normal(out_dim: int, in_dim: int, std: float | None = None) -> np.ndarray:
        scale = in_dim ** -0.5 if std is None else std
        return (rng.standard_normal((out_dim, in_dim)) * scale).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        weights[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, h)
        weights[p + "mlp.up_proj.weight"] = normal(inter, h)
        weights[p + "mlp.down_proj.weight"] = normal(h, inter)
        weights[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        weights[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    weights["model.norm.weight"] = np.ones(h, dtype=np.float32)
    weights["lm_head.weight"] = normal(vocab, h)
    return weights


def build_tiny_llama(out_dir: str | Path, texts: list[str], *, vocab_size: int = 1024, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into out_dir; returns out_dir. Untrained
    (random) weights: the point is a real, fast model to fine-tune, not a good one."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    tokenizer.model_max_length = max_position_embeddings
    config = llama_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_position_embeddings=max_position_embeddings)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(llama_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; the other files are 0644
    save_tokenizer(tokenizer, out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: build the quickstart model (defaults) from the shipped English->Turkish data."""
    parser = argparse.ArgumentParser(prog="python -m trmlx.tiny.llama", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder of JSONL files with source/target fields (default: {DEFAULT_DATA})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = args.data
    if data is None:  # the cwd's copy, else the one beside the package in a source checkout
        data = Path(DEFAULT_DATA)
        if not data.is_dir():
            data = Path(__file__).resolve().parents[2] / DEFAULT_DATA
    out = build_tiny_llama(args.out_dir, shipped_texts(data), seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB): {', '.join(sorted(f.name for f in out.iterdir()))}")
    return out


if __name__ == "__main__":
    main()
