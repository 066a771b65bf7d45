"""`trmlx search RUN_DIR --corpus answers.jsonl "soru"`: semantic search with a fine-tuned embedding model.

Cosine similarity over L2-normalised embeddings: exact search with numpy, or FAISS IndexFlatIP (the same exact
inner-product search, faster on large corpora) when installed. `--save-index` stores the encoded corpus keyed by
the corpus texts, the model files and the encoding settings, so a later search of the same corpus with the same
model only encodes the query.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import click

from trmlx.cli.common import console, emit, json_option, set_option
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES

TEXT_COLUMNS = ("text", "answer", "positive", "pos", "passage", "document", "content")
FAISS_FROM = 50_000  # engine=auto: FAISS (when installed) from this many corpus texts; numpy below


def read_corpus(path: str, column: str | None) -> tuple[list[str], int]:
    """Distinct non-empty texts (first-seen order) and how many duplicates were dropped. .txt: one per line;
    JSONL/JSON/CSV/TSV/Parquet: the --column, else the first of TEXT_COLUMNS present."""
    from trmlx.data.readers import read_rows

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--corpus {path}: file not found")
    if file.suffix.lower() == ".txt":
        texts = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    else:
        rows = read_rows(file)
        header = list(dict.fromkeys(k for row in rows[:50] for k in row.values))
        chosen = column or next((c for c in TEXT_COLUMNS if c in header), None)
        if chosen is None or chosen not in header:
            wanted = f"no column {column!r}" if column else f"no text column ({', '.join(TEXT_COLUMNS)})"
            raise UserError(f"--corpus {path}: {wanted}; columns present: {', '.join(header) or 'none'}; choose one "
                            "with --column")
        texts = [str(row.values.get(chosen) or "").strip() for row in rows]
    texts = [t for t in texts if t]
    unique = list(dict.fromkeys(texts))
    if not unique:
        raise UserError(f"--corpus {path}: no texts to search")
    return unique, len(texts) - len(unique)


def model_fingerprint(model: Path | str) -> list[Any]:
    """What identifies the model's weights: the folder's files with sizes and modification times."""
    folder = Path(model)
    if not folder.is_dir():
        return [str(model)]
    return sorted([str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in folder.rglob("*") if p.is_file())


def index_key(texts: Sequence[str], model: Path | str, recipe: Any) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    settings = {"texts": digest.hexdigest(), "model": model_fingerprint(model), "pooling": recipe.embedding.pooling,
                "prefix": recipe.embedding.passage_prefix, "max_length": recipe.embedding_lengths()[1]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def top_k(corpus_vectors: Any, query_vectors: Any, k: int, engine: str) -> list[list[tuple[int, float]]]:
    """(corpus index, cosine) of the k best texts per query, best first; ties by lower index (numpy)."""
    import numpy as np

    k = min(k, len(corpus_vectors))
    if engine == "faiss":
        import faiss

        index = faiss.IndexFlatIP(corpus_vectors.shape[1])
        index.add(np.ascontiguousarray(corpus_vectors, dtype=np.float32))
        scores, ids = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores)] for row_ids, row_scores in zip(ids, scores)]
    scores = query_vectors @ corpus_vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(int(j), float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def choose_engine(engine: str, size: int) -> str:
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
    if engine == "faiss" and not has_faiss:
        raise UserError("--engine faiss: faiss is not installed (pip install faiss-cpu, or faiss-gpu-cu12)")
    if engine == "auto":
        return "faiss" if has_faiss and size >= FAISS_FROM else "numpy"
    return engine


@click.command("search")
@click.argument("target", metavar="RUN_DIR|RECIPE")
@click.argument("queries", nargs=-1, required=True, metavar="QUERY...")
@click.option("--corpus", required=True, help="Texts to search: .txt (one per line), or JSONL/JSON/CSV/TSV/Parquet "
                                              "with a text column (text, answer, positive, passage, ...).")
@click.option("--column", default=None, help="The corpus file's text column (default: the first known name).")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=None,
              help="Answers per query (default embedding.top_k).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Framework to encode with (default: the run's backend, else mlx).")
@click.option("--base", "use_base", is_flag=True, help="Search with the run's base model, not the fine-tuned one.")
@click.option("--save-index", is_flag=True,
              help="Save the encoded corpus; later searches of the same corpus with the same model reuse it.")
@click.option("--index-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of saved corpus encodings (default RUN_DIR/index; with a RECIPE, beside the corpus).")
@click.option("--engine", type=click.Choice(["auto", "numpy", "faiss"]), default="auto", show_default=True,
              help=f"Exact search with numpy, or FAISS IndexFlatIP; auto = FAISS when installed and the corpus has "
                   f"≥ {FAISS_FROM:,} texts.")
@set_option
@json_option
def search(target: str, queries: tuple[str, ...], corpus: str, column: str | None, k: int | None,
           backend: str | None, use_base: bool, save_index: bool, index_dir: str | None, engine: str,
           overrides: tuple[str, ...], as_json: bool) -> None:
    """Top answers for each QUERY from a corpus, with cosine scores, using an embedding run's model."""
    import numpy as np

    from trmlx.cli.embed_eval import is_embedding_target, resolve_system
    from trmlx.backend import get_embedding_backend
    from trmlx.embedding.examples import encode

    if not is_embedding_target(target):
        if not Path(target).exists():
            raise UserError(f"{target}: no such run directory or recipe file")
        raise UserError(f"{target}: not an embedding run or recipe (task = \"embedding\")")
    texts, duplicates = read_corpus(corpus, column)
    system = resolve_system(target, backend, overrides)
    recipe = system.recipe
    model_source = recipe.model.path if use_base or system.model is None else system.model
    chosen = choose_engine(engine, len(texts))
    folder = Path(index_dir) if index_dir else (system.run / "index" if system.run else Path(corpus).parent)
    cache = folder / f"{Path(corpus).stem}-{index_key(texts, model_source, recipe)}.npy"
    model = get_embedding_backend(system.backend).load(recipe, None if model_source == recipe.model.path else model_source)
    reused = cache.is_file()
    if reused:
        vectors = np.load(cache)
        reused = vectors.shape[0] == len(texts)
    if not reused:
        vectors = encode(model, texts, recipe, "passage", recipe.eval.batch_size)
        if save_index:
            folder.mkdir(parents=True, exist_ok=True)
            np.save(cache, vectors)
    hits = top_k(vectors, encode(model, list(queries), recipe, "query"), k or recipe.embedding.top_k, chosen)
    result = {"model": str(model_source), "backend": system.backend, "engine": chosen,
              "corpus": {"path": corpus, "texts": len(texts), "duplicates_dropped": duplicates},
              "index": {"path": str(cache) if reused or save_index else None, "reused": reused,
                        "saved": save_index and not reused},
              "results": [{"query": q, "top": [{"rank": r + 1, "score": round(s, 6), "text": texts[j]}
                                               for r, (j, s) in enumerate(row)]} for q, row in zip(queries, hits)]}
    emit(result, as_json, _render)


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    index = result["index"]
    note = " (saved encodings reused)" if index["reused"] else " (encodings saved)" if index["saved"] else ""
    out.print(f"[dim]{result['corpus']['texts']} texts from {result['corpus']['path']}{note}; {result['engine']} "
              f"search, {result['backend']} backend[/dim]", highlight=False)
    for item in result["results"]:
        table = Table(title=item["query"], title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("answer")
        for hit in item["top"]:
            table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", hit["text"])
        out.print(table)
