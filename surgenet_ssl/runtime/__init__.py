"""What a training process needs from its machine and cluster: SLURM preemption and requeue, the per-step agreement
of all ranks, distributed helpers, CPU budget, speed options, checkpoint IO, atomic writes and storage errors.

Light on import (no torch, no Lightning at the package level): the entry points import it before their config
checks. Import the submodules directly (``from surgenet_ssl.runtime.cluster import ...``)."""
