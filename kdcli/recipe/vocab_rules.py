"""check-recipe's vocabulary rules: every model reads the run's token ids as its own tokens,
compared from tokenizer files and GGUF headers before any model loads (`kdcli.facts.vocab`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdcli.facts.modelinfo import GGUFFacts, ModelFacts, cached_hub_config, cached_hub_file
from kdcli.facts.safe_files import is_dir
from kdcli.facts.vocab import VOCAB_FIX, Vocab, chat_template_of, read_vocab, vocab_of_tokens, vocabulary_problem
from kdcli.recipe.loaded import LoadedRecipe
from kdcli.recipe.resolve import Models, gguf_file_at, student_ref_path
from kdcli.recipe.rules import Finding
from kdcli.recipe.schema import Recipe
from kdcli.recipe.sources import PretrainedModel


def model_folder(ref: str | None, revision: str | None = None, gguf_file: str | None = None) -> Path | None:
    """A model reference's folder on this machine: a local folder, or a hub id's snapshot in
    the Hugging Face cache (the one holding `gguf_file` when given); None when there is none
    (not downloaded, produced by a recipe)."""
    if not ref:
        return None
    if os.path.isabs(ref):
        return Path(ref) if is_dir(ref) else None
    if gguf_file:
        cached_file = cached_hub_file(ref, gguf_file, revision)
        return cached_file.parent if cached_file is not None else None
    cached = cached_hub_config(ref, revision)
    return Path(cached[1]).parent if cached is not None else None


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer is read from: a folder's tokenizer files, or (with `gguf_file`) the
    token list and chat template of a GGUF header (`facts`, None when it could not be read)."""

    folder: Path | None
    gguf_file: str | None = None
    facts: ModelFacts | None = None
    name: str = "the tokenizer"

    def same_as(self, other: TokenizerSource) -> bool:
        return (
            self.folder is not None
            and other.folder is not None
            and self.gguf_file == other.gguf_file
            and self.folder.resolve() == other.folder.resolve()
        )

    def vocab(self) -> Vocab | None:
        if self.gguf_file:
            if isinstance(self.facts, GGUFFacts) and self.facts.tokens:
                return vocab_of_tokens(self.facts.tokens, self.gguf_file)
            return None
        return read_vocab(self.folder) if self.folder is not None else None

    def chat_template(self) -> str | None:
        if isinstance(self.facts, GGUFFacts) and self.facts.chat_template:
            return self.facts.chat_template
        return chat_template_of(self.folder) if self.folder is not None else None


def run_tokenizer(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> TokenizerSource | None:
    """The tokenizer a run uses: the recipe's `tokenizer`, else the first teacher's (its GGUF
    file's when it names one), else the student's; None when none is known."""
    student = recipe.student if "student" in loaded.sections else None
    teachers = recipe.teachers if "teacher" in loaded.sections else []
    if isinstance(recipe.tokenizer, str) and recipe.tokenizer and "tokenizer" in loaded.sections:
        return TokenizerSource(model_folder(recipe.tokenizer), name="the recipe's tokenizer")
    if teachers:
        t = teachers[0]
        facts = models.teachers[0].facts if models.teachers else None
        return TokenizerSource(
            model_folder(t.model, t.revision, t.gguf_file), t.gguf_file, facts, "the teacher's tokenizer"
        )
    if student is not None:
        ref = student.model if isinstance(student, PretrainedModel) else student.config
        facts = models.student.facts if isinstance(student, PretrainedModel) else (models.base and models.base.facts)
        return TokenizerSource(
            model_folder(ref, student.revision, student.gguf_file), student.gguf_file, facts, "the student's tokenizer"
        )
    return None


def vocab_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> tuple[list[Finding], bool]:
    """Every model reads the run's tokenizer ids as its own tokens (`kdcli.facts.vocab`, as the run
    checks them): enough token embeddings, and a pretrained model's own tokenizer (files, or
    its GGUF header's token list) agrees with the run's on every id both have (a padded
    vocabulary agrees). Also returns whether the tokens could be compared for every model
    (then vocab_size alone decides nothing)."""
    source = run_tokenizer(recipe, loaded, models)
    used = source.vocab() if source is not None else None
    if source is None or used is None:
        return [], False
    out: list[Finding] = []
    all_compared = True
    for path, role, ref, resolved in models.refs:
        if role == "student config":
            facts, own = models.student.facts, None  # built from a config: learns these ids
        else:
            facts = resolved.facts
            gguf_file = gguf_file_at(recipe, path)
            mine = TokenizerSource(model_folder(ref, None, gguf_file), gguf_file, facts)
            same = mine.same_as(source)
            own = mine.vocab() if not same else None
            all_compared = all_compared and (same or own is not None)
        rows = facts.vocab_size if facts is not None else None
        problem = vocabulary_problem(used, source.name, own, rows, f"the {role}")
        if problem is not None:
            out.append(Finding(path, problem, VOCAB_FIX))
    return out, all_compared


def shared_vocab_findings(recipe: Recipe, loaded: LoadedRecipe, models: Models) -> list[Finding]:
    """Without readable tokenizers: teacher and student have one vocabulary size when
    intermediate matches or token-level logits compare positions (an error), or when causal-lm
    logits compare next-token distributions id by id (a warning: a padded vocabulary is fine)."""
    out: list[Finding] = []
    s = models.student.facts
    has_matches = bool(loaded.matches)
    token_level = recipe.task in ("token-classification", "causal-lm")
    if not (has_matches or token_level) or s is None or s.vocab_size is None:
        return out
    for t in models.teachers:
        if t.facts is not None and t.facts.vocab_size is not None and t.facts.vocab_size != s.vocab_size:
            if has_matches:
                why, severity = "intermediate matches compare token positions", "error"
            elif recipe.task == "token-classification":
                why, severity = "token-level logits are compared position by position", "error"
            else:
                why = (
                    "next-token distributions are compared id by id and the tokenizers could not be compared "
                    "(a vocabulary padded past its tokenizer is fine)"
                )
                severity = "warning"
            out.append(
                Finding(
                    student_ref_path(recipe, loaded),
                    f"the teacher's vocabulary has {t.facts.vocab_size} tokens and the student's {s.vocab_size}: {why}, which needs one shared tokenizer",
                    "use a student with the teacher's tokenizer (same vocab_size), e.g. one built from the teacher's config",
                    severity,
                )
            )
    return out
