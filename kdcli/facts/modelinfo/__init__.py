"""Facts about a model read from its `config.json` alone: layers, sizes, heads, vocabulary.

`check-recipe`'s model-aware rules (layer numbers exist, `proj` sizes, head counts, shared
vocabulary, `init_from_teacher`) need a handful of numbers per model, never its weights. This
module gets them without torch or transformers:

- a local folder: `<folder>/config.json`;
- a folder inside an installed Python package (`pkg:<package>/<sub/folder>`), found with
  `importlib.util.find_spec` WITHOUT importing the package;
- a hub id: the Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`),
  then the hub itself over HTTPS (a short timeout; skipped when `HF_HUB_OFFLINE=1` or
  `TRANSFORMERS_OFFLINE=1`). When none works, `ConfigUnavailable` says why, and the caller
  reports which rules could not be checked.

Config field names differ between architectures (BERT's `num_hidden_layers` is DistilBERT's
`n_layers` and GPT-2's `n_layer`); `facts_from_config` reads the usual spellings, as
transformers' `attribute_map` does. `config_num_labels` reads the head size wherever a config
keeps it (transformers 5 writes nothing for 2 labels).

Weight files are read only as far as their headers: `weight_shapes(folder)` gives every
tensor's shape from `model.safetensors` (or the shards of `model.safetensors.index.json`),
checking that the header covers the file exactly (`WeightsUnreadable` for an empty, truncated or
random file), and `weight_disagreements(shapes, config)` says where config.json and the weights
disagree (vocabulary rows, embedding width, block count, hidden width, head rows).

A GGUF checkpoint (`gguf_file`) has no config.json: `gguf_facts(path)` reads the same facts
from its header (`{arch}.block_count`, ...), plus its token list and chat template, without
reading its tensors (`GGUFUnreadable` for a truncated, hostile or special file).

Modules: `config` (facts from a config.json), `hub` (pkg: folders, the cache, the hub),
`weights` (safetensors headers), `pickles` (pickled weights inspected without unpickling),
`gguf` (GGUF headers).
"""

from kdcli.facts.modelinfo.config import (
    GENERIC_CONFIG_KEYS,
    ConfigUnavailable,
    ModelFacts,
    config_num_labels,
    facts_from_config,
    local_facts,
    read_config,
    with_overrides,
)
from kdcli.facts.modelinfo.gguf import (
    GGUF_FIX,
    GGUFFacts,
    GGUFHeader,
    GGUFUnreadable,
    SkippedArray,
    gguf_facts,
    read_gguf_header,
)
from kdcli.facts.modelinfo.hub import (
    HUB_TIMEOUT_S,
    PACKAGE_PREFIX,
    PackageRefError,
    cached_hub_config,
    cached_hub_file,
    hub_facts,
    package_folder,
)
from kdcli.facts.modelinfo.pickles import PICKLE_FIX, check_pickles, pickle_calls, pickled_weight_files, refused_pickle
from kdcli.facts.modelinfo.weights import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    WEIGHT_FILES,
    WeightsUnreadable,
    missing_weights,
    read_safetensors_header,
    weight_disagreements,
    weight_head_size,
    weight_shapes,
)

__all__ = [
    "GENERIC_CONFIG_KEYS",
    "GGUF_FIX",
    "HUB_TIMEOUT_S",
    "PACKAGE_PREFIX",
    "PICKLE_FIX",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "WEIGHT_FILES",
    "ConfigUnavailable",
    "GGUFFacts",
    "GGUFHeader",
    "GGUFUnreadable",
    "ModelFacts",
    "PackageRefError",
    "SkippedArray",
    "WeightsUnreadable",
    "cached_hub_config",
    "cached_hub_file",
    "check_pickles",
    "config_num_labels",
    "facts_from_config",
    "gguf_facts",
    "hub_facts",
    "local_facts",
    "missing_weights",
    "package_folder",
    "pickle_calls",
    "pickled_weight_files",
    "read_config",
    "read_gguf_header",
    "read_safetensors_header",
    "refused_pickle",
    "weight_disagreements",
    "weight_head_size",
    "weight_shapes",
    "with_overrides",
]
