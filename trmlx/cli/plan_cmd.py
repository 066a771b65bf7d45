"""`trmlx plan RECIPE --backend mlx|cuda --budget 16GB`: predicted peak memory, term by term, and whether it fits."""

from __future__ import annotations

import click

from trmlx.cli.common import console, emit, json_option, set_option
from trmlx.recipe.schema import BACKEND_NAMES


@click.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="mlx", show_default=True)
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory budget, e.g. 16GB (default: the recipe's train.memory_budget, if any).")
@click.option("--model-shape", default=None, metavar="7b|qwen2.5-7b|llama3-8b|tiny|CONFIG.json",
              help="Plan for this architecture instead of model.path's config.json.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu", "metal"]), default="auto", show_default=True,
              help="Where the run would happen (auto: what this machine has for the backend).")
@click.option("--seq-len", type=int, default=None, help="Tokens per training row (seq2seq: source tokens; default: data.max_length).")
@click.option("--batch-size", type=int, default=None, help="Micro-batch (default: train.batch_size).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Override train.grad_checkpoint.")
@set_option
@json_option
def plan(recipe: str, backend: str, budget: str | None, model_shape: str | None, device: str, seq_len: int | None,
         batch_size: int | None, grad_checkpoint: bool | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Predict the peak memory of training (and eval generation) of RECIPE on a backend, broken down."""
    from trmlx.errors import UserError
    from trmlx.plan.base import make_target
    from trmlx.plan.tasks import fit, load_shape, plan_recipe
    from trmlx.recipe.checks import parse_size
    from trmlx.recipe import load_recipe

    loaded = load_recipe(recipe, overrides, backend)
    shape = load_shape(loaded, model_shape)
    target = make_target(loaded, backend, shape, device)
    size = budget or loaded.train.memory_budget or None
    limit = parse_size(size, "--budget" if budget else "train.memory_budget") if size else None
    note = None
    if loaded.train.batch_size == "auto" and batch_size is None:
        if limit is None:
            raise UserError('train.batch_size is "auto": give --budget (or train.memory_budget) to plan it')
        result, _ = fit(loaded, backend, shape, target, limit)
        note = "batch_size = \"auto\": the settings trmlx train would choose"
    else:
        result = plan_recipe(loaded, backend, shape, target, batch_size=batch_size, seq_len=seq_len,
                             grad_checkpoint=grad_checkpoint, budget=limit)
    record = result.to_json()
    record["note"] = note
    if limit is not None and result.train_peak + result.overhead > limit:
        try:
            choice, _ = fit(loaded, backend, shape, target, limit)
            s = choice.settings
            cached = f", embedding.mini_batch_size {s['mini_batch_size']}" if "mini_batch_size" in s else ""
            record["suggestion"] = (f"fits with micro-batch {s['batch_size']} × grad_accum {s['grad_accum']}, "
                                    f"grad_checkpoint {'on' if s['grad_checkpoint'] else 'off'}{cached} "
                                    f"({choice.peak / 1e9:.2f} GB): train.batch_size = \"auto\" or "
                                    f"trmlx train --fit-budget {size}")
        except UserError as err:
            record["suggestion"] = err.problems[0]
    emit(record, as_json, _render)


def _lengths(s: dict) -> str:
    """seq N for causal rows; source → target lengths for seq2seq (its plan has a target_len)."""
    if "target_len" in s:
        return f"source {s['seq_len']} → target {s['target_len']} tokens"
    if "passage_len" in s:  # embedding: the texts of one contrastive batch, and cached MNRL
        return (f"{s['batch_size']} queries × {s['query_len']} + {s['texts_per_batch'] - s['batch_size']} passages × "
                f"{s['passage_len']} tokens ({s['num_negatives']} hard negatives per query), cached MNRL "
                f"{'mini-batch ' + str(s['mini_batch_size']) if s['mini_batch_size'] else 'off'}")
    return f"seq {s['seq_len']}"


def _layers(adapted: int | dict) -> str:
    if isinstance(adapted, dict):  # seq2seq: per stack
        return " + ".join(f"{n} {stack}" for stack, n in adapted.items()) + " layers"
    return f"{adapted} layers"


def _render(r: dict) -> None:
    from rich.table import Table

    out = console()
    s, m, t = r["settings"], r["model"], r["target"]
    out.print(f"[bold]{m['source']}[/]: {m['parameters'] / 1e9:.3f}B parameters; {t['backend']} on {t['kind']} "
              f"({t['compute_dtype']} activations); micro-batch {s['batch_size']} × grad_accum {s['grad_accum']}, "
              f"{_lengths(s)}, grad_checkpoint {'on' if s['grad_checkpoint'] else 'off'}, "
              f"{s['peft']} on {_layers(s['adapted_layers'])}" + (f" — {r['note']}" if r.get("note") else ""))
    table = Table(show_header=True, header_style="bold")
    for col, justify in (("term", "left"), ("phase", "left"), ("GB", "right"), ("what", "left")):
        table.add_column(col, justify=justify)
    for term in r["terms"]:
        table.add_row(term["name"], term["phase"], f"{term['gb']:.3f}", term["doc"])
    out.print(table)
    if s.get("calibration"):  # causal plans: where the measured coefficients come from
        out.print(s["calibration"])
    out.print(f"training peak {r['train_peak_gb']:.3f} GB, eval-generation peak {r['eval_peak_gb']:.3f} GB, "
              f"+ overhead {r['overhead_gb']:.2f} GB = [bold]predicted peak {r['peak_gb']:.2f} GB[/]")
    if r["budget_gb"] is not None:
        verdict = "[green]fits[/]" if r["fits"] else "[red]does not fit[/]"
        out.print(f"budget {r['budget_gb']:.2f} GB: {verdict}")
    if r.get("suggestion"):
        out.print(r["suggestion"])
    if r["budget_gb"] is not None and r["eval_peak_gb"] + r["overhead_gb"] > r["budget_gb"]:
        out.print(f"eval generation needs {r['eval_peak_gb'] + r['overhead_gb']:.2f} GB: lower eval.batch_size "
                  f"(now {r['settings']['eval_batch_size']}) for trmlx eval")
