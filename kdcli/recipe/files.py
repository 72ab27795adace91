"""The files a recipe names: model folders, data files, the output folder."""

from __future__ import annotations

import os
from pathlib import Path

from kdcli.facts.safe_files import exists, is_dir, is_file
from kdcli.recipe.discover import sniff_json
from kdcli.recipe.loaded import LoadedRecipe, display_name
from kdcli.recipe.messages import JsonPath, dotted, show, suggest
from kdcli.recipe.sources import ConfigStudent, PretrainedModel
from kdcli.recipe.validation import Mode, kind_of


def close_names(missing: Path, want_dir: bool, outside: bool = False) -> str:
    """A did-you-mean among the missing path's neighbours; none outside the repository (a
    lint step in CI must not list folders of the machine it runs on)."""
    if outside:
        return "check the path; keep models and data inside the repository, relative to the recipe's folder"
    parent = missing.parent
    if not is_dir(parent):
        return f"its folder {parent} does not exist either"
    try:
        names = [p.name for p in parent.iterdir() if is_dir(p) == want_dir and not p.name.startswith(".")]
    except OSError:
        names = []
    guess = suggest(missing.name, names)
    return (
        f"did you mean '{guess}'?"
        if guess
        else "check the spelling; relative paths resolve against the recipe's folder"
    )


def kind_of_file(path: Path) -> str:
    return kind_of(sniff_json(path).raw) or "train"


_OUTSIDE_FIX = (
    "keep models and data inside the repository and refer to them relative to the recipe's folder "
    "(or use a hub id or pkg:<package>/<folder>)"
)


def _warn_outside(loaded: LoadedRecipe, path: JsonPath, resolved: str, what: str) -> bool:
    """A warning when the local path at `path` leaves the repository; True when it does."""
    why = loaded.outside(path, resolved)
    if why is not None:
        loaded.add(
            path,
            f"{what} {show(loaded.written(path))} {why}: a recipe should name only files inside its repository "
            f"({loaded.root}); check-recipe shows nothing read from it",
            _OUTSIDE_FIX,
            "warning",
        )
    return why is not None


def _check_model_folder(
    loaded: LoadedRecipe,
    path: JsonPath,
    folder: str,
    role: str,
    producers: dict[str, list[Path]],
    mode: Mode | None,
    gguf_file: str | None = None,
) -> None:
    folder_path = Path(folder)
    written = loaded.written(path)
    shown = show(written) if isinstance(written, str) else show(folder)
    outside = _warn_outside(loaded, path, folder, f"{role} folder")
    if is_file(folder_path / "config.json") or (gguf_file and is_dir(folder_path)):
        return  # a GGUF checkpoint needs no config.json (recipe.lm_rules checks its file)
    makers = [p for p in producers.get(os.path.normpath(folder), []) if p != loaded.source]
    if makers:
        maker = makers[0]
        if mode is not None:
            loaded.add(
                path,
                f"{role} folder {shown} does not exist yet ({folder}); it is produced by {display_name(maker)}",
                f"run `kdcli {kind_of_file(maker)} {display_name(maker)}` first",
            )
        else:
            loaded.produced[os.path.normpath(folder)] = maker
            note = f"{dotted(path)} {shown}: produced by {display_name(maker)}"
            if note not in loaded.notes:
                loaded.notes.append(note)
        return
    if is_dir(folder_path):
        loaded.add(
            path,
            f"{role} folder {shown} has no config.json ({folder})",
            "point it at a folder written by save_pretrained",
        )
        return
    loaded.add(
        path, f"{role} folder {shown} not found ({folder})", close_names(folder_path, want_dir=True, outside=outside)
    )


def check_files(loaded: LoadedRecipe, producers: dict[str, list[Path]], mode: Mode | None) -> None:
    """Local model folders and data files exist; the output folder overwrites nothing."""
    recipe, sections = loaded.view, loaded.sections
    assert recipe is not None  # internal: only called once a view exists
    if "teacher" in sections:
        many = isinstance(recipe.teacher, list)
        for i, teacher in enumerate(recipe.teachers):
            path: JsonPath = ("teacher", i, "model") if many else ("teacher", "model")
            if teacher.is_local:
                _check_model_folder(loaded, path, teacher.model, "teacher", producers, mode, teacher.gguf_file)
    student = recipe.student if "student" in sections else None
    if isinstance(student, PretrainedModel) and student.is_local:
        _check_model_folder(loaded, ("student", "model"), student.model, "student", producers, mode, student.gguf_file)
    if isinstance(student, ConfigStudent) and student.config and os.path.isabs(student.config):
        if loaded.written(("student", "config")) is not None:
            _check_model_folder(
                loaded, ("student", "config"), student.config, "student config", producers, mode, student.gguf_file
            )
    if "tokenizer" in sections and recipe.tokenizer and os.path.isabs(recipe.tokenizer):
        outside = _warn_outside(loaded, ("tokenizer",), recipe.tokenizer, "tokenizer folder")
        if not is_dir(recipe.tokenizer) and (mode is not None or os.path.normpath(recipe.tokenizer) not in producers):
            loaded.add(
                ("tokenizer",),
                f"tokenizer folder {show(loaded.written(('tokenizer',)))} not found ({recipe.tokenizer})",
                close_names(Path(recipe.tokenizer), want_dir=True, outside=outside),
            )
    if "data" in sections:
        for name, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
            if source is None or not source.is_local:
                continue
            path = loaded.data_path(name)
            file = Path(source.path)
            outside = _warn_outside(loaded, path, source.path, f"data.{name} file")
            if not is_file(file):
                if is_dir(file):
                    what = "is a folder, not a file"
                elif exists(file):
                    what = "is not a regular file (a device, FIFO or socket)"
                else:
                    what = "not found"
                loaded.add(
                    path,
                    f"data file {show(loaded.written(path))} {what} ({source.path})",
                    close_names(file, want_dir=False, outside=outside),
                )
    if "training" not in sections:
        return
    out_dir = os.path.normpath(recipe.training.output_dir or "")
    where: JsonPath = ("training", "output_dir") if loaded.written(("training", "output_dir")) else ("training",)
    reading = [t.model for t in recipe.teachers] if "teacher" in sections else []
    if student is not None:
        reading.append(getattr(student, "model", None) or getattr(student, "config", None))
    if any(r and os.path.isabs(r) and os.path.normpath(r) == out_dir for r in reading):
        loaded.add(
            where,
            f"output_dir {out_dir} is also a model this recipe reads; the run would overwrite it",
            "write the result to another folder",
        )
    others = [p for p in producers.get(out_dir, []) if p != loaded.source]
    if others:
        loaded.add(
            where,
            f"{display_name(others[0])} writes to the same output_dir {out_dir}",
            "give each recipe its own output_dir",
            "warning",
        )
