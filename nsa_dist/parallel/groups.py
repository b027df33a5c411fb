"""A second process group beside each context-parallel group, for the selection K/V gather.

NCCL runs the collectives of one process group in issue order on one stream. The selection gather is
large and the compute does not need it until the selected branch, while the halo exchange and the
compressed-token gather are small and needed first; on its own group (its own communicator and stream)
the large gather runs beside them instead of in front of them.
"""

import torch.distributed as dist


def twin_groups(group) -> object | None:
    """A new process group with the ranks of `group` (this rank's CP group), or None when it has one rank.

    Collective over the whole world: every rank must call it with its own group of one partition of the
    world (as Megatron's CP groups are); each rank learns the others' groups and all create every group
    in the same order, as torch.distributed requires. Destroy the result with dist.destroy_process_group.
    """
    ranks = dist.get_process_group_ranks(group)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ranks)
    mine = None
    for group_ranks in sorted({tuple(r) for r in everyone}):
        if len(group_ranks) == 1:
            continue
        created = dist.new_group(list(group_ranks))
        if dist.get_rank() in group_ranks:
            mine = created
    return mine
