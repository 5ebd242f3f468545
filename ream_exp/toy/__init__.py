"""The embedded toy world: a small trained Qwen3-MoE, its data and its lm-eval tasks (README.md)."""
