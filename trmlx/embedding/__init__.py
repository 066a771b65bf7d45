"""Embedding (retrieval) fine-tuning, backend-agnostic:

  examples  records -> (query, positive, negatives), hard-negative mining, the examples file; `encode`
  batches   batches without a repeated text, resumable batch order, step count, the report window
  flow      `trmlx train` for task = "embedding" (RUN/model, RUN/negatives.jsonl)
  eval      retrieval metrics of an encoder over a corpus, and the paired comparison of systems

The backends' embedding halves (backends/<name>/embed.py, trmlx.backend.EmbeddingBackend) only load, encode, train
and save.
"""
