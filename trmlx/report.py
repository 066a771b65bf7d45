"""The one step-report type both backends emit, the JSONL metrics log, and loss-curve plots from any run's log.

Fixed keys mean logs, plots, `bench` and `plan` never care which backend wrote them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trmlx.rundir import atomic_write


@dataclass(frozen=True)
class StepReport:
    """A training step (kind='train') or a validation pass (kind='eval') at `step`."""

    step: int
    epoch: float
    loss: float
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    trained_tokens: int = 0
    peak_memory_gb: float = 0.0
    elapsed_seconds: float = 0.0
    kind: str = "train"
    task_losses: dict[str, float] = field(default_factory=dict)  # per-task loss of multitask runs

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


class MetricsLogger:
    """Append-only JSONL log; one line per report, flushed at once so an interrupted run keeps its history."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # False on non-zero ranks of a distributed run: only rank 0 writes

    def log(self, report: StepReport | dict[str, Any]) -> None:
        """Append one record; if the disk refuses (full, read-only) the log is cut back to its last whole record
        before the error propagates, so a torn line never glues onto the next one."""
        if not self.enabled:
            return
        line = _line(report)
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(line)
        except OSError:
            try:
                os.truncate(self.path, size)
            except OSError:
                pass  # read_log skips a torn last line anyway
            raise

    def ensure(self, report: StepReport | dict[str, Any]) -> None:
        """Log `report` unless it is already the last record (a Ctrl-C may land just before or after its write)."""
        if not self.enabled:
            return
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        if not lines or lines[-1] != _line(report).rstrip("\n"):
            self.log(report)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (and torn ones), so a resumed run does not log the same steps twice;
        rewritten atomically, so a crash here keeps the old log."""
        if self.enabled and self.path.exists():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= step]
            atomic_write(self.path, "".join(_line(r) for r in kept))


def _line(report: StepReport | dict[str, Any]) -> str:
    record = report.to_json() if isinstance(report, StepReport) else report
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is skipped, not fatal."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue



def final_losses(metrics: Path, last: dict[str, StepReport]) -> dict[str, float]:
    """The last train and validation losses of a run: this invocation's reports, completed from the metrics log
    when it logged none of a kind (a resume that only wrote the adapter or model)."""
    final = {kind: report.loss for kind, report in last.items()}
    for record in read_log(metrics) if len(final) < 2 and metrics.is_file() else ():
        if record.get("kind") in ("train", "eval") and record.get("kind") not in last:
            final[record["kind"]] = record["loss"]
    return final

def plot_losses(log_path: Path, png_path: Path, title: str = "") -> Path:
    """Training loss (and validation loss where logged) against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(read_log(log_path))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for kind, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r.get("kind") == kind and r.get("loss") is not None]
        if points:
            ax.plot(*zip(*points), style, label=f"{'train' if kind == 'train' else 'validation'} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.set_title(title or Path(log_path).parent.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
