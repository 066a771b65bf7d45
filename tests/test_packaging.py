"""The built wheel installs trmlx with its backends inside the trmlx namespace, and CI runs the README's command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_wheel_imports_backends_under_trmlx(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("trmlx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trmlx/backends/mlx/device.py" in names and "trmlx/backends/cuda/device.py" in names
    assert not [n for n in names if n.startswith("backends/")]  # no generic top-level module
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = "import trmlx, trmlx.backends, trmlx.cli; print(trmlx.__file__); print(trmlx.backends.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert all(line.startswith(str(tmp_path / "site")) for line in out.stdout.split())
    # `trmlx bench` needs nothing from the checkout: run from the installed wheel in another folder, it measures
    # and writes its result there (the worker processes import the installed package too).
    pytest.importorskip("mlx.core")
    work = tmp_path / "elsewhere"
    work.mkdir()
    bench = subprocess.run([sys.executable, "-m", "trmlx", "bench", str(REPO / "recipes" / "quickstart.toml"),
                            "--backends", "mlx", "--no-peers", "--steps", "1", "--trials", "1", "--warmup", "1",
                            "--seq-len", "32", "--batch-size", "2", "--max-new-tokens", "2", "--json"],
                           capture_output=True, text=True, cwd=work,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert bench.returncode == 0, bench.stderr[-2000:]
    files = json.loads(bench.stdout)["files"]
    assert sorted(Path(f).name for f in files) == ["bench-quickstart-cpu.json", "bench-quickstart-cpu.png"]
    assert all(Path(f).parent == work for f in files)
    config = json.loads(Path(files[0]).read_text())["configs"][0]
    assert "error" not in config["trmlx"] and config["trmlx"]["trained_tokens_per_second"]["median"] > 0


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- test-command -->")
    command = readme[start:].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert "-c .ci/constraints.txt" in command and "python -m pytest" in command
    # .ci/run reads the block from README.md with this awk program; it must find exactly the block above.
    (awk,) = re.findall(r"command=\$\(awk '([^']+)' README.md\)", (REPO / ".ci" / "run").read_text())
    extracted = subprocess.run(["awk", awk, str(REPO / "README.md")], capture_output=True, text=True, check=True)
    assert extracted.stdout.strip() == command


def test_constraints_pin_every_dependency_exactly():
    import tomllib

    lines = [line for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", line) for line in lines), lines
    pinned = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=;! ]", d, maxsplit=1)[0]).lower() for d in wanted}
    assert names - {"trmlx"} <= pinned, f"not pinned in .ci/constraints.txt: {sorted(names - {'trmlx'} - pinned)}"


def test_every_package_folder_is_packaged():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])

    def dotted(root, prefix):
        return {".".join((prefix, *p.parent.relative_to(root).parts)) for p in root.rglob("__init__.py")}

    assert dotted(REPO / "trmlx", "trmlx") | dotted(REPO / "backends", "trmlx.backends") == listed
