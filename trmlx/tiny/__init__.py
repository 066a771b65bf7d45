"""Tiny random models built offline, deterministically: the quickstarts' models and the tests' and benchmarks'.

  tokenizer  the byte-level BPE both tiny generators train, saved in a form transformers 4.x and 5.x load
  llama      a Llama decoder (`python -m trmlx.tiny.llama OUT`: the causal quickstart's model)
  t5         an mT5-style encoder-decoder (`python -m trmlx.tiny.t5 OUT`: the seq2seq quickstarts' model)
  encoder    BERT / XLM-R encoders of any shape with the packaged MiniLM's tokenizer (plan calibration, tests)
"""
