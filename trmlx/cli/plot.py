"""`trmlx plot RUN_DIR`: loss curves of any run as PNG, from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import click

from trmlx.cli.common import emit, json_option
from trmlx.errors import UserError


@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG path (default RUN_DIR/plots/loss.png).")
@json_option
def plot(run_dir: str, out: str | None, as_json: bool) -> None:
    """Draw training and validation loss against step from RUN_DIR/metrics.jsonl."""
    from trmlx.report import plot_losses
    from trmlx.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.metrics.is_file():
        raise UserError(f"{run.metrics}: no metrics log; is {run_dir} a trmlx run directory?")
    png = plot_losses(run.metrics, Path(out) if out else run.plots / "loss.png")
    emit({"png": str(png)}, as_json, lambda r: click.echo(f"wrote {r['png']}"))
