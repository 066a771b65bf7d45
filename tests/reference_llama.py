"""A fixed reference for greedy decoding of prompt- and prefix-tuned Llama models: plain NumPy, full forward passes,
no KV cache, the virtual tokens placed explicitly. It does not move when transformers, peft or mlx-lm release.

Semantics are PEFT's forward pass (the one training computes the loss with):
- prompt tuning: the n soft-prompt embeddings come before the token embeddings, at positions 0..n-1;
- prefix tuning: every layer's attention sees n extra keys/values first, as stored (no RoPE on them), and the real
  tokens take positions n, n+1, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class ReferenceLlama:
    def __init__(self, folder: Path):
        from safetensors.numpy import load_file

        self.config = json.loads((Path(folder) / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
        c = self.config
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.config["rms_norm_eps"]) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:  # x: (heads, T, d); HF's rotate_half
        d = self.head_dim
        inv = 1.0 / self.config["rope_theta"] ** (np.arange(0, d, 2) / d)
        angles = positions[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
        rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rotated * sin

    def logits(self, embeds: np.ndarray, positions: np.ndarray, prefix: list | None = None) -> np.ndarray:
        """(T, vocab) logits for (T, hidden) input embeddings; prefix: per layer (keys, values) of (kv_heads, n, d)."""
        w, h, d, T = self.w, self.heads, self.head_dim, embeds.shape[0]
        x = embeds
        for layer in range(self.config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            a = self._rms(x, w[p + "input_layernorm.weight"])
            q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(T, h, d).transpose(1, 0, 2)
            k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(T, self.kv_heads, d).transpose(1, 0, 2)
            v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(T, self.kv_heads, d).transpose(1, 0, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            visible = np.tril(np.ones((T, T), dtype=bool))
            if prefix is not None:
                k = np.concatenate([prefix[layer][0], k], axis=1)
                v = np.concatenate([prefix[layer][1], v], axis=1)
                visible = np.concatenate([np.ones((T, prefix[layer][0].shape[1]), dtype=bool), visible], axis=1)
            k, v = np.repeat(k, h // self.kv_heads, axis=0), np.repeat(v, h // self.kv_heads, axis=0)
            scores = np.where(visible, q @ k.transpose(0, 2, 1) / np.sqrt(d), -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            x = x + (probs @ v).transpose(1, 0, 2).reshape(T, h * d) @ w[p + "self_attn.o_proj.weight"].T
            m = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        head = w["model.embed_tokens.weight"] if self.config.get("tie_word_embeddings") else w["lm_head.weight"]
        return self._rms(x, w["model.norm.weight"]) @ head.T

    def greedy(self, method: str, virtual: np.ndarray, prompt: list[int], max_new_tokens: int,
               eos_id: int) -> list[int]:
        """Greedy new tokens (EOS excluded) for PEFT's saved `prompt_embeddings` of a prompt/prefix adapter."""
        virtual = virtual.astype(np.float64)
        n, layers = virtual.shape[0], self.config["num_hidden_layers"]
        prefix = None
        if method == "prefix":  # PEFT's layout: (n, layers*2, kv_heads, d), key of layer l at 2l, value at 2l+1
            kv = virtual.reshape(n, 2 * layers, self.kv_heads, self.head_dim).transpose(1, 2, 0, 3)
            prefix = [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
        tokens, new = list(prompt), []
        for _ in range(max_new_tokens):
            embeds = self.w["model.embed_tokens.weight"][tokens]
            if method == "prompt":
                embeds = np.concatenate([virtual, embeds])
                positions = np.arange(n + len(tokens))
            else:
                positions = n + np.arange(len(tokens))
            token = int(self.logits(embeds, positions.astype(np.float64), prefix)[-1].argmax())
            if token == eos_id:
                break
            new.append(token)
            tokens.append(token)
        return new
