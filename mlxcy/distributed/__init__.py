"""Distributed inference over MLX's own distributed layer.

    import mlxcy.distributed as dist
    g = dist.init(backend="ring")       # under mlx.launch / mlxcy launch
    y = dist.all_sum(x)                 # every rank gets the sum

comm (compiled): process groups, collectives, the watchdog deadline, and the
    linear layers and blocks of tensor- and pipeline-parallel models; its names
    are this package's (dist.init, dist.all_sum, ...).
parallel: load one rank's part of a model (load_tensor_parallel, load_pipeline).
launch: `mlxcy launch`, start N local ranks.
"""
from mlxcy.distributed.comm import (  # noqa: F401
    BACKENDS, EXIT_TIMEOUT, Group, is_available, init, world, rank, size, deadline,
    all_sum, all_max, all_min, all_gather, send, recv, recv_like,
    AllSumLinear, GatherLinear, install_tensor_parallel, PipeBlock, PipeHead, install_pipeline,
)
