"""The MLX backend (Apple silicon Metal, MLX's CPU and CUDA builds). Importing it imports mlx."""
