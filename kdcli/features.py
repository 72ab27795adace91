"""Feature capture: exactly the hidden states and attention scores the matches use.

Numbering follows TextBrewer 0.2.1 and, up to the last block, Hugging Face's `hidden_states`:

- hidden layer 0 is the embeddings' output (the input of block 1), hidden layer i the raw
  output of block i (1-based); shape (B, L, D). For i < N that is `hidden_states[i]`. For the
  last block N it is `hidden_states[N]` only for models without a final norm (the BERT
  family): where the architecture applies one after the last block (Llama's `model.norm`,
  GPT-2's `ln_f`; `Architecture.final_norm`), `hidden_states[N]` is that norm's output and
  hidden layer N is its input.
- attention layer i is block i's **pre-softmax** attention scores with the additive padding
  mask, as the BERT of transformers 2.x returned them to TextBrewer (the reference's attention
  losses, e.g. `att_mse_loss`, were written for these):

      scores = Q K^T / sqrt(d_head) + (1 - mask)[:, None, None, :] * -10000      # (B, H, L, L)

  Q and K are the outputs of the block's own query/key projections (forward hooks on those
  two `nn.Linear`), so the model keeps its default SDPA kernel (which returns no attention
  maps) and nothing is computed twice; only the Q K^T product of the matched blocks is
  added. `softmax(scores, -1)` equals the eager implementation's `attentions`.

Hooks go on exactly the matched blocks; the model is never asked for
`output_hidden_states`/`output_attentions`. Where the blocks and projections are comes from
`kdcli.facts.architectures` (one row per model type). Hidden capture works for any model whose
blocks form one `nn.ModuleList` of `num_hidden_layers` entries; attention capture is for the
rows with `attention_capture` (`ATTENTION_MODEL_TYPES`: BERT and the MiniLM checkpoints,
RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT), anything else is refused with a
`FeatureError` when the capture is built.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from kdcli.errors import RunError
from kdcli.facts.architectures import ATTENTION_MODEL_TYPES, architecture, attention_capture_supported
from kdcli.models import encoder_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

#: The additive value at padded key positions (the reference's BERT used -10000).
MASK_VALUE = -10000.0
#: Batch keys a model may take; anything else in a batch (labels, lengths) is not passed.
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class FeatureError(RunError):
    """A match asks for a feature the model cannot provide (layer out of range, architecture)."""


@dataclass
class Features:
    """What one forward pass produced, for the objective.

    logits: (B, C) or (B, L, C). hidden: {layer: (B, L, D)}. scores: {block: (B, H, L, L)}
    pre-softmax with the -10000 padding mask. mask: (B, L) attention mask of the inputs
    (1 = token, 0 = padding), the `mask` every intermediate loss receives.
    """

    logits: Tensor | None
    hidden: dict[int, Tensor] = field(default_factory=dict)
    scores: dict[int, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None
    #: causal LMs: the final hidden states (B, L, D) after the final norm, and the output head
    #: (weight (V, D), bias (V,) or None) that maps them to logits; `logits` is then None (the
    #: chunked KD loss computes logits a chunk of tokens at a time, never all at once)
    final_hidden: Tensor | None = None
    head: tuple[Tensor, Tensor | None] | None = None
    #: causal LMs read from `distillation.teacher_cache`: the teacher's top-k distribution per
    #: target token (a `kdcli.losses.divergences.CachedTopK`) instead of hidden states and head
    top_k: object = None

    def detached(self) -> Features:
        """Copies made outside inference mode, usable in autograd (e.g. kd_ce_loss multiplies
        by the teacher's probabilities, which inference tensors forbid). Copies only what was
        captured: logits, the matched layers and the mask."""
        with torch.inference_mode(False):
            return Features(
                logits=None if self.logits is None else self.logits.detach().clone(),
                hidden={i: t.detach().clone() for i, t in self.hidden.items()},
                scores={i: t.detach().clone() for i, t in self.scores.items()},
                mask=None if self.mask is None else self.mask.detach().clone(),
                final_hidden=None if self.final_hidden is None else self.final_hidden.detach().clone(),
                head=self.head,  # the model's own parameters (frozen for a teacher): not copied
                top_k=self.top_k,
            )


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive mask: 0 at tokens, -10000 at padding."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * MASK_VALUE


def attention_scores(query: Tensor, key: Tensor, mask: Tensor | None, num_heads: int) -> Tensor:
    """Pre-softmax scaled dot-product scores with the additive padding mask.

    query, key: (B, L, H * d) outputs of the query/key projections; mask: (B, L) or None.
    Returns (B, H, L, L) = Q K^T / sqrt(d) + (1 - mask) * -10000 over key positions
    (Vaswani et al. 2017; the mask as BERT, Devlin et al. 2019, applied it).
    """
    batch, length, width = query.shape
    if width % num_heads:
        raise ValueError(f"projection width {width} is not a multiple of {num_heads} heads")
    d = width // num_heads
    q = query.view(batch, length, num_heads, d).transpose(1, 2)
    k = key.view(batch, key.size(1), num_heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + additive_mask(mask, scores.dtype)
    return scores


def model_inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The part of a collated batch the model's forward takes.

    Drops `labels` (the objective computes every loss), keys the forward does not name
    (DistilBERT has no `token_type_ids`) and `token_type_ids` when the model has a single
    token type (RoBERTa), where zeros are the only valid value anyway.
    """
    params = inspect.signature(model.forward).parameters
    single_type = getattr(getattr(model, "config", None), "type_vocab_size", 2) <= 1
    return {
        k: batch[k] for k in INPUT_KEYS if k in batch and k in params and not (k == "token_type_ids" and single_type)
    }


def _query_key(block: nn.Module, model_type: str) -> tuple[nn.Module, nn.Linear, nn.Linear] | None:
    """The attention module of a block and its query/key projections, where the
    architecture's row names them."""
    arch = architecture(model_type)
    if arch is None or arch.query is None or arch.key is None:
        return None
    try:
        q, k = block.get_submodule(arch.query), block.get_submodule(arch.key)
        attention = block.get_submodule(arch.query.rpartition(".")[0])
    except AttributeError:
        return None
    if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
        return attention, q, k
    return None


def _num_heads(attention: nn.Module, config) -> int:
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        value = getattr(attention, name, None)
        if isinstance(value, int):
            return value
    return int(config.num_attention_heads)


#: config fields of architectures whose forward changes the head's logits after the matmul
#: (soft-capping, scaling): the chunked loss would compare other numbers than the model's
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder under a `...ForCausalLM` (Llama's `model`, GPT-2's `transformer`): its forward
    returns the final hidden states, after the final norm, without the head."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise RunError(f"{type(model).__name__} has no base model under its LM head; kdcli cannot distil it")
    return base


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output head as (weight (V, D), bias (V,) or None): the logits are `h @ W.T + b`.
    `RunError` for architectures that transform the logits after the head (soft-capping,
    scaling), which the chunked loss does not reproduce."""
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            assert config is not None  # the value was read from it
            raise RunError(
                f"a {config.model_type} model transforms its logits after the head ({name} = {value}); "
                "kdcli's chunked KD loss does not reproduce that. Fix: use a llama, qwen2, mistral or gpt2 model"
            )
    # nn.Module types its attributes Tensor | Module: the Hugging Face method, typed by hand
    head = cast("Callable[[], nn.Module | None]", model.get_output_embeddings)()
    if not isinstance(head, nn.Linear):
        raise RunError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not a linear layer")
    return head.weight, head.bias


class Readout:
    """What a forward returns to the objective: the model's logits (`LOGITS`, encoders).
    A task names its readout (`Task.readout`); every capture of its run uses it."""

    def target(self, model: nn.Module) -> nn.Module:
        """The module whose forward runs (the model itself)."""
        return model

    def read(self, output, model: nn.Module) -> dict:
        """`Features` fields from the forward's output."""
        return {"logits": output.logits}


class HeadReadout(Readout):
    """`HEAD` (causal LMs): the base model's final hidden states and the output head, never full
    logits (the chunked KD loss computes them a chunk of tokens at a time)."""

    def target(self, model: nn.Module) -> nn.Module:
        return base_model(model)

    def read(self, output, model: nn.Module) -> dict:
        return {"logits": None, "final_hidden": output.last_hidden_state, "head": output_head(model)}


LOGITS = Readout()
HEAD = HeadReadout()


class FeatureCapture:
    """Forward hooks on exactly the layers the matches use; `run(batch)` returns `Features`.

    hidden_layers: hidden_states indices 0..N (0 = embeddings output); attention_layers:
    blocks 1..N. Hooks record only inside `run`, so other forwards of the same model (eval)
    are unaffected. Use as a context manager, or call `close()` to remove the hooks.
    `role` ("teacher", "student") names the model in error messages. `readout` is the task's
    (`Task.readout`): `LOGITS`, or `HEAD` (causal LMs: the forward runs the base model only, and
    `Features` carries its final hidden states and the output head instead of logits).
    """

    def __init__(
        self,
        model: nn.Module,
        hidden_layers: Iterable[int] = (),
        attention_layers: Iterable[int] = (),
        *,
        role: str = "model",
        readout: Readout = LOGITS,
    ) -> None:
        self.model = model
        self.role = role
        self.readout = readout
        self.hidden_layers = tuple(sorted({int(i) for i in hidden_layers}))
        self.attention_layers = tuple(sorted({int(i) for i in attention_layers}))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._hidden: dict[int, Tensor] = {}
        self._qk: dict[tuple[int, str], Tensor] = {}
        self._heads: dict[int, int] = {}
        if not self.hidden_layers and not self.attention_layers:
            return
        config = cast("PreTrainedConfig", model.config)
        blocks = encoder_blocks(model)
        count = len(blocks)
        for i in self.hidden_layers:
            if not 0 <= i <= count:
                raise FeatureError(
                    f"{role} has hidden layers 0..{count} (0 = embeddings); a match asks for "
                    f"layer {i}. Fix: use a layer between 0 and {count}"
                )
        for i in self.attention_layers:
            if not 1 <= i <= count:
                raise FeatureError(
                    f"{role} has attention layers 1..{count} (one per block, 1-based); a match "
                    f"asks for layer {i}. Fix: use a layer between 1 and {count}"
                )
        if self.attention_layers and not attention_capture_supported(config.model_type):
            raise FeatureError(
                f"{role} is a {config.model_type!r} model: attention features are computed "
                f"for {', '.join(ATTENTION_MODEL_TYPES)} only. Fix: match hidden features, or "
                "use a BERT-family model"
            )
        for i in self.hidden_layers:
            if i == 0:
                self._handles.append(blocks.modules[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
            else:
                self._handles.append(blocks.modules[i - 1].register_forward_hook(self._output_hook(i)))
        for i in self.attention_layers:
            found = _query_key(blocks.modules[i - 1], config.model_type)
            if found is None:
                raise FeatureError(
                    f"{role}: block {i} of this {config.model_type} model has no query/key "
                    "projections. Fix: match hidden features instead"
                )
            attention, q, k = found
            self._heads[i] = _num_heads(attention, config)
            self._handles.append(q.register_forward_hook(self._projection_hook(i, "q")))
            self._handles.append(k.register_forward_hook(self._projection_hook(i, "k")))

    # -- hooks -------------------------------------------------------------------------

    def _input_hook(self, module, args, kwargs):
        if self._active:
            self._hidden[0] = args[0] if args else kwargs["hidden_states"]

    def _output_hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            if self._active:
                self._hidden[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _projection_hook(self, layer: int, which: str) -> Callable:
        def hook(module, args, output):
            if self._active:
                self._qk[(layer, which)] = output

        return hook

    # -- running -----------------------------------------------------------------------

    def run(self, batch: Mapping[str, Tensor], *, forward: Callable | None = None) -> Features:
        """One forward pass on `batch` (a collated batch; labels are not passed) -> Features.

        `forward` is what to call instead of the hooked model itself, e.g. its
        DistributedDataParallel wrapper (the hooks sit on the wrapped module).
        Runs under whatever grad/inference/autocast mode the caller set.
        """
        target = self.readout.target(self.model) if forward is None else self.model
        inputs = model_inputs(target, batch)
        self._hidden, self._qk = {}, {}
        self._active = True
        try:
            output = (forward or target)(**inputs)
        finally:
            self._active = False
        hidden, qk = self._hidden, self._qk
        self._hidden, self._qk = {}, {}
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(inputs["input_ids"].shape[:2], dtype=torch.long, device=inputs["input_ids"].device)
        missing = [i for i in self.hidden_layers if i not in hidden]
        missing += [i for i in self.attention_layers if (i, "q") not in qk or (i, "k") not in qk]
        if missing:
            raise FeatureError(f"{self.role}: the forward pass did not reach layer(s) {missing}")
        return Features(
            **self.readout.read(output, self.model),
            hidden={i: hidden[i] for i in self.hidden_layers},
            scores={
                i: attention_scores(qk[(i, "q")], qk[(i, "k")], mask, self._heads[i]) for i in self.attention_layers
            },
            mask=mask,
        )

    def run_teacher(self, batch: Mapping[str, Tensor]) -> Features:
        """A teacher's forward: eval mode, `torch.inference_mode()`, then `Features.detached()`
        so the result can enter the student's autograd graph."""
        if self.model.training:
            self.model.eval()
        with torch.inference_mode():
            features = self.run(batch)
        return features.detached()

    def close(self) -> None:
        """Remove every hook this capture installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
