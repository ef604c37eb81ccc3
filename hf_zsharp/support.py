"""What the two-pass step supports: the distributed set-ups it refuses, and its interval rule; shared by the
arguments (checked at parse time) and the step itself."""

from accelerate import Accelerator
from accelerate.utils import DistributedType

# Set-ups where the two-pass step would be wrong, and why.
UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed (its engine steps inside backward: two passes would step twice)",
    DistributedType.FSDP: "FSDP1 (its flat parameters hide the tensors whose statistics the ascent needs)",
    DistributedType.MEGATRON_LM: "Megatron-LM (its engine owns the backward and the step)",
}


def unsupported_error(kind: DistributedType) -> ValueError:
    """The error for a set-up in UNSUPPORTED, with what to use instead."""
    return ValueError(
        f"The two-pass sharpness-aware step does not support {UNSUPPORTED[kind]}. Use FSDP2 to shard the model "
        "(fsdp=True with fsdp_config={'version': 2}, or fsdp_version: 2 in an Accelerate config), DDP (torchrun, or "
        "accelerate launch with a multi-GPU/multi-CPU config), or sam='none'."
    )


def check_supported(accelerator: Accelerator) -> None:
    """Refuse an Accelerator whose distributed set-up is in UNSUPPORTED; FSDP2 is supported."""
    kind = accelerator.distributed_type
    if kind in UNSUPPORTED and not (kind == DistributedType.FSDP and getattr(accelerator, "is_fsdp2", False)):
        raise unsupported_error(kind)


def check_interval(interval: object, name: str = "interval") -> None:
    """The two-pass step every `interval` optimizer steps: an integer >= 1."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {interval!r}.")
