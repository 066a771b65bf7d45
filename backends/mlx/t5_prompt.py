"""Prompt tuning for the MLX T5/mT5 (t5.py) with PEFT's semantics and PEFT's file format (PROMPT_TUNING,
task_type SEQ_2_SEQ_LM), so an adapter trained here loads in torch+peft and the other way round.

What peft 0.21 does (peft_model.py, PeftModelForSeq2SeqLM, checked against the installed code and by running it):
- `num_transformer_submodules` defaults to 2 for SEQ_2_SEQ_LM, so the prompt table (`prompt_embeddings`, what
  adapter_model.safetensors stores) has 2·n rows (n = num_virtual_tokens) and PEFT's init (TEXT: the text's ids
  repeated/truncated to 2·n; SAMPLE_VOCAB) fills all of them.
- forward and generate for PROMPT_TUNING use only rows 0..n-1: they are prepended to the ENCODER's input
  embeddings and the encoder attention mask gets n leading ones (so the decoder's cross attention sees them too).
  The decoder is untouched: decoder_input_ids go in as they are, the decoder attention mask is not extended, no
  labels are prepended and the logits are those of the real decoder positions only. (Only the other prompt-learning
  branch, e.g. multitask prompt tuning, puts rows n..2n-1 before the decoder inputs.) Rows n..2n-1 therefore get
  exactly zero gradient in peft; they are kept here as a trainable part of the table (zero gradient too, so AdamW's
  weight decay touches them as torch's AdamW does) and saved, so the file is the one peft writes.
- generate(): the same encoder prepending and mask extension; decoding starts from decoder_start as usual.

`T5PromptModel` wraps the frozen T5 the way virtual_tokens.VirtualTokenModel wraps a causal LM:
`model(input_ids, attention_mask, decoder_input_ids)` returns logits for the real decoder positions, so the training
loop needs no change, and `encode`/`decode`/`make_cache`/`args` are T5's, so t5_generate.generate_greedy decodes it
as it is. Batches are right-padded (virtual tokens | tokens | padding): a padded row sees exactly what it sees alone
(T5's relative position bias depends only on distances, which right padding leaves alone).

Initialisation (as virtual_tokens, for the whole 2·n table): `prompt_init_text` → PEFT's TEXT init; otherwise
PEFT's SAMPLE_VOCAB init without special tokens (embeddings of sampled real vocabulary tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from trmlx.errors import UserError
from trmlx.recipe.schema import PeftConfig
from trmlx.rundir import atomic_write

from trmlx.backends.mlx.t5 import T5, T5Args, T5Cache
from trmlx.backends.mlx.virtual_tokens import CONFIG_FILE, WEIGHTS_FILE, init_token_ids

PEFT_TYPE = "PROMPT_TUNING"
TASK_TYPE = "SEQ_2_SEQ_LM"
SUBMODULES = 2  # peft's default num_transformer_submodules for SEQ_2_SEQ_LM (encoder and decoder)


class T5PromptModel(nn.Module):
    """A frozen MLX T5 plus PEFT's trainable prompt table; the first n rows go before the encoder inputs."""

    def __init__(self, base: T5, num_virtual_tokens: int, init_text: str = "", submodules: int = SUBMODULES):
        super().__init__()
        base.freeze()
        self.base = base
        self.n, self.submodules, self.init_text = num_virtual_tokens, submodules, init_text
        self.prompt = mx.zeros((num_virtual_tokens * submodules, base.args.d_model))

    @property
    def args(self) -> T5Args:
        return self.base.args

    @property
    def layers(self) -> list[nn.Module]:
        return self.base.layers

    def init_from_tokens(self, ids: list[int]) -> None:
        """The table's rows are the (float32) word embeddings of ids, as PEFT's TEXT / SAMPLE_VOCAB init."""
        self.prompt = self.base.shared(mx.array(ids)).astype(mx.float32)
        mx.eval(self.prompt)

    # --- forward: what PeftModelForSeq2SeqLM.forward / generate do for PROMPT_TUNING ---------------------------

    def embed(self, input_ids: mx.array) -> mx.array:
        """(B, n + S, d_model): the first n prompt rows (in the embeddings' dtype), then the token embeddings."""
        embeds = self.base.shared(input_ids)
        prompt = self.prompt[: self.n].astype(embeds.dtype)[None]
        return mx.concatenate([mx.broadcast_to(prompt, (embeds.shape[0], *prompt.shape[1:])), embeds], axis=1)

    def extend_mask(self, attention_mask: mx.array | None) -> mx.array | None:
        """n leading ones (the virtual tokens are always attended); None stays None (everything attended)."""
        if attention_mask is None:
            return None
        attention_mask = mx.array(attention_mask)
        ones = mx.ones((attention_mask.shape[0], self.n), dtype=attention_mask.dtype)
        return mx.concatenate([ones, attention_mask], axis=1)

    def encode(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Encoder states (B, n + S, d_model) of [virtual tokens | tokens]."""
        return self.base.encode(None, self.extend_mask(attention_mask), inputs_embeds=self.embed(input_ids))

    def decode(self, decoder_input_ids: mx.array, encoder_states: mx.array, attention_mask: mx.array | None = None,
               cache: T5Cache | None = None) -> mx.array:
        """T5.decode over `encode`'s states; attention_mask is the real tokens' mask (extended here)."""
        return self.base.decode(decoder_input_ids, encoder_states, self.extend_mask(attention_mask), cache)

    def make_cache(self) -> T5Cache:
        return self.base.make_cache()

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 decoder_input_ids: mx.array | None = None) -> mx.array:
        """Training forward: logits (B, T, vocab) of the real decoder positions (the decoder has no virtual ones)."""
        return self.base.head(self.train_states(input_ids, attention_mask, decoder_input_ids))

    def train_states(self, input_ids: mx.array, attention_mask: mx.array | None,
                     decoder_input_ids: mx.array | None) -> mx.array:
        """T5.train_states with the virtual tokens before the encoder inputs: what the head takes."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (the targets shifted right; see shift_right)")
        return self.base.decoder_states(decoder_input_ids, self.encode(input_ids, attention_mask),
                                        self.extend_mask(attention_mask))

    # --- PEFT format --------------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, np.ndarray]:
        return {"prompt_embeddings": np.ascontiguousarray(np.array(self.prompt.astype(mx.float32)))}

    def peft_config(self, base_model: str) -> dict[str, Any]:
        """adapter_config.json as peft 0.21 writes it for PromptTuningConfig(task_type="SEQ_2_SEQ_LM")."""
        args, text = self.base.args, bool(self.init_text)
        return {"peft_type": PEFT_TYPE, "task_type": TASK_TYPE, "base_model_name_or_path": base_model,
                "num_virtual_tokens": self.n, "token_dim": args.d_model,
                "num_layers": len(self.base.encoder.block),  # config num_layers, peft's num_hidden_layers
                "num_attention_heads": args.num_heads, "num_transformer_submodules": self.submodules,
                "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None,
                "prompt_tuning_init": "TEXT" if text else "SAMPLE_VOCAB",
                "prompt_tuning_init_text": self.init_text or None,
                "tokenizer_name_or_path": base_model if text else None, "tokenizer_kwargs": None}

    def peft_settings(self) -> PeftConfig:
        return PeftConfig(method="prompt", num_virtual_tokens=self.n, prompt_init_text=self.init_text)


def attach(model: T5, config: dict[str, Any], peft: PeftConfig, tokenizer: Any) -> T5PromptModel:
    """A new prompt-tuning adapter on a freshly loaded T5, its whole 2·n table initialised from real tokens."""
    if peft.method != "prompt":
        raise UserError(f"peft.method: {peft.method} tuning of T5 models is not available in the MLX backend; use "
                        "prompt, lora or dora (or --backend cuda)")
    wrapped = T5PromptModel(model, peft.num_virtual_tokens, init_text=peft.prompt_init_text)
    rows = wrapped.n * wrapped.submodules
    wrapped.init_from_tokens(init_token_ids(tokenizer, rows, peft.prompt_init_text, model.args.vocab_size))
    return wrapped


def load(model: T5, config: dict[str, Any], path: Path) -> T5PromptModel:
    """Attach a PEFT PROMPT_TUNING SEQ_2_SEQ_LM adapter (saved by trmlx or peft) to a freshly loaded T5."""
    from safetensors.numpy import load_file

    config_path = Path(path) / CONFIG_FILE
    saved = json.loads(config_path.read_text())
    task_type = saved.get("task_type")
    if saved.get("peft_type") != PEFT_TYPE or task_type not in (None, TASK_TYPE):
        raise UserError(f"{config_path}: a T5 model takes {PEFT_TYPE} adapters with task_type {TASK_TYPE}; this "
                        f"one is {saved.get('peft_type')} / {task_type}")
    n = int(saved["num_virtual_tokens"])
    submodules = int(saved.get("num_transformer_submodules") or (SUBMODULES if task_type == TASK_TYPE else 1))
    wrapped = T5PromptModel(model, n, init_text=saved.get("prompt_tuning_init_text") or "", submodules=submodules)
    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    if "prompt_embeddings" not in weights:
        raise UserError(f"{path}: {WEIGHTS_FILE} has no 'prompt_embeddings' (found {', '.join(sorted(weights))})")
    value = weights["prompt_embeddings"]
    expected = (n * submodules, model.args.d_model)
    if tuple(value.shape) != expected:
        raise UserError(f"{path}: prompt_embeddings has shape {tuple(value.shape)}, but this model needs {expected} "
                        f"for {n} virtual tokens × {submodules} submodules (was the adapter trained on another base "
                        "model?)")
    wrapped.prompt = mx.array(value.astype(np.float32))
    mx.eval(wrapped.prompt)
    return wrapped


def save(model: T5PromptModel, path: Path, base_model: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically, in PEFT's format."""
    from safetensors.numpy import save as to_bytes

    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_FILE, to_bytes(model.peft_state(), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_FILE, json.dumps(model.peft_config(base_model), indent=2))
