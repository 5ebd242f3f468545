"""lm-eval task definitions of the toy world (YAML + JSONL); a package so tests can import utils."""
