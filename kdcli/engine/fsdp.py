"""FSDP2 (`training.parallel: "fsdp"` under torchrun): the student and the teachers sharded
with `torch.distributed.fsdp.fully_shard`, checkpoints of sharded state with
`torch.distributed.checkpoint`, and the full student gathered for the final save.

Layout. Every transformer block of every model is its own FSDP unit; the student's root unit
is a `ShardedStudentStep` around the `StudentStep` (student + objective's projections), so the embeddings, the final norm and
the output head are all-gathered for the whole of its forward, which is where the chunked KD
loss reads the head (`kdcli.losses.chunked`: the head is used outside the model's own forward,
so it must be unsharded there). A teacher's root unit is a `ShardedTeacher` that keeps its root
parameters gathered after its forward (`reshard_after_forward=False`) until the student's loss
has read its head, then `reshard_teachers` frees them. Teachers are frozen and run forward only.

Precision: with `training.precision` "bf16", FSDP2's `MixedPrecisionPolicy` casts the
parameters to bf16 for compute and reduces gradients in fp32 (the sharded master weights and the
optimizer stay fp32); autocast is then off. fp16 (which needs a sharded GradScaler) is refused.

Gradient accumulation: gradient reduction is switched off for all but the last micro-batch
(`set_requires_gradient_sync`), as DDP's `no_sync`. The reduce-scatter averages over ranks as
DDP does, so the loss normalisation is the same.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from kdcli.features import FeatureCapture, Features
from kdcli.models import encoder_blocks

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def _api():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return init_device_mesh, MixedPrecisionPolicy, fully_shard


class ShardedTeacher(nn.Module):
    """A teacher and its feature capture as one FSDP root: `run_teacher(batch)` as
    `FeatureCapture.run_teacher`, through the root's forward so its hooks gather the
    embeddings, final norm and head."""

    def __init__(self, capture: FeatureCapture) -> None:
        super().__init__()
        self.teacher = capture.model
        self._capture = capture
        self.role = capture.role

    def forward(self, batch: Mapping[str, Tensor] | None, generation: dict | None = None) -> Features:
        if generation is not None:  # on_policy: `generate` through the root (its hooks gather the head)
            return cast("Callable[..., Any]", self.teacher.generate)(**generation)
        assert batch is not None  # a forward without `generation` reads a batch
        return self._capture.run(batch)

    def run_teacher(self, batch: Mapping[str, Tensor]) -> Features:
        self.teacher.eval()
        with torch.no_grad():
            return self(batch)

    def close(self) -> None:
        self._capture.close()


def mixed_precision(precision: str):
    """FSDP2's policy for the run's precision (None: fp32 throughout)."""
    _, MixedPrecisionPolicy, _ = _api()
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard(step_module: nn.Module, student: nn.Module, captures_T: list, device: torch.device, world: int, precision):
    """Shard the student (per block, then the step module as root) and each teacher (per block,
    then a `ShardedTeacher` root); returns the sharded teachers (which replace `captures_T`)."""
    init_device_mesh, _, fully_shard = _api()
    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision(precision)
    extra = {"mp_policy": policy} if policy is not None else {}
    for block in encoder_blocks(student).modules:
        fully_shard(block, mesh=mesh, **extra)
    fully_shard(step_module, mesh=mesh, **extra)
    teachers = []
    for capture in captures_T:
        for block in encoder_blocks(capture.model).modules:
            fully_shard(block, mesh=mesh, **extra)
        root = ShardedTeacher(capture)
        fully_shard(root, mesh=mesh, reshard_after_forward=False, **extra)
        teachers.append(root)
    return teachers


def reshard_teachers(captures_T: list) -> None:
    """Free the teachers' gathered root parameters once the step's loss has read their heads."""
    for teacher in captures_T:
        if isinstance(teacher, ShardedTeacher):
            cast("FSDPModule", teacher).reshard()  # `shard` made it an FSDP root


def set_gradient_sync(step_module: nn.Module, sync: bool) -> None:
    cast("FSDPModule", step_module).set_requires_gradient_sync(sync)  # sharded by `shard`


def local_values(module: nn.Module) -> list[Tensor]:
    """Each parameter's local shard (the whole tensor when not sharded)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]


# -- checkpoints ---------------------------------------------------------------------------------

SHARDS = "shards"


def save_shards(step_module: nn.Module, optimizer, staging: Path, main: bool) -> None:
    """Every rank writes its shards of the model and optimizer state into `staging` (DCP)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(step_module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging))
    dist.barrier()


def load_shards(step_module: nn.Module, optimizer, folder: Path) -> None:
    """Read a sharded checkpoint's model and optimizer state back (same world size: exact)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(step_module, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDS))
    set_state_dict(step_module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_student(step_module: nn.Module, student: nn.Module, main: bool) -> nn.Module | None:
    """The whole student on rank 0's CPU (every rank joins the gather): a fresh model of the
    student's class and config holding the gathered weights, for `save_pretrained`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    prefix = "step.student."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        copy = type(student)(student.config)
    copy.load_state_dict(weights, strict=False, assign=True)
    # assign=True loaded tied tensors as two; tie them again (as the student)
    cast("Callable[[], None]", copy.tie_weights)()
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered student lacks {missing[:3]}")
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary frequencies): the student's own
            owner, _, leaf = name.rpartition(".")
            source = student.get_buffer(name)
            copy.get_submodule(owner).register_buffer(leaf, source.detach().cpu().clone(), persistent=False)
    copy.generation_config = student.generation_config
    return copy.eval()


class ShardedStudentStep(nn.Module):
    """The FSDP root of the student: `StudentStep`'s forward, or (`features_only=True`) the
    student's features alone, for evaluation through the root's hooks."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    @property
    def student(self) -> nn.Module:
        return cast(nn.Module, self.step.student)  # a `StudentStep`'s student

    def forward(self, batch, feats_T, step_fraction: float, *, features_only: bool = False, generation=None, **kwargs):
        if generation is not None:  # on_policy: the student's `generate` through the root
            return cast("Callable[..., Any]", self.student.generate)(**generation)
        if features_only:
            return cast(FeatureCapture, self.step._capture).run(batch)
        return self.step(batch, feats_T, step_fraction, **kwargs)
