"""`trmlx bench`, shipped with the package (nothing here reads the source checkout):

  run        the orchestration: model, one worker process per side and configuration, the result file
  harness    what every measurement shares: clocks, peak-memory probes, matmul rate, trial timing, summaries,
             the worker processes (`python -m trmlx.bench.harness MODULE:WORKER SPEC RESULT`)
  report     the terminal table and the PNG chart
  causal     causal-LM workers: trmlx and the mlx-lm peer;  hf_causal: the Trainer + peft + bitsandbytes peer
  seq2seq    T5/mT5 workers: trmlx and the HF Trainer peer
  embedding  retrieval-encoder workers: trmlx and the sentence-transformers peer

benchmarks/ holds scripts that import these pieces; results go where the user says (default: the current folder).
"""
