"""Prompt tuning of T5/mT5 on MLX (backends/mlx/t5_prompt.py): PEFT's semantics and file format, checked against
torch+peft on the tiny offline mT5 both ways (logits of a padded batch, greedy generation), and a short training run
on the seq2seq quickstart whose adapter evaluates identically on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the parity check needs torch (pip install 'trmlx[cuda]')")
peft_lib = pytest.importorskip("peft", reason="the parity check needs peft (pip install 'trmlx[cuda]')")

from tests.conftest import REPO  # noqa: E402
from trmlx.errors import UserError  # noqa: E402
from trmlx.recipe.schema import PeftConfig  # noqa: E402

TINY = REPO / "recipes" / "models" / "tiny-mt5-tr"
QUICKSTART = str(REPO / "recipes" / "seq2seq_quickstart.toml")
N = 5
TEXTS = ["Ankara Türkiye'nin başkentidir ve büyük bir şehirdir.", "Merhaba dünya", "kısa"]
DECODER_IDS = np.array([[0, 5, 17, 99, 3, 140], [0, 44, 2, 190, 18, 18], [0, 150, 61, 25, 7, 7]])


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Three texts of different lengths, right-padded as T5's tokenizer pads them."""
    enc = tokenizer()(TEXTS, return_tensors="np", padding=True)
    assert enc["attention_mask"].min() == 0  # really padded
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def mlx_base():
    from trmlx.backends.mlx.t5 import load_t5

    return load_t5(TINY)


def torch_model():
    from transformers import MT5ForConditionalGeneration

    return MT5ForConditionalGeneration.from_pretrained(str(TINY), dtype=torch.float32).eval()


def peft_logits(model) -> np.ndarray:
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(DECODER_IDS)).logits.numpy()


def mlx_logits(model) -> np.ndarray:
    ids, mask = batch()
    return np.array(model(mx.array(ids), mx.array(mask), mx.array(DECODER_IDS)))


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A prompt-tuning adapter saved by peft itself (SAMPLE_VOCAB init, then moved off the vocabulary), with its
    model and its logits on the padded batch."""
    torch.manual_seed(0)
    config = peft_lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N,
                                         prompt_tuning_init="SAMPLE_VOCAB")
    model = peft_lib.get_peft_model(torch_model(), config).eval()
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight
        weight.add_(0.5 * torch.randn(weight.shape))
    path = tmp_path_factory.mktemp("peft") / "prompt"
    model.save_pretrained(str(path))
    return path, model, peft_logits(model)


@pytest.mark.parametrize("text", ["", "Özetle: kısa bir özet yaz"])
def test_mlx_adapter_loads_in_peft_with_same_logits(tmp_path, text):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from safetensors.numpy import load_file

    from trmlx.backends.mlx import t5_prompt

    mx.random.seed(0)
    model, config = mlx_base()
    base = mlx_logits(model)
    wrapped = t5_prompt.attach(model, config, PeftConfig(method="prompt", num_virtual_tokens=N,
                                                         prompt_init_text=text), tokenizer())
    assert [k for k, _ in tree_flatten(wrapped.trainable_parameters())] == ["prompt"]
    assert wrapped.prompt.shape == (2 * N, 64)  # peft's table for SEQ_2_SEQ_LM: num_transformer_submodules = 2
    ours = mlx_logits(wrapped)
    assert ours.shape == base.shape == (3, DECODER_IDS.shape[1], 1024)  # real decoder positions only
    assert relative_error(ours, base) > 1e-2  # the virtual tokens really act
    ids, mask = batch()

    def loss(m):
        return m(mx.array(ids), mx.array(mask), mx.array(DECODER_IDS)).sum()

    grad = np.array(nn.value_and_grad(wrapped, loss)(wrapped)[1]["prompt"])
    assert np.all(np.abs(grad[:N]).sum(axis=1) > 0) and not grad[N:].any()  # as in peft: rows n.. unused

    t5_prompt.save(wrapped, tmp_path / "adapter", str(TINY))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {"prompt_embeddings": (2 * N, 64)}
    theirs = peft_lib.PeftModel.from_pretrained(torch_model(), str(tmp_path / "adapter")).eval()
    assert relative_error(peft_logits(theirs), ours) < 1e-4
    if text:  # PEFT's TEXT init of the whole 2n table: peft builds the same table from the same text
        torch_peft = peft_lib.get_peft_model(torch_model(), peft_lib.PromptTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(TINY)))
        expected = torch_peft.prompt_encoder["default"].embedding.weight.detach().numpy()
        assert np.array_equal(saved["prompt_embeddings"], expected)


def test_peft_adapter_loads_in_mlx_with_same_logits_and_same_files(peft_adapter, tmp_path):
    from safetensors.numpy import load_file

    from trmlx.backends.mlx import t5_prompt

    path, _, theirs = peft_adapter
    model, config = mlx_base()
    wrapped = t5_prompt.load(model, config, path)
    assert relative_error(mlx_logits(wrapped), theirs) < 1e-4
    t5_prompt.save(wrapped, tmp_path / "again", str(TINY))  # saving again writes what peft wrote
    peft_weights, our_weights = (load_file(str(p / "adapter_model.safetensors")) for p in (path, tmp_path / "again"))
    assert list(our_weights) == list(peft_weights) == ["prompt_embeddings"]
    assert np.array_equal(our_weights["prompt_embeddings"], peft_weights["prompt_embeddings"])
    peft_config, our_config = (json.loads((p / "adapter_config.json").read_text()) for p in (path, tmp_path / "again"))
    assert set(our_config) <= set(peft_config)
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "prompt_tuning_init", "inference_mode"):
        assert our_config.get(key) == peft_config.get(key), key


def test_batched_greedy_generation_matches_peft_and_one_at_a_time(peft_adapter):
    from trmlx.backends.mlx import t5_prompt
    from trmlx.backends.mlx.t5_generate import generate_greedy

    path, theirs, _ = peft_adapter
    model, config = mlx_base()
    wrapped = t5_prompt.load(model, config, path)
    ids, mask = batch()
    eos = tokenizer().eos_token_id
    ours = generate_greedy(wrapped, mx.array(ids), mx.array(mask), max_new_tokens=12, eos_id=eos, pad_id=0)
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                              do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = [row[1:] for row in out.tolist()]  # drop decoder_start; cut at EOS, as ours are
    expected = [row[: row.index(eos)] if eos in row else row for row in expected]
    assert ours == expected and len({tuple(r) for r in ours}) == 3
    assert all(len(r) for r in ours)
    rows = [list(r[m == 1]) for r, m in zip(ids, mask)]
    assert ours == [generate_greedy(wrapped, [r], max_new_tokens=12, eos_id=eos)[0] for r in rows]


def test_training_lowers_the_loss_and_eval_agrees_across_backends(tmp_path, cli):
    from trmlx import run as runner
    from trmlx.report import read_log

    # With grad_checkpoint (mx.checkpoint keeps only array arguments' gradients; the prompt reaches the blocks as one).
    # The quickstart's two tasks on 4 training rows each: one batch of 8, seen every step, so the loss must fall
    # (the full mixture's batches differ too much on this random tiny model for 3 steps to show a trend).
    data = REPO / "recipes" / "data"
    for name in ("tr_news_summary", "tr_reading_qa"):
        rows = (data / name / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]
        (tmp_path / f"{name}.jsonl").write_text("".join(rows), encoding="utf-8")
    few = {name: json.dumps(str(tmp_path / f"{name}.jsonl")) for name in ("tr_news_summary", "tr_reading_qa")}
    tasks = (f'[{{name="summarize", train={few["tr_news_summary"]}, valid={few["tr_news_summary"]}, '
             f'test="{data}/tr_news_summary/test.jsonl", columns={{input="text", target="summary"}}, '
             f'prefix="summarize: ", metrics=["rouge"]}}, '
             f'{{name="qa", train={few["tr_reading_qa"]}, valid={few["tr_reading_qa"]}, '
             f'test="{data}/tr_reading_qa/test.jsonl", columns={{target="answer"}}, '
             f'template="answer: {{question}} context: {{context}}", metrics=["em", "f1"]}}]')
    setup = runner.resolve_run(QUICKSTART, "mlx", ["peft.method='prompt'", "peft.num_virtual_tokens=8",
                                                   f"data.tasks={tasks}", "train.steps=3", "train.batch_size=8",
                                                   "train.lr=0.1", "train.warmup_steps=0", "train.log_every=1",
                                                   "train.eval_every=0", "train.save_every=0", "data.max_length=96",
                                                   "train.grad_checkpoint=true"],  # the prompt must still learn
                               str(tmp_path / "run"), None)
    runner.train(setup, "mlx")
    losses = [r["loss"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.1, losses
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"],
            config["num_transformer_submodules"]) == ("PROMPT_TUNING", "SEQ_2_SEQ_LM", 8, 2)
    results = {}
    for backend in ("mlx", "cuda"):
        out = tmp_path / f"eval-{backend}"
        result = cli("eval", str(tmp_path / "run"), "--backend", backend, "--max-samples", "3", "--output",
                     str(out), "--json", "--set", "eval.max_new_tokens=12")
        assert result.exit_code == 0, result.output
        results[backend] = json.loads(result.stdout), (out / "predictions" / "test.jsonl").read_text()
    assert results["mlx"][1] == results["cuda"][1]  # greedy predictions identical across backends
    assert any(json.loads(line)["prediction"] for line in results["mlx"][1].splitlines())
    assert results["mlx"][0]["metrics"]["loss"] == pytest.approx(results["cuda"][0]["metrics"]["loss"], rel=1e-4)


def test_prefix_tuning_and_foreign_adapters_are_user_errors(peft_adapter, tmp_path):
    from trmlx.backends.mlx import t5_prompt
    from trmlx.backends.mlx.model import load
    from trmlx.recipe import load_recipe

    with pytest.raises(UserError, match="prefix tuning of T5 models is not available in the MLX backend"):
        load(load_recipe(QUICKSTART, ["peft.method='prefix'"], "mlx"))
    path = tmp_path / "causal"
    path.mkdir()
    config = json.loads((peft_adapter[0] / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    model, model_config = mlx_base()
    with pytest.raises(UserError, match="PROMPT_TUNING adapters with task_type SEQ_2_SEQ_LM"):
        t5_prompt.load(model, model_config, path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": N + 1}))
    (path / "adapter_model.safetensors").write_bytes((peft_adapter[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"prompt_embeddings has shape \(10, 64\), but this model needs \(12, 64\)"):
        t5_prompt.load(model, model_config, path)
