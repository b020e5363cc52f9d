"""Expert parallelism over torch.distributed: experts sharded across ranks, tokens exchanged with
all-to-all (NCCL on GPUs, gloo on CPUs)."""

from .moe import ExpertParallelMoE

__all__ = ["ExpertParallelMoE"]
