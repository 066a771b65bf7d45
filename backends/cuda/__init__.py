"""The CUDA backend (torch + transformers + peft + bitsandbytes); runs on the CPU when no GPU is visible."""
