"""kdcli: knowledge distillation for Hugging Face transformers, driven by a JSON recipe."""

__version__ = "0.1.0"
