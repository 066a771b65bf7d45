"""How far 4-bit quantisation moves each backend's logits from the unquantised model.

The backends quantise differently (MLX: affine, group 64, embeddings and head included as mlx-lm does;
bitsandbytes: NF4 with double quantisation, embeddings and head left in full precision), so their 4-bit logits are
not expected to agree with each other; each is measured against the same fp32 model instead. Random weights give
near-flat distributions, so top-1 agreement here is a pessimistic bound.

    python benchmarks/quant_drift.py [--hidden 256 --layers 4]

Prints a table and one JSON line; writes benchmarks/results/quant_drift-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trmlx.recipe import load_recipe  # noqa: E402
from trmlx.rundir import environment_record  # noqa: E402
from trmlx.tiny.llama import build_tiny_llama, shipped_texts  # noqa: E402


def drift(quantised: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Relative max error, mean KL(reference || quantised) per token, and top-1 agreement."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference.astype(np.float64)), log_softmax(quantised.astype(np.float64))
    return {"relative_max_error": float(np.abs(quantised - reference).max() / np.abs(reference).max()),
            "mean_kl": float((np.exp(p) * (p - q)).sum(-1).mean()),
            "top1_agreement": float((reference.argmax(-1) == quantised.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "model", shipped_texts(REPO / "recipes" / "data" / "en_tr"),
                                     hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                     intermediate_size=args.hidden * 3)
        texts = [json.loads(line)["target"] for line in
                 (REPO / "recipes" / "data" / "en_tr" / "test.jsonl").read_text().splitlines()[:8]]
        overrides = [f"model.path='{model_dir}'", "peft.method='lora'"]
        base = load_recipe(REPO / "recipes" / "quickstart.toml", overrides)
        q4 = load_recipe(REPO / "recipes" / "quickstart.toml", overrides + ["model.quantize_bits=4"])
        results, device = {}, "cpu"

        from trmlx.backends.mlx import device as _blas  # noqa: F401  chooses the BLAS before mlx loads
        import mlx.core as mx

        from trmlx.backends.mlx.device import describe_device
        from trmlx.backends.mlx.model import load as mlx_load

        device = describe_device()["name"]
        fp32 = mlx_load(base)
        ids = [fp32.tokenizer.encode(t) for t in texts]
        width = min(len(i) for i in ids)
        batch = [i[:width] for i in ids]
        reference = np.array(fp32.model(mx.array(batch)))
        results["mlx affine 4-bit g64"] = drift(np.array(mlx_load(q4).model(mx.array(batch))), reference)

        import torch

        from trmlx.backends.cuda.model import load as torch_load

        with torch.no_grad():
            torch_ref = torch_load(base, None).model(torch.tensor(batch)).logits.float().numpy()
            torch_q = torch_load(q4, None).model(torch.tensor(batch)).logits.float().numpy()
        results["bitsandbytes nf4 + double quant"] = drift(torch_q, torch_ref)
        results["fp32: torch vs mlx (sanity)"] = drift(torch_ref, reference)
    for name, r in results.items():
        print(f"{name:34s} rel.max.err {r['relative_max_error']:.4f}  KL {r['mean_kl']:.5f}  "
              f"top-1 {r['top1_agreement']:.3f}")
    record = {"benchmark": "quant_drift", "model": {"hidden": args.hidden, "layers": args.layers,
                                                    "tokens": len(batch) * width}, "results": results,
              "environment": environment_record(device={"name": device})}
    out = REPO / "benchmarks" / "results" / f"quant_drift-{device}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({"benchmark": "quant_drift", **{k: v["relative_max_error"] for k, v in results.items()}}))


if __name__ == "__main__":
    main()
