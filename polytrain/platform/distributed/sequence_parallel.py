"""DeepSpeed-Ulysses sequence parallelism: the collectives behind the model's ``SequenceShard``.

Each group of ``engine.sequence_parallel`` processes (``process_layout.ProcessLayout``) shares every sample; each
computes a slice of every sequence (``models/sequence_shard.py`` holds the slicing).  Around each attention kernel,
DeepSpeed's own ``DistributedAttention`` all-to-alls turn the group's slices of q, k and v with every head
into the whole sequence with a slice of the heads, and the output back; queries and keys may differ in length
(cross-attention to the encoder's memory, which stays split).  Under GQA the heads are split by key/value
group, so each query head lands with its keys.  A pooled head gathers the sequence (a differentiable
all-gather).

Gradients need nothing of their own here: DeepSpeed averages every gradient over all processes of the job, so
each rank's loss (its slice's) is weighted by the processes over the step's target tokens (``train/step.py``),
and the average is the sum over the slices of every sample, over the whole step's targets -- what one process
computes for the unsplit step.  ZeRO partitions over all processes too, as DeepSpeed's own sequence-parallel
mode does (its ``seq_data_parallel_group``).
"""

import torch
import torch.distributed as dist
from torch import Tensor

from polytrain.models.sequence_shard import WHOLE, SequenceShard
from polytrain.platform.distributed.process_layout import ProcessLayout


class UlyssesShard(SequenceShard):
    """Slice ``rank`` of ``size`` of every sequence, exchanged within ``group`` by all-to-alls."""

    def __init__(self, group, size: int, rank: int):
        from deepspeed.sequence.layer import DistributedAttention

        super().__init__(size, rank)
        self.group = group
        # (B, L/size, H, D) in, scattered over heads (dim 2), gathered over the sequence (dim 1); batch first.
        self.exchange = DistributedAttention(run_plan, group, scatter_idx=2, gather_idx=1)

    def attention(self, plan):
        return ExchangedPlan(plan, self.exchange)

    def gather(self, x_BLE: Tensor) -> Tensor:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x_BLE.contiguous(), group=self.group), dim=1)


def run_plan(q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan, dropout_p: float) -> Tensor:
    """The local attention ``DistributedAttention`` calls: the whole sequence, this rank's heads."""
    return plan(q_BLHD, k_BSGD, v_BSGD, dropout_p)


class ExchangedPlan:
    """An attention plan with the Ulysses all-to-alls around it; called as the plan is."""

    def __init__(self, plan, exchange):
        self.plan, self.exchange = plan, exchange

    def __call__(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, dropout_p: float) -> Tensor:
        return self.exchange(q_BLHD, k_BSGD, v_BSGD, 0, None, self.plan, dropout_p)


def sequence_shard(layout: ProcessLayout, rank: int, backend: str) -> SequenceShard:
    """This process's shard; every process of the job calls it (it creates the groups, a collective)."""
    if layout.sequence == 1:
        return WHOLE
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # a no-op once it is
    mine = None
    for ranks in layout.sequence_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return UlyssesShard(mine, layout.sequence, layout.sequence_rank(rank))
