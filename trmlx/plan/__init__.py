"""`trmlx plan`: predicted peak memory of a recipe on a backend, term by term, and the settings that fit a budget.

  base       Target (backend, device kind, dtype), Term and Plan, quantised-weight bytes, the parameter and overhead
             terms every task shares, the micro-batch search that fits a budget
  config     a model's config.json from a --model-shape preset or file, model.path or the Hugging Face cache
  causal     decoder-only LMs: ModelShape, the measured coefficients, plan_memory
  seq2seq    T5 / mT5: Seq2SeqShape, plan_memory
  embedding  BERT-style encoders under MNRL: EncoderShape, plan_memory, its own fit (the batch is the loss)
  tasks      one planner per task kind; load_shape, plan_recipe, fit and resolve_batch choose it by recipe.task

Imports point one way (tasks -> causal | seq2seq | embedding -> base, config); nothing here imports mlx or torch at
import time, nor training code.
"""
