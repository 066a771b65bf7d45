"""`trmlx bench RECIPE`: throughput, MFU and peak memory per backend, beside mlx_lm.lora / a Trainer + peft + bnb
script and beside trmlx plan's prediction."""

from __future__ import annotations

from pathlib import Path

import click

from trmlx.cli.common import console, emit, json_option, set_option


def _numbers(values: tuple[str, ...], flag: str) -> list[int]:
    """--seq-len 512 --seq-len 1024, or --seq-len 512,1024."""
    from trmlx.errors import UserError

    try:
        return [int(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected whole numbers, e.g. {flag} 512,1024; got {' '.join(values)}") from None


@click.command("bench")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--backends", default=None, help="Comma-separated, from mlx,cuda (default: every installed one).")
@click.option("--steps", type=int, default=5, show_default=True, help="Timed optimizer steps per trial.")
@click.option("--trials", type=int, default=3, show_default=True, help="Timed trials (median and min-max).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps first (compilation, caches).")
@click.option("--seq-len", multiple=True, help="Tokens per row; several allowed (default: data.max_length).")
@click.option("--batch-size", multiple=True, help="Micro-batches; several allowed (default: train.batch_size).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per timed step.")
@click.option("--max-new-tokens", type=int, default=None, help="Eval generation budget (default: the recipe's).")
@click.option("--model-shape", default=None, metavar="7b|qwen2.5-7b|llama3-8b|tiny|CONFIG.json",
              help="Bench a random-weight model of this architecture (nothing downloaded).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Also run mlx_lm.lora (MLX) and a Trainer + peft + bitsandbytes script (CUDA) where installed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the JSON and PNG (default: the current folder).")
@set_option
@json_option
def bench(recipe: str, backends: str | None, steps: int, trials: int, warmup: int, seq_len: tuple[str, ...],
          batch_size: tuple[str, ...], grad_accum: int, max_new_tokens: int | None, model_shape: str | None,
          peers: bool, out: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Measure training tokens/s, step time, MFU, peak memory and eval-generation tokens/s of RECIPE's shape."""
    from trmlx.bench.report import table
    from trmlx.bench.run import run_bench

    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    result = run_bench(recipe, backends=chosen, steps=steps, trials=trials, warmup=warmup,
                       seq_lens=_numbers(seq_len, "--seq-len"), batch_sizes=_numbers(batch_size, "--batch-size"),
                       grad_accum=grad_accum, model_shape=model_shape, peers=peers, out=out, overrides=overrides,
                       max_new_tokens=max_new_tokens)
    emit(result, as_json, lambda r: (console().print(table(r), highlight=False, markup=False),
                                     console().print(f"wrote {', '.join(r['files'])}")))
