"""The tiny models' byte-level BPE tokenizer (Llama's conventions: BOS first, EOS closes each chat turn), trained
deterministically, and saved in a form transformers 4.x and 5.x both load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order
PAD, BOS, EOS, UNK = SPECIAL_TOKENS

# Role-tagged turns, each closed by EOS so a fine-tuned model learns to stop; BOS once at the start because
# apply_chat_template tokenizes with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> "PreTrainedTokenizerFast":
    """Byte-level BPE (no normalizer), so every string, Turkish ş ğ ı İ included, round-trips exactly and nothing
    is ever <unk>. Texts are sorted first: the trainer only sees counts, but sorting makes that independent of the
    caller's order too. BOS is prepended to single sequences like Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(sorted(texts), trainer=trainer)
    ids = [core.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..3")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, chat_template=CHAT_TEMPLATE)


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out_dir: str | Path) -> None:
    """tokenizer.json plus a fixed tokenizer_config.json, not save_pretrained: transformers 5 writes
    tokenizer_class "TokenizersBackend" (which 4.x cannot load) and a version-dependent config. This form loads
    with AutoTokenizer in 4.x and 5.x, chat template inline, and its bytes depend on the tokenizers version only."""
    out = Path(out_dir)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "unk_token": UNK, "model_max_length": tokenizer.model_max_length, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
