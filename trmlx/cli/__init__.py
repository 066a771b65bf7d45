"""The `trmlx` command line. Each command lives in its own module; this file only wires them together.

Nothing here imports mlx or torch: commands import a backend only when they run one.
"""

from __future__ import annotations

import sys

import click

from trmlx import __version__
from trmlx.errors import UserError


class _Main(click.Group):
    """Turns UserError into one line per problem on stderr and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            for problem in err.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(2)
        except OSError as err:
            from trmlx.integrity import disk_error, disk_fault

            if not disk_fault(err):
                raise
            # A full or read-only disk that no command caught more precisely: still one line, not a traceback.
            click.echo(f"error: {disk_error(err, f'running trmlx {ctx.invoked_subcommand}')}", err=True)
            sys.exit(2)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trmlx")
def main() -> None:
    """Fine-tune language models for Turkish with LoRA/QLoRA on MLX (Apple silicon) or CUDA.

    Every job is a TOML recipe: `trmlx recipe explain` lists every field with its default,
    `trmlx check RECIPE` validates a recipe and its data.
    """


def _register() -> None:
    from trmlx.cli import check, env, eval_cmd, export_cmd, generate_cmd, plot, recipe_cmd, score, search_cmd, train
    from trmlx.cli import bench_cmd, plan_cmd

    main.add_command(env.env)
    main.add_command(recipe_cmd.recipe)
    main.add_command(check.check)
    main.add_command(plot.plot)
    main.add_command(score.score)
    main.add_command(train.train)
    main.add_command(eval_cmd.eval_command)
    main.add_command(generate_cmd.generate)
    main.add_command(export_cmd.export)
    main.add_command(search_cmd.search)
    main.add_command(bench_cmd.bench)
    main.add_command(plan_cmd.plan)


_register()
