"""Latent and data parallelism for the crosscoder, applied from outside the model.

Ranks form a grid ``world = data_parallel × latent_parallel``; rank ``r`` has latent rank
``r mod lp`` and data rank ``r div lp``. The ``lp`` ranks of one latent-parallel group each own a
contiguous slice of the dictionary (columns of every ``W_enc[s]``, rows of every ``W_dec[s]``,
entries of ``b_enc``), the ``dp`` ranks of one data-parallel group hold the same slice and see
different tokens.

:class:`DistributedCollectives` is what the model is given instead of the local
:class:`~crosscoder.collectives.Collectives`:

- a k-th largest value over the whole dictionary (TopK per token, AuxK) or the whole global batch
  (BatchTopK) is found from each rank's *local candidates*: its own k largest values, all-gathered
  (``k·B·lp`` floats for TopK; ``k·B_global·lp·dp`` for BatchTopK). Never ``B × L``;
- partial sums (the decoder's ``f_slice @ W_dec[slice]``, and any loss summed over latents) are
  combined with one all-reduce whose backward is the identity: every rank then computes the same
  replicated loss, and the gradient reaching each partial sum is exactly the gradient of the sum.

So the bytes a step exchanges grow with ``B·D`` (the reconstruction) and ``k·B`` (candidates),
never with ``L``. :class:`ParallelLayout` is also the "model-parallel unit" DeepSpeed asks for,
which is how DeepSpeed learns to average gradients over the data-parallel group only and to count
latent-sharded parameters once per shard in the gradient norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Collectives


@dataclass
class ParallelLayout:
    world: int
    rank: int
    latent_parallel: int
    lp_group: object = None
    dp_group: object = None

    @property
    def data_parallel(self) -> int:
        return self.world // self.latent_parallel

    @property
    def lp_rank(self) -> int:
        return self.rank % self.latent_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.latent_parallel

    def latent_range(self, latents: int) -> tuple[int, int]:
        """This rank's slice of the dictionary: near-equal contiguous blocks."""
        per, extra = divmod(latents, self.latent_parallel)
        lo = self.lp_rank * per + min(self.lp_rank, extra)
        return lo, lo + per + (1 if self.lp_rank < extra else 0)

    @classmethod
    def create(cls, latent_parallel: int) -> ParallelLayout:
        """Build the process groups (collective: every rank must call it in the same order)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if latent_parallel < 1 or world % latent_parallel:
            raise ValueError(f"train.latent_parallel={latent_parallel} must divide the number of workers ({world})")
        layout = cls(world, rank, latent_parallel)
        for d in range(layout.data_parallel):
            ranks = list(range(d * latent_parallel, (d + 1) * latent_parallel))
            group = dist.new_group(ranks)
            if rank in ranks:
                layout.lp_group = group
        for slot in range(latent_parallel):
            ranks = list(range(slot, world, latent_parallel))
            group = dist.new_group(ranks)
            if rank in ranks:
                layout.dp_group = group
        return layout

    # DeepSpeed's model-parallel unit ("mpu") interface
    def get_model_parallel_rank(self):
        return self.lp_rank

    def get_model_parallel_world_size(self):
        return self.latent_parallel

    def get_model_parallel_group(self):
        return self.lp_group

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.data_parallel

    def get_data_parallel_group(self):
        return self.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


class _SumWithIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_gather_cat(tensor: Tensor, group, dim: int) -> Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class CommCounter:
    """Bytes this rank sent through collectives (payload sizes; what the benchmark reports)."""

    def __init__(self):
        self.bytes = 0

    def add(self, tensor: Tensor, group) -> None:
        if dist.get_world_size(group) > 1:
            self.bytes += tensor.numel() * tensor.element_size()


class DistributedCollectives(Collectives):
    def __init__(self, layout: ParallelLayout, counter: CommCounter | None, device: torch.device | str):
        self.layout = layout
        self.counter = counter or CommCounter()
        self.device = torch.device(device)  # where tensors handed to collectives live

    def kth_largest_rows(self, values: Tensor, k: int) -> Tensor:
        k_local = min(k, values.shape[-1])
        candidates = torch.topk(values, k_local, dim=-1, sorted=False).values
        # ranks may hold fewer than k columns (e.g. AuxK searches only its dead latents): pad with
        # -inf so every rank sends the same shape
        if k_local < k:
            padding = candidates.new_full((*candidates.shape[:-1], k - k_local), -torch.inf)
            candidates = torch.cat([candidates, padding], -1)
        self.counter.add(candidates, self.layout.lp_group)
        gathered = all_gather_cat(candidates.detach(), self.layout.lp_group, dim=-1)
        k = min(k, gathered.shape[-1])
        return torch.topk(gathered, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values

    def kth_largest_batch(self, values: Tensor, k: int, hint: float | None = None) -> Tensor:
        # the hint is not used: skipping values < hint would need a global count first (one more
        # collective); each rank's top-k below is exact without it
        flat = values.detach().reshape(-1)
        k_local = min(k, flat.numel())
        candidates = torch.topk(flat, k_local, sorted=False).values
        # ranks may hold different candidate counts only if k > local size; pad with -inf
        if k_local < k:
            candidates = torch.cat([candidates, candidates.new_full((k - k_local,), -torch.inf)])
        for group in (self.layout.lp_group, self.layout.dp_group):
            self.counter.add(candidates, group)
            candidates = all_gather_cat(candidates, group, dim=0)
            candidates = torch.topk(candidates, min(k, candidates.numel()), sorted=False).values
        return candidates.min()

    def sum_partial(self, partial: Tensor) -> Tensor:
        if self.layout.latent_parallel == 1:
            return partial
        self.counter.add(partial, self.layout.lp_group)
        return _SumWithIdentityBackward.apply(partial, self.layout.lp_group)

    def sum_count(self, value: Tensor) -> Tensor:
        if self.layout.latent_parallel == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, group=self.layout.lp_group)
        return out

    def batch_tokens(self, local_tokens: int) -> int:
        return local_tokens * self.layout.data_parallel

    def data_sum(self, value: Tensor) -> Tensor:
        """Sum of a constant (no gradient) over the data-parallel group."""
        if self.layout.data_parallel == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, group=self.layout.dp_group)
        return out

    def any_over_data(self, mask: Tensor) -> Tensor:
        if self.layout.data_parallel == 1:
            return mask
        flags = mask.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.layout.dp_group)
        return flags.bool()

    def sum_figures(self, by_data_rank: Tensor, by_latent_shard: Tensor, by_rank: Tensor) -> Tensor:
        # each figure is sent once over the world: a value the latent shards hold alike by the first
        # of them, one the data ranks hold alike by the first data rank; the others send zeros
        layout = self.layout
        out = torch.cat([by_data_rank if layout.lp_rank == 0 else torch.zeros_like(by_data_rank),
                         by_latent_shard if layout.dp_rank == 0 else torch.zeros_like(by_latent_shard),
                         by_rank])
        dist.all_reduce(out)
        return out

    def worst(self, code: int) -> int:
        value = torch.tensor([code], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())
