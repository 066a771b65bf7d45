"""Prompt tuning and prefix tuning for mlx-lm models, with PEFT's semantics and PEFT's file format.

- Prompt tuning (PEFT PROMPT_TUNING): n trainable embeddings go before the input embeddings; they take positions
  0..n-1 and the real tokens n..n+T-1, exactly as peft's `cat(prompts, inputs_embeds)`.
- Prefix tuning (PEFT PREFIX_TUNING): n trainable keys and values per layer start every layer's KV cache; the real
  tokens take positions n..n+T-1 (peft passes the prefix as past_key_values, so transformers starts the cache
  position after it). The keys are used as stored: no RoPE is applied to them, as in peft.

Both are a wrapper model (`VirtualTokenModel`) around the frozen mlx-lm model, so the training loop needs no change:
`model(inputs)` returns the logits of the real tokens only. For generation, `make_batch_cache` returns caches that
already hold the virtual tokens (prompt tuning's virtual tokens attend only to themselves, so their keys/values are a
fixed prefix too), with the left padding between prefix and prompt masked: a batched row sees what it sees alone.

Initialisation (our choice, documented in the adapter config where PEFT has a field for it):
- prompt: `prompt_init_text` → PEFT's TEXT init (tokenise, repeat/truncate to n, copy the word embeddings);
  otherwise PEFT's SAMPLE_VOCAB init (embeddings of n random real-vocabulary tokens, special tokens excluded).
  PEFT's default RANDOM (N(0,1) vectors) is not used: peft itself warns they may fall off the embedding manifold.
- prefix: the keys/values the frozen model computes for the same n tokens (prompt_init_text's, else sampled) —
  Li & Liang's "real word activations": at step 0 the model sees an ordinary text prefix instead of PEFT's N(0,1)
  keys/values, which do not look like anything the model has attended to.
  With `prefix_projection`, PEFT's MLP (Linear(d, e) → tanh → Linear(e, layers*2*d), e = PEFT's default
  encoder_hidden_size = token_dim) starts from PEFT's default init (prompt_init_text does not apply); saving writes
  the MLP's output, as peft does, so the saved adapter loads (in peft and here) as a plain prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from trmlx.errors import UserError
from trmlx.recipe.schema import PeftConfig
from trmlx.rundir import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
# Families whose mlx-lm code shares llama's attention and plain KVCache and accepts `input_embeddings`.
SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:  # PEFT's token_dim for prefix tuning (grouped-query attention: kv heads only)
        return self.kv_heads * self.head_dim


def geometry(model: nn.Module, config: dict[str, Any], method: str) -> Geometry:
    """The model's shape as PEFT reads it from the HF config; a UserError for families we do not support."""
    family = config.get("model_type")
    caches = model.make_cache() if hasattr(model, "make_cache") else [KVCache()]
    if family not in SUPPORTED or any(type(c) is not KVCache for c in caches):
        raise UserError(f"peft.method: {method} tuning in the MLX backend supports the {', '.join(SUPPORTED)} "
                        f"model families (full attention, plain KV cache); this model is {family!r}. Use lora or dora")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    # mlx-lm's qwen2 (like HF's Qwen2) derives head_dim; llama/mistral configs may set it.
    head_dim = hidden // heads if family == "qwen2" else int(config.get("head_dim") or hidden // heads)
    return Geometry(int(config["num_hidden_layers"]), hidden, heads,
                    int(config.get("num_key_value_heads") or heads), head_dim)


class _TrainPrefixCache:
    """One layer's cache for a training forward: the prefix, then this call's keys (a differentiable concat)."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values


class _PrefixBlock(nn.Module):
    """A transformer block (llama/qwen2 layout) that takes its prefix keys/values as arguments.

    mlx-lm's grad_checkpoint patches the class of `model.layers[0]` with mx.checkpoint, which drops the gradients of
    arrays that reach the function any other way than as array arguments (a cache object, a closure): the prefix
    would silently stop learning. Training runs these blocks, and `layers` lists them, so checkpointing wraps this
    class and the prefix stays an argument. Attention (never checkpointed) gets it in a cache object."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __call__(self, h: mx.array, mask: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        b = self.block
        h = h + b.self_attn(b.input_layernorm(h), mask, _TrainPrefixCache(keys, values))
        return h + b.mlp(b.post_attention_layernorm(h))


class PrefixBatchKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache with a prefix every row sees: columns [prefix | left padding | tokens]; the padding is
    masked, the prefix is not, and the tokens' positions start at the prefix length."""

    def __init__(self, keys: mx.array, values: mx.array, left_padding: list[int]):
        super().__init__(left_padding)
        self.prefix = keys.shape[2]
        self.keys, self.values, self._idx = keys, values, self.prefix
        self.offset = self.offset + self.prefix

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mx.array:
        mask = create_causal_mask(N, offset=self._idx, left_padding=self.left_padding + self.prefix, **kwargs)
        return mask | (mx.arange(self._idx + N) < self.prefix)

    def filter(self, batch_indices) -> None:
        """Keep rows; drop the padding columns every kept row has, but never the prefix."""
        self.keys, self.values = self.keys[batch_indices], self.values[batch_indices]
        self.offset, self.left_padding = self.offset[batch_indices], self.left_padding[batch_indices]
        trim = min(self.left_padding.tolist())
        if trim > 0:
            p = self.prefix
            self.keys = mx.concatenate([self.keys[..., :p, :], self.keys[..., p + trim:, :]], axis=2)
            self.values = mx.concatenate([self.values[..., :p, :], self.values[..., p + trim:, :]], axis=2)
            self._idx -= trim
            self.left_padding = self.left_padding - trim

    def extend(self, other):  # mlx-lm's batch server merges caches; our generate never does
        raise NotImplementedError("PrefixBatchKVCache cannot be merged")


class VirtualTokenModel(nn.Module):
    """A frozen mlx-lm causal LM plus trainable virtual tokens (prompt tuning) or a KV prefix (prefix tuning)."""

    def __init__(self, base: nn.Module, method: str, geo: Geometry, num_virtual_tokens: int,
                 projection: bool = False, init_text: str = ""):
        super().__init__()
        base.freeze()
        self.base = base
        self.method, self.geo, self.n = method, geo, num_virtual_tokens
        self.projection, self.init_text = projection, init_text
        self.compute_dtype = base.model.embed_tokens(mx.array([0])).dtype  # works for quantised embeddings too
        self.encoder_hidden = geo.kv_dim  # PEFT's default encoder_hidden_size (after its GQA adjustment)
        out = geo.layers * 2 * geo.kv_dim
        if method == "prompt":
            self.prompt = mx.zeros((self.n, geo.hidden))
        elif projection:  # PEFT's PrefixEncoder: Embedding N(0,1), torch-default Linear init (= MLX's)
            self.embedding = mx.random.normal((self.n, geo.kv_dim))
            self.transform = nn.Sequential(nn.Linear(geo.kv_dim, self.encoder_hidden), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden, out))
        else:
            self.prefix = mx.zeros((self.n, out))
        # Kept out of the parameter tree (object.__setattr__): the blocks are the base model's, already in it.
        object.__setattr__(self, "_blocks", [_PrefixBlock(b) for b in base.layers] if method == "prefix" else None)

    @property
    def layers(self) -> list[nn.Module]:
        """What the training loop checkpoints (model.layers[0]): the blocks the training forward calls."""
        return self._blocks or self.base.layers

    # --- the virtual tokens -------------------------------------------------------------------------------------

    def init_from_tokens(self, ids: list[int]) -> None:
        """Prompt: the tokens' embeddings; prefix: the keys/values the frozen model computes for them."""
        tokens = mx.array(ids)[None]
        if self.method == "prompt":
            self.prompt = self.base.model.embed_tokens(tokens)[0].astype(mx.float32)
        elif not self.projection:
            caches = [KVCache() for _ in self.layers]
            self.base.model(tokens, caches)
            self.prefix = _flatten_kv([(c.keys[..., : self.n, :], c.values[..., : self.n, :]) for c in caches])
        mx.eval(self.trainable_parameters())

    def flat_prefix(self) -> mx.array:
        """Prefix tuning's (n, layers*2*kv_dim) keys/values in PEFT's layout (what adapter_model stores)."""
        return self.transform(self.embedding) if self.projection else self.prefix

    def prefix_kv(self, batch: int = 1) -> list[tuple[mx.array, mx.array]]:
        """Per layer (keys, values) of shape (batch, kv_heads, n, head_dim) in the model's dtype."""
        if self.method == "prefix":
            g = self.geo
            kv = self.flat_prefix().astype(self.compute_dtype).reshape(self.n, 2 * g.layers, g.kv_heads, g.head_dim)
            kv = kv.transpose(1, 2, 0, 3)  # (2 * layers, heads, n, head_dim): key of layer l at 2l, value at 2l+1
            pairs = [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(g.layers)]
        else:  # the virtual tokens attend only to themselves: their keys/values are a fixed prefix
            caches = [KVCache() for _ in self.layers]
            self.base.model(None, caches, self.prompt.astype(self.compute_dtype)[None])
            pairs = [(c.keys[..., : self.n, :], c.values[..., : self.n, :]) for c in caches]
        return [(mx.broadcast_to(k, (batch, *k.shape[1:])), mx.broadcast_to(v, (batch, *v.shape[1:])))
                for k, v in pairs]

    # --- forward and caches -------------------------------------------------------------------------------------

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Logits of the real tokens. With a cache (generation) the cache already holds the virtual tokens."""
        if cache is not None:
            return self.base(inputs, cache=cache)
        model = self.base.model
        embeds = model.embed_tokens(inputs)
        if self.method == "prefix":  # the supported families' forward (embed, blocks, norm), prefix as arguments
            mask = create_causal_mask(inputs.shape[1], offset=self.n)
            for block, (keys, values) in zip(self._blocks, self.prefix_kv(inputs.shape[0])):
                embeds = block(embeds, mask, keys, values)
            hidden = model.norm(embeds)
        else:
            prompt = mx.broadcast_to(self.prompt.astype(embeds.dtype)[None], (inputs.shape[0], *self.prompt.shape))
            hidden = model(inputs, None, mx.concatenate([prompt, embeds], axis=1))[:, self.n:]
        if self.base.args.tie_word_embeddings:  # the supported families' head, on the real tokens only
            return self.base.model.embed_tokens.as_linear(hidden)
        return self.base.lm_head(hidden)

    def make_cache(self) -> list[KVCache]:
        """mlx-lm's single-sequence cache, starting with the virtual tokens (mlx_lm.generate works with it)."""
        caches = []
        for keys, values in self.prefix_kv():
            cache = KVCache()
            cache.update_and_fetch(keys, values)
            caches.append(cache)
        return caches

    def make_batch_cache(self, left_padding: list[int]) -> list[PrefixBatchKVCache]:
        """Batched, left-padded generation's caches, starting with the virtual tokens."""
        return [PrefixBatchKVCache(k, v, left_padding) for k, v in self.prefix_kv(len(left_padding))]

    # --- PEFT format --------------------------------------------------------------------------------------------

    def peft_state(self) -> dict[str, np.ndarray]:
        weights = self.prompt if self.method == "prompt" else self.flat_prefix()
        return {"prompt_embeddings": np.ascontiguousarray(np.array(weights.astype(mx.float32)))}

    def peft_config(self, base_model: str, task_type: str = "CAUSAL_LM") -> dict[str, Any]:
        """adapter_config.json as peft 0.21 writes it for a PromptTuningConfig / PrefixTuningConfig."""
        g = self.geo
        common = {"peft_type": PEFT_TYPES[self.method], "task_type": task_type, "base_model_name_or_path": base_model,
                  "num_virtual_tokens": self.n, "num_layers": g.layers, "num_transformer_submodules": 1,
                  "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None}
        if self.method == "prefix":
            return {**common, "token_dim": g.kv_dim, "num_attention_heads": g.kv_heads,
                    "encoder_hidden_size": self.encoder_hidden, "prefix_projection": self.projection,
                    "init_weights": None}
        text = bool(self.init_text)
        return {**common, "token_dim": g.hidden, "num_attention_heads": g.heads,
                "prompt_tuning_init": "TEXT" if text else "SAMPLE_VOCAB",
                "prompt_tuning_init_text": self.init_text or None,
                "tokenizer_name_or_path": base_model if text else None, "tokenizer_kwargs": None}

    def peft_settings(self) -> PeftConfig:
        return PeftConfig(method=self.method, num_virtual_tokens=self.n, prefix_projection=self.projection,
                          prompt_init_text=self.init_text)


def _flatten_kv(pairs: list[tuple[mx.array, mx.array]]) -> mx.array:
    """Per-layer (1, heads, n, head_dim) keys/values → PEFT's (n, layers*2*heads*head_dim) float32 layout."""
    stacked = mx.concatenate([mx.concatenate([k, v], axis=0) for k, v in pairs], axis=0)  # (2L, heads, n, d)
    n = stacked.shape[2]
    return stacked.transpose(2, 0, 1, 3).reshape(n, -1).astype(mx.float32)


def init_token_ids(tokenizer: Any, n: int, text: str, vocab_size: int) -> list[int]:
    """PEFT's TEXT init ids (the text's ids repeated/truncated to n), else n random real-vocabulary ids."""
    if text:
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise UserError("peft.prompt_init_text: the text encodes to no tokens")
        return (ids * math.ceil(n / len(ids)))[:n]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = np.array([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    picks = mx.random.randint(0, len(pool), (n,))  # mx's RNG: seeded by the recipe's train.seed in load()
    return pool[np.array(picks)].tolist()


def attach(model: nn.Module, config: dict[str, Any], peft: PeftConfig, tokenizer: Any) -> VirtualTokenModel:
    """A new prompt/prefix adapter on a freshly loaded model, initialised from real tokens (see module doc)."""
    geo = geometry(model, config, peft.method)
    wrapped = VirtualTokenModel(model, peft.method, geo, peft.num_virtual_tokens,
                                projection=peft.method == "prefix" and peft.prefix_projection,
                                init_text=peft.prompt_init_text)
    wrapped.init_from_tokens(init_token_ids(tokenizer, wrapped.n, peft.prompt_init_text, int(config["vocab_size"])))
    return wrapped


def adapter_type(path: Path) -> str | None:
    """The peft_type of an adapter folder (None when it has no readable config)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("peft_type")
    except (OSError, ValueError):
        return None


def load(model: nn.Module, config: dict[str, Any], path: Path) -> VirtualTokenModel:
    """Attach a PEFT PROMPT_TUNING / PREFIX_TUNING adapter (from trmlx or peft) to a freshly loaded model.

    A prefix saved with prefix_projection holds the MLP's output, so it loads as a plain prefix (as in peft)."""
    from safetensors.numpy import load_file

    config_path = Path(path) / CONFIG_FILE
    saved = json.loads(config_path.read_text())
    method = {v: k for k, v in PEFT_TYPES.items()}[saved["peft_type"]]
    if saved.get("num_transformer_submodules", 1) != 1 or saved.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{config_path}: only decoder-only (CAUSAL_LM) {saved['peft_type']} adapters load in MLX")
    geo = geometry(model, config, method)
    n = int(saved["num_virtual_tokens"])
    wrapped = VirtualTokenModel(model, method, geo, n, init_text=saved.get("prompt_tuning_init_text") or "")
    weights = load_file(str(Path(path) / WEIGHTS_FILE))
    if "prompt_embeddings" not in weights:
        raise UserError(f"{path}: {WEIGHTS_FILE} has no 'prompt_embeddings' (found {', '.join(sorted(weights))})")
    value = weights["prompt_embeddings"]
    expected = (n, geo.hidden) if method == "prompt" else (n, geo.layers * 2 * geo.kv_dim)
    if tuple(value.shape) != expected:
        raise UserError(f"{path}: prompt_embeddings has shape {tuple(value.shape)}, but this model needs {expected} "
                        f"for {n} virtual tokens (was the adapter trained on another base model?)")
    wrapped.update({method: mx.array(value.astype(np.float32))})
    mx.eval(wrapped.trainable_parameters())
    return wrapped


def save(model: VirtualTokenModel, path: Path, base_model: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically, in PEFT's format."""
    from safetensors.numpy import save as to_bytes

    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_FILE, to_bytes(model.peft_state(), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_FILE, json.dumps(model.peft_config(base_model), indent=2))
