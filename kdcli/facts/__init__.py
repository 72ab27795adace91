"""Torch-free facts that `check-recipe` and the run both read, each written once: model facts
from config.json, weight headers and GGUF headers (`modelinfo`), per-architecture names
(`architectures`), label ids (`labels`), csv/tsv records (`tabular`), tokenizer vocabularies
(`vocab`) and the safe reading of what a recipe names (`safe_files`)."""
