"""Teachers, students and tokenizers: loading through the Auto classes, building from a config.

- `load_model(ref, task, ...)`: a pretrained model for the task through
  `AutoModelForSequenceClassification` / `AutoModelForTokenClassification`, safetensors
  preferred, the default attention kernel (SDPA) kept, float32 unless asked otherwise. When the
  checkpoint has no head, or a head of another size than `num_labels`, the head is new
  (`ignore_mismatched_sizes`), and the returned `LoadedModel` says so (`new_head`); a teacher
  passes `resize_head=False` (its trained head must fit the labels: `HeadMismatch`). Nothing
  else may start at random: a config.json that disagrees with the weights (other sizes, layers
  missing or left over, per transformers' loading info) is a `ModelError` naming the tensors
  with both shapes. Weight files are checked first without torch (`kdcli.facts.modelinfo`: damaged
  safetensors, pickles that call more than tensor constructors), and `warn` gets a
  trust_remote_code warning naming the folder's .py files before anything is loaded.
- `check_vocabularies(tokenizer, ref, models)`: every model reads the run's token ids as its
  own tokens (enough embeddings; a pretrained model's own tokenizer agrees on shared ids).
- `build_student(config_ref, overrides, task, ...)`: a model built from a config plus
  overrides, optionally initialised from a teacher: embeddings, the chosen teacher blocks
  (1-based, in the order given), pooler and head, as TextBrewer's examples initialise
  students from `bert-base` layers (e.g. T4 from layers [3, 6, 9, 12]). Any shape that
  disagrees is a `ModelError` naming both parameters.
- `load_tokenizer(ref)`, `model_dims(model)`, `encoder_blocks(model)` (the transformer block
  list, from `kdcli.facts.architectures` or found generically) and
  `resolve_model_ref("pkg:<package>/<folder>")`.

Modules: `common` (errors, records, references), `loading` (pretrained models, tokenizers),
`structure` (sizes, blocks), `students` (built from a config), `vocabularies`.

Every user mistake (missing folder, unknown override, unreachable hub id, mismatched shapes,
damaged or hostile weight files, another vocabulary) raises `ModelError`, a `RunError` (exit
code 1), with one line naming the model, the file and the fix.
"""

from kdcli.models.common import (  # noqa: F401
    TOKENIZER_FILES,
    Blocks,
    Dims,
    HeadMismatch,
    LoadedModel,
    ModelError,
    remote_code_notice,
    resolve_model_ref,
)
from kdcli.models.loading import load_model, load_tokenizer  # noqa: F401
from kdcli.models.structure import encoder_blocks, model_dims  # noqa: F401
from kdcli.models.students import apply_overrides, build_student, init_from_teacher, load_config  # noqa: F401
from kdcli.models.vocabularies import check_vocabularies  # noqa: F401
