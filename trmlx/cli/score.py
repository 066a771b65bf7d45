"""`trmlx score`: score predictions against references with Turkish-correct metrics.

Two input forms: plain text (`--hyp` and one or more `--ref` files, one example per line, as sacrebleu reads
them) or JSONL (`--predictions`, one object per line with `prediction`, `reference` and optional `task`/`lang`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trmlx.cli.common import console as common_console
from trmlx.cli.common import emit, json_option
from trmlx.errors import UserError
from trmlx.metrics import TEXT_METRICS, compute_with_signature, per_task


def _read_lines(path: str, role: str) -> list[str]:
    """Read a UTF-8 text file as one example per line (trailing newline/CR removed, like sacrebleu)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{role} file {path} does not exist")
    try:
        with open(p, encoding="utf-8", newline="\n") as fh:
            return [line.rstrip("\n").rstrip("\r") for line in fh]
    except UnicodeDecodeError as err:
        raise UserError(f"{role} file {path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """Read prediction rows from JSONL, checking each line's fields; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"predictions file {path} does not exist")
    rows = []
    try:
        lines = p.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise UserError(f"predictions file {path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with 'prediction' and 'reference' fields")
        for key in ("prediction", "reference"):
            if key not in row:
                raise UserError(f"{where}: missing '{key}' field")
        if not isinstance(row["prediction"], str):
            raise UserError(f"{where}: 'prediction' must be a string")
        ref = row["reference"]
        if not (isinstance(ref, str) or (isinstance(ref, list) and ref and all(isinstance(r, str) for r in ref))):
            raise UserError(f"{where}: 'reference' must be a string or a non-empty list of strings")
        if "task" in row and not isinstance(row["task"], str):
            raise UserError(f"{where}: 'task' must be a string")
        if "lang" in row and row["lang"] not in ("tr", "en"):
            raise UserError(f"{where}: 'lang' must be 'tr' or 'en', got {row['lang']!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"predictions file {path} has no examples")
    return rows


def _load_text_files(hyp: str, refs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows from a hypothesis file and aligned reference files (several --ref give several golds per line)."""
    hyps = _read_lines(hyp, "hypothesis")
    if not hyps:
        raise UserError(f"hypothesis file {hyp} has no lines")
    ref_streams = [_read_lines(r, "reference") for r in refs]
    for ref_path, stream in zip(refs, ref_streams):
        if len(stream) != len(hyps):
            raise UserError(
                f"line counts differ: hypothesis file {hyp} has {len(hyps)} lines, "
                f"reference file {ref_path} has {len(stream)}"
            )
    return [
        {"prediction": h, "reference": [s[i] for s in ref_streams] if len(refs) > 1 else ref_streams[0][i]}
        for i, h in enumerate(hyps)
    ]


def score_rows(
    metrics: tuple[str, ...], rows: list[dict[str, Any]], lang: str, tokenize: str, lowercase: bool
) -> dict[str, Any]:
    """Pooled scores with signatures for all rows, plus per-task scores and macro means when rows have tasks."""
    opts = {"tokenize": tokenize, "lowercase": lowercase}
    row_langs = {row.get("lang", lang) for row in rows}
    pooled_lang = row_langs.pop() if len(row_langs) == 1 else None
    result: dict[str, Any] = {"n": len(rows), "lang": pooled_lang or "mixed", "scores": {}, "signatures": {}}
    has_tasks = any("task" in row for row in rows)
    if pooled_lang is None and not has_tasks and set(metrics) & {"rouge", "em", "f1"}:
        raise UserError("rows mix 'lang' values; add a 'task' field so ROUGE/EM/F1 are scored per language")
    preds = [row["prediction"] for row in rows]
    refs = [row["reference"] for row in rows]
    for name in metrics:
        if pooled_lang is None and name in ("rouge", "em", "f1"):
            continue  # a pooled score needs one normaliser; mixed-language rows are scored per task only
        scores, sigs = compute_with_signature(name, preds, refs, lang=pooled_lang or lang, **opts)
        result["scores"].update(scores)
        result["signatures"].update(sigs)
    if has_tasks:
        tasked = [{**row, "task": row.get("task", "(none)")} for row in rows]
        try:
            result.update(per_task(metrics, tasked, lang=lang, **opts))
        except ValueError as err:
            raise UserError(str(err)) from None
    return result


def _render(result: dict[str, Any]) -> None:
    """Print the scores (and per-task table when present) with rich."""
    from rich.table import Table

    console = common_console()
    console.print(f"[bold]{result['n']} examples[/bold] (lang {result['lang']})", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in result["scores"].items():
        table.add_row(key, f"{value:.2f}")
    console.print(table)
    if "per_task" in result:
        keys = list(result["macro"])
        tasks = Table(title="per task")
        tasks.add_column("task")
        for key in keys:
            tasks.add_column(key, justify="right")
        for task, scores in result["per_task"].items():
            tasks.add_row(task, *(f"{scores[k]:.2f}" if k in scores else "-" for k in keys))
        tasks.add_row("[bold]macro[/bold]", *(f"{result['macro'][k]:.2f}" for k in keys))
        console.print(tasks)
    for key, sig in result["signatures"].items():
        console.print(f"[dim]{key}: {sig}[/dim]", highlight=False)


@click.command("score")
@click.option(
    "--metric", "metrics", multiple=True, required=True, help=f"Metric (repeatable): {', '.join(TEXT_METRICS)}."
)
@click.option("--hyp", metavar="FILE", help="System outputs, one example per line.")
@click.option(
    "--ref", "refs", metavar="FILE", multiple=True, help="References aligned with --hyp (repeat for several)."
)
@click.option(
    "--predictions", metavar="FILE", help="JSONL: 'prediction', 'reference' (string or list), optional 'task'."
)
@click.option(
    "--lang", type=click.Choice(["tr", "en"]), default="tr", show_default=True, help="Normalisation for ROUGE/EM/F1."
)
@click.option(
    "--tokenize", type=click.Choice(["13a", "intl", "char"]), default="13a", show_default=True, help="BLEU tokenizer."
)
@click.option("--lowercase", is_flag=True, help="Case-insensitive BLEU/chrF with Turkish lowercasing (I→ı, İ→i).")
@json_option
def score(
    metrics: tuple[str, ...],
    hyp: str | None,
    refs: tuple[str, ...],
    predictions: str | None,
    lang: str,
    tokenize: str,
    lowercase: bool,
    as_json: bool,
) -> None:
    """Score predictions: `--hyp H --ref R` (text files) or `--predictions P.jsonl` (per-task when rows have tasks)."""
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UserError(f"unknown metric {names} for score; available: {', '.join(TEXT_METRICS)}")
    metrics = tuple(dict.fromkeys(metrics))
    if predictions is not None:
        if hyp is not None or refs:
            raise UserError("give either --predictions or --hyp/--ref, not both")
        rows = _read_jsonl(predictions)
    elif hyp is not None and refs:
        rows = _load_text_files(hyp, refs)
    else:
        raise UserError("give --hyp and at least one --ref, or --predictions")
    result = score_rows(metrics, rows, lang, tokenize, lowercase)
    emit(result, as_json, _render)
