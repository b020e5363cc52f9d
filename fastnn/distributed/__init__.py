"""Expert parallelism over torch.distributed: experts sharded across ranks, tokens exchanged with
all-to-all (NCCL on GPUs, gloo on CPUs).

``import fastnn`` does not import this package (nor, through it, ``torch.distributed``): the first
``fastnn.distributed`` attribute access does."""

from .moe import ExpertParallelMoE

__all__ = ["ExpertParallelMoE"]
