"""The config.json (as a dict) of every model a recipe names, without torch: local folders,
`pkg:` folders (already absolute in a loaded recipe), the Hugging Face cache or hub, folders
another recipe produces (its student's config plus overrides), and GGUF headers (the facts
`kdcli.facts.modelinfo.gguf` reads, spelled as transformers' config keys)."""

from __future__ import annotations

import os
from pathlib import Path

from kdcli.errors import UsageError
from kdcli.facts.modelinfo import ConfigUnavailable, GGUFUnreadable, cached_hub_config, cached_hub_file, gguf_facts
from kdcli.facts.modelinfo.config import read_config
from kdcli.facts.modelinfo.hub import fetch_hub_config, is_offline
from kdcli.recipe.load import read_recipe
from kdcli.recipe.loaded import display_name
from kdcli.recipe.prune_schema import prune_targets
from kdcli.recipe.sources import PretrainedModel

_FIX = "Fix: make its config.json available (a local folder, the Hugging Face cache, or network access)"


def gguf_config(path: str | Path) -> dict:
    """A config dict from a GGUF header (raises GGUFUnreadable)."""
    facts = gguf_facts(path)
    config = {
        "model_type": facts.model_type,
        "num_hidden_layers": facts.num_hidden_layers,
        "hidden_size": facts.hidden_size,
        "num_attention_heads": facts.num_attention_heads,
        "num_key_value_heads": facts.num_key_value_heads,
        "intermediate_size": facts.intermediate_size,
        "vocab_size": facts.vocab_size,
        "max_position_embeddings": facts.max_position_embeddings,
        "tie_word_embeddings": facts.tie_word_embeddings,
    }
    return {k: v for k, v in config.items() if v is not None}


class Configs:
    """Config dicts of model references, for one plan (`producers`: output folder -> recipes)."""

    def __init__(self, producers: dict[str, list[Path]]) -> None:
        self.producers = producers
        self._visiting: set[Path] = set()

    def model(self, ref: str, revision: str | None, gguf_file: str | None, role: str) -> dict:
        if gguf_file:
            return self._gguf(ref, revision, gguf_file, role)
        if os.path.isabs(ref):
            folder = Path(ref)
            if (folder / "config.json").is_file():
                try:
                    return read_config(folder)
                except ConfigUnavailable as exc:
                    raise UsageError(f"{role} {ref}: {exc.reason}. {_FIX}") from None
            makers = self.producers.get(os.path.normpath(ref), [])
            if makers:
                return self.produced(makers[0], role)
            raise UsageError(f"{role} {ref} has no config.json. {_FIX}")
        cached = cached_hub_config(ref, revision)
        if cached is not None:
            return cached[0]
        if is_offline():
            raise UsageError(f"{role} {ref} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. {_FIX}")
        try:
            return fetch_hub_config(ref, revision or "main")[0]
        except ConfigUnavailable as exc:
            raise UsageError(f"{role} {ref}: {exc.reason}. {_FIX}") from None

    def _gguf(self, ref: str, revision: str | None, gguf_file: str, role: str) -> dict:
        path = Path(ref) / gguf_file if os.path.isabs(ref) else cached_hub_file(ref, gguf_file, revision)
        if path is None or not Path(path).is_file():
            raise UsageError(
                f"{role} {ref}: {gguf_file} is not there (GGUF headers are read locally only). "
                "Fix: install or download the GGUF file"
            )
        try:
            return gguf_config(path)
        except GGUFUnreadable as exc:
            raise UsageError(f"{role} {path}: {exc.reason}. Fix: use an intact GGUF file") from None

    def student(self, student, role: str = "student") -> dict:
        """The student's config: its model's, or its base config with the overrides applied."""
        if isinstance(student, PretrainedModel):
            return self.model(student.model, student.revision, student.gguf_file, role)
        if not student.config:
            raise UsageError(f"{role}: no config to start from. Fix: set student.config")
        base = self.model(student.config, student.revision, student.gguf_file, f"{role} config")
        if student.prune is not None:  # the pruned sizes, head_dim kept (one rule: kdcli.recipe.prune_schema)
            return {**base, **student.overrides, **prune_targets(base, student.prune)[0]}
        return {**base, **student.overrides}

    def produced(self, recipe_file: Path, role: str) -> dict:
        """The config of the model `recipe_file` writes: its student's."""
        name = display_name(recipe_file)
        if recipe_file in self._visiting:
            raise UsageError(f"{role}: recipes produce each other in a cycle through {name}. Fix: break the cycle")
        self._visiting.add(recipe_file)
        try:
            recipe = read_recipe(recipe_file, producers=self.producers).recipe
            if recipe is None:
                raise UsageError(f"{role} is produced by {name}, which is not a valid recipe. Fix: kdcli check-recipe")
            return self.student(recipe.student, f"{role} (the student of {name})")
        finally:
            self._visiting.discard(recipe_file)
