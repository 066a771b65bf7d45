"""`trmlx env`: versions, git hash and the device each installed backend would use."""

from __future__ import annotations

import importlib
from typing import Any

import click

from trmlx.cli.common import emit, json_option


@click.command("env")
@json_option
def env(as_json: bool) -> None:
    """Show package versions, the git hash and, for each installed backend, its device (this imports mlx/torch)."""
    from trmlx.backend import REGISTRY
    from trmlx.rundir import environment_record

    record: dict[str, Any] = environment_record()
    record["backends"] = {}
    for name, (module, extra) in REGISTRY.items():
        try:
            device = importlib.import_module(f"{module}.device")
            record["backends"][name] = device.describe_device()
        except ImportError as err:
            record["backends"][name] = {"error": f"not installed ({err.name}); pip install 'trmlx[{extra}]'"}

    def render(r: dict[str, Any]) -> None:
        click.echo(f"trmlx {r['packages'].get('trmlx', '?')}  git {r['git'] or '-'}  python {r['python']}  "
                   f"{r['platform']}")
        for name, version in r["packages"].items():
            click.echo(f"  {name:<22} {version}")
        for name, info in r["backends"].items():
            click.echo(f"backend {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    emit(record, as_json, render)
