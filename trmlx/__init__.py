"""trmlx: parameter-efficient fine-tuning for Turkish NLP on MLX (Apple silicon) and CUDA.

The core package never imports mlx or torch at module level: backends are imported only when chosen.
"""

__version__ = "0.1.0"
