"""`trmlx export RUN_DIR OUT_DIR`: merge the run's LoRA/DoRA adapter into the base weights (dequantising a
quantised base) and write a Hugging Face model folder that transformers and mlx-lm load without peft; or, with
`--format mlx-lm`, write the adapter itself in mlx-lm's format. The backend is imported only when it runs."""

from __future__ import annotations

from typing import Any

import click

from trmlx.cli.common import console, emit, json_option, set_option
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES

DTYPES = ("fp16", "bf16", "fp32")
FORMATS = ("merged", "mlx-lm")


def _render(result: dict[str, Any]) -> None:
    out = console()
    if result.get("format") == "mlx-lm":
        n = result["num_layers"]
        layers = "every block" if n == -1 else "the last block" if n == 1 else f"the last {n} blocks"
        out.print(f"wrote {result['out']}: mlx-lm {result['method']} adapter (rank {result['rank']}, scale "
                  f"{result['scale']:g}, {', '.join(result['keys'])} of {layers}; "
                  f"{', '.join(result['files'])}); use it with mlx_lm.generate --model {result['base']} "
                  f"--adapter-path {result['out']}", highlight=False)
        return
    what = f"{result['method']} adapter (r={result['rank']}, alpha={result['alpha']:g})"
    out.print(f"merged {what} into {result['merged_layers']} linear layers of {result['base']}"
              f"{', dequantised' if result['dequantized'] else ''}", highlight=False)
    out.print(f"wrote {result['out']}: {result['parameters']:,} parameters, {result['dtype']}, "
              f"{result['bytes'] / 2**20:,.1f} MiB ({', '.join(result['files'])})", highlight=False)
    if result["dropped"]:
        shown = ", ".join(result["dropped"][:3]) + (" ..." if len(result["dropped"]) > 3 else "")
        out.print(f"[yellow]note: {len(result['dropped'])} tensors of the base checkpoint have no counterpart in "
                  f"the MLX model and were not exported: {shown}[/yellow]", highlight=False)


@click.command("export")
@click.argument("target", metavar="RUN_DIR")
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="merged", show_default=True,
              help="merged: the adapter merged into the base, an HF model folder; mlx-lm: the adapter alone in "
                   "mlx-lm's format (adapters.safetensors + adapter_config.json, for mlx_lm --adapter-path).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Dtype of the merged weights (default: the base model's dtype from its config.json, else fp16).")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="PEFT or mlx-lm adapter folder (default RUN_DIR/adapter; required when RUN_DIR is a recipe "
                   "file).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Framework that merges (default: the run's backend). Adapters are PEFT files, so either "
                   "backend merges either backend's adapter.")
@set_option
@json_option
def export(target: str, out_dir: str, fmt: str, dtype: str | None, adapter: str | None, backend: str | None,
           overrides: tuple[str, ...], as_json: bool) -> None:
    """Merge the adapter into the base model and write an HF model folder (config.json, safetensors, tokenizer).

    The base loads as the run's recipe loads it; a quantised base is dequantised, so OUT_DIR holds plain
    fp16/bf16/fp32 weights. With --format mlx-lm, OUT_DIR gets the adapter in mlx-lm's format instead (float32,
    nothing merged). OUT_DIR must not exist or be empty."""
    from functools import partial
    from pathlib import Path

    from trmlx.backend import get_backend
    from trmlx.cli.eval_cmd import resolve_target

    resolved = resolve_target(target, adapter, backend, overrides)
    if resolved.adapter is None:
        raise UserError(f"{target}: nothing to merge; give a run directory, or a recipe file with --adapter DIR")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: output folder is not empty; choose a new folder or remove it first")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose a new output folder")
    if fmt == "mlx-lm":
        if dtype:
            raise UserError("--dtype applies to the merged export; --format mlx-lm writes the adapter's float32 "
                            "weights as they are")
        from trmlx.export import export_mlxlm

        write = partial(export_mlxlm, resolved.recipe, resolved.adapter, out)
    else:
        get_backend(resolved.backend)  # a missing install is a one-line error
        if resolved.backend == "cuda":
            from trmlx.backends.cuda.export import export_model
        else:
            from trmlx.backends.mlx.export import export_model

        write = partial(export_model, resolved.recipe, resolved.adapter, out, dtype)
    from trmlx.integrity import disk_error, disk_fault, ensure_writable

    ensure_writable(out.absolute().parent, f"checking that {out} can be written")  # before the slow merge
    try:
        result = write()
    except OSError as err:
        if not disk_fault(err):
            raise
        raise disk_error(err, f"writing the export to {out}",
                         "the partial copy was removed; nothing else was changed") from None
    # An mlx-lm adapter was read through its PEFT form in a temporary folder: report the folder the user gave.
    emit({**result, "adapter": str(resolved.adapter_source or resolved.adapter)}, as_json, _render)
