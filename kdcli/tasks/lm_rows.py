"""Causal-LM rows -> token ids and their targets; the one shift rule every loss and metric uses.

**The shift rule** (`next_token_labels`): the model's output at position t predicts token t+1.
Rows keep their labels UNshifted (the Hugging Face convention: `labels[t]` is token t's id when
token t is a target, else -100), and every consumer shifts them with `next_token_labels`:
`out[:, t] = labels[:, t+1]`, `out[:, L-1] = -100`. So the first token of a row is never
predicted, and the last prompt position is the one that predicts the first completion token
(a shift that starts at the completion would silently drop that target).

**What is a target**, per `data.row_format` (`kdcli.tasks.ROW_FORMATS`):

- `text`: the text column (`data.text_column`), tokenised with the tokenizer's special tokens
  (a BOS when the tokenizer adds one); every token is a target.
- `prompt-completion`: the prompt is tokenised with the special tokens, the completion without
  them, each on its own (put the separating space or newline where the model expects it), and
  the tokenizer's EOS is appended to the completion when it has one, so the model learns to
  stop. The targets are the completion's tokens, that EOS included.
- `messages`: a list of `{"role": ..., "content": ...}` turns, rendered with the tokenizer's
  chat template (`apply_chat_template(tokenize=False)`) and tokenised once without special
  tokens (the template writes its own), with a fast tokenizer's character offsets. The targets
  are the tokens lying inside an assistant turn's characters: for assistant message i, from
  `len(render(messages[:i], add_generation_prompt=True))` to `len(render(messages[:i+1]))`. So
  the assistant's text and its end-of-turn marker (`<|im_end|>` and the newline after it in
  ChatML) are targets; the generation prompt (`<|im_start|>assistant\\n`), user and system turns
  are not. The template must render every conversation as a prefix of its continuations, and
  the first message may not be an assistant turn (there is no prompt to predict it from).

**Truncation** to `max_length` tokens. Text rows keep their start. Prompt-completion and
messages rows are split at their first target: the "prompt" (P tokens before it) and the
"completion" (C tokens from it on, later non-target turns included). A row longer than
`max_length` keeps the END of the prompt and the START of the completion:
`prompt_kept = min(P, max(max_length - C, max_length // 2))`,
`completion_kept = min(C, max_length - prompt_kept)` (a prompt cut this way loses its BOS).

Each encoded row has `input_ids`, `attention_mask`, `labels` (unshifted), `length` (tokens) and
`n_targets`: the targets at positions >= 1, i.e. the tokens some position predicts. A row with
no target left (an empty text, a completion cut away) has `n_targets` 0; `kdcli.data` drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kdcli.facts.labels import DataError
from kdcli.tasks import IGNORE_INDEX, ROW_FORMATS
from kdcli.tasks.base import Columns, Encoder

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

_NO_TEMPLATE_FIX = "Fix: use a tokenizer with a chat template, or row_format prompt-completion"


def next_token_labels(labels: Tensor) -> Tensor:
    """THE shift rule: labels (B, L) -> (B, L) with `out[:, t] = labels[:, t+1]` and
    `out[:, L-1] = -100`, so position t's output is scored against token t+1.

    Any integer dtype and device; returns a new tensor (the input is not changed)."""
    out = labels.new_full(labels.shape, IGNORE_INDEX)
    out[..., :-1] = labels[..., 1:]
    return out


def count_targets(labels: Sequence[int]) -> int:
    """Targets some position predicts: labels (L,) other than -100 at positions >= 1."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A prompt-completion or messages row (L,) cut to at most `max_length` tokens: the end of
    the prompt (tokens before the first target) and the start of the completion (see module doc)."""
    if len(ids) <= max_length:
        return ids, labels
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    prompt, completion = start, len(ids) - start
    prompt_kept = min(prompt, max(max_length - completion, max_length // 2))
    completion_kept = min(completion, max_length - prompt_kept)
    keep = slice(start - prompt_kept, start + completion_kept)
    return ids[keep], labels[keep]


def target_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For tokens with character offsets (L,) [start, end): whether each lies inside one of
    the character spans [start, end) (an empty token counts when it starts inside one)."""
    return [any(lo <= s and e <= hi and s < hi for lo, hi in spans) for s, e in offsets]


def _where(source: str, column: str, row: int) -> str:
    return f"{source}, column {column!r}, row {row}"


def _text_cell(value: Any, source: str, column: str, row: int) -> str:
    if value is None:
        raise DataError(f"{_where(source, column, row)}: the cell is empty (missing). Fix: fill it in or drop the row")
    if not isinstance(value, str):
        raise DataError(
            f"{_where(source, column, row)}: expected text, got a {type(value).__name__}. "
            "Fix: make the column hold strings"
        )
    return value


def _messages_cell(value: Any, source: str, column: str, row: int) -> list[dict[str, Any]]:
    """The turns of one messages cell, keys holding None dropped (datasets fills the keys some
    other row's turns have with None); `DataError` for anything else than a list of turns."""
    where = _where(source, column, row)
    fix = 'Fix: give each row a list of {"role": "user" | "assistant" | "system", "content": "..."} turns'
    if value is None:
        raise DataError(f"{where}: the cell is empty (missing). {fix}")
    if not isinstance(value, (list, tuple)) or not value:
        kind = "an empty list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        raise DataError(f"{where}: expected a list of chat turns, got {kind}. {fix}")
    turns = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} is a {type(turn).__name__}, not a role/content object. {fix}")
        turn = {k: v for k, v in turn.items() if v is not None}
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                got = "missing" if key not in turn else f"a {type(turn[key]).__name__}"
                raise DataError(f"{where}: turn {i} has no string {key!r} ({got}). {fix}")
        turns.append(turn)
    if turns[0]["role"] == "assistant":
        raise DataError(
            f"{where}: the first turn is an assistant turn, so nothing comes before it to predict it "
            "from. Fix: start each conversation with a user (or system) turn"
        )
    return turns


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool, where: str) -> str:
    """The chat template's text of `messages`; `DataError` naming the row when the template raises
    (e.g. "roles must alternate")."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 TemplateError, or whatever a template's raise_exception raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"{where}: the chat template refused the conversation ({type(exc).__name__}: {first}). "
            "Fix: give turns the roles and order the tokenizer's chat template accepts"
        ) from exc


def assistant_spans(tokenizer, messages: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's rendering of a conversation and the character spans [start, end) of
    its assistant turns (see module doc); `DataError` when turns do not render as prefixes."""
    text = _render(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{where}: the chat template does not render turns as prefixes (the conversation up to "
                f"turn {i + 1} does not start with its rendering up to turn {i} plus the generation "
                "prompt), so the assistant turns cannot be located. Fix: use a tokenizer whose chat "
                "template renders each turn as an append-only prefix, or row_format prompt-completion"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _check_tokenizer(tokenizer, row_format: str, source: str) -> None:
    if row_format not in ROW_FORMATS:
        raise DataError(f"{source}: unknown data.row_format {row_format!r}. Fix: use one of {', '.join(ROW_FORMATS)}")
    if row_format != "messages":
        return
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: row_format messages needs the tokenizer's chat template, and this tokenizer has "
            f"none. {_NO_TEMPLATE_FIX}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{source}: row_format messages needs a fast tokenizer (character offsets locate the "
            f"assistant turns), and this one is slow ({type(tokenizer).__name__}). Fix: use a tokenizer "
            "with a tokenizer.json (a fast tokenizer), or row_format prompt-completion"
        )


#: The columns of an encoded row, in order.
ROW_KEYS = ("input_ids", "attention_mask", "labels", "length", "n_targets")
#: The recipe options naming the columns each row format reads, and their `Columns` fields.
FORMAT_COLUMNS = {
    "text": (("text_column", "text"),),
    "prompt-completion": (("prompt_column", "prompt"), ("completion_column", "completion")),
    "messages": (("messages_column", "messages"),),
}


def _row(ids: list[int], labels: list[int]) -> dict[str, Any]:
    """One encoded row from its ids and unshifted labels (L,)."""
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "length": len(ids),
        "n_targets": count_targets(labels),
    }


def prompt_length(labels: Sequence[int]) -> int:
    """Where an encoded row's last completion starts: the first target of its last run of
    targets (the last assistant turn of a conversation, the completion of a prompt-completion
    row). Everything before it is the prompt `distillation.on_policy` generates from (for
    messages rows it ends with the chat template's generation prompt, which is no target)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def generation_prompt(ids: Sequence[int], labels: Sequence[int], room: int) -> list[int]:
    """The prompt of an encoded row (`prompt_length`), its end kept when it is longer than
    `room` tokens (data.max_length - on_policy.max_new_tokens: the generated row fits)."""
    prompt = list(ids[: prompt_length(labels)])
    return prompt[-room:] if len(prompt) > room else prompt


def generated_row(prompt: list[int], completion: list[int]) -> dict[str, Any]:
    """A row whose completion was generated: the prompt is no target, every completion token
    is (its end marker included when it has one); the same shift rule as dataset rows."""
    return _row(prompt + completion, [IGNORE_INDEX] * len(prompt) + list(completion))


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[dict[str, Any]]:
    """Text rows: tokens with the special tokens, all targets, the start kept."""
    rows = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids[:max_length])
        rows.append(_row(ids, list(ids)))
    return rows


def encode_prompt_completions(
    tokenizer, prompts: list[str], completions: list[str], max_length: int
) -> list[dict[str, Any]]:
    """Prompt (with special tokens) + completion (without, then EOS when the tokenizer has one);
    the completion's tokens are the targets; truncated by `truncate`."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        c = list(c) + eos
        rows.append(_row(*truncate(list(p) + c, [IGNORE_INDEX] * len(p) + c, max_length)))
    return rows


def encode_conversations(
    tokenizer, conversations: list[list[dict[str, Any]]], wheres: list[str], max_length: int
) -> list[dict[str, Any]]:
    """Chat-template renderings tokenised without special tokens; the tokens inside assistant
    turns are the targets; truncated by `truncate`. `wheres` name each row in errors."""
    texts, all_spans = [], []
    for messages, where in zip(conversations, wheres, strict=True):
        text, spans = assistant_spans(tokenizer, messages, where)
        texts.append(text)
        all_spans.append(spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans, strict=True):
        mask = target_mask(offsets, spans)
        labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]
        rows.append(_row(*truncate(list(ids), labels, max_length)))
    return rows


def encoder(tokenizer, columns: Columns, max_length: int, source: str) -> Encoder:
    """The `datasets.map(batched=True)` function encoding causal-LM rows of `columns.row_format`.

    Returns `encode(rows, indices=None)`: columns of raw rows -> `input_ids`, `attention_mask`,
    `labels` (unshifted, -100 off the targets), `length`, `n_targets` per row (see module doc).
    `indices` (datasets' `with_indices=True`) numbers the rows in errors (from 1); without it
    rows are numbered within the batch. `DataError` here for an unknown row format or a
    tokenizer that cannot encode it, and at encoding for a missing column or a bad cell.
    """
    row_format = columns.row_format
    _check_tokenizer(tokenizer, row_format, source)
    needed = [(option, getattr(columns, name)) for option, name in FORMAT_COLUMNS[row_format]]

    def cells(rows: dict[str, list], option: str, column: str, numbers: list[int]) -> list[Any]:
        if column not in rows:
            raise DataError(
                f"{source}: no column {column!r} (data.{option}); it has {sorted(rows)}. "
                f"Fix: set data.{option} to one of them"
            )
        check = _messages_cell if row_format == "messages" else _text_cell
        return [check(v, source, column, n) for v, n in zip(rows[column], numbers, strict=True)]

    def encode(rows: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        size = len(next(iter(rows.values()), []))
        numbers = [i + 1 for i in indices] if indices is not None else list(range(1, size + 1))
        values = [cells(rows, option, column, numbers) for option, column in needed]
        if not numbers:
            encoded: list[dict[str, Any]] = []
        elif row_format == "text":
            encoded = encode_texts(tokenizer, values[0], max_length)
        elif row_format == "prompt-completion":
            encoded = encode_prompt_completions(tokenizer, values[0], values[1], max_length)
        else:
            wheres = [_where(source, columns.messages, n) for n in numbers]
            encoded = encode_conversations(tokenizer, values[0], wheres, max_length)
        return {k: [row[k] for row in encoded] for k in ROW_KEYS}

    return encode
