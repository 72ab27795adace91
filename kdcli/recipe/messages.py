"""What recipe messages share: JSON paths, values shown as written, did-you-mean."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable

PathKey = str | int
JsonPath = tuple[PathKey, ...]


def suggest(word: object, options: Iterable[str]) -> str | None:
    """The closest option to `word` (case-insensitive, difflib), or None if none is close."""
    if not isinstance(word, str):
        return None
    by_lower = {option.lower(): option for option in options}
    if word.lower() in by_lower:
        return by_lower[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def did_you_mean(word: object, options: Iterable[str]) -> str:
    options = list(options)
    guess = suggest(word, options)
    if guess is not None:
        return f"did you mean '{guess}'?"
    return "use one of: " + ", ".join(options)


def show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it in JSON, shortened for messages."""
    if isinstance(value, float) and not math.isfinite(value):
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dotted(path: Iterable[PathKey]) -> str:
    """('distillation', 'intermediate_matches', 2, 'proj') -> 'distillation.intermediate_matches[2].proj'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out
