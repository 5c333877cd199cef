"""Shared set-up of every actor process: torch threads and the device."""

from __future__ import annotations

from common.config import ActorResources


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ActorProcess:
    """What every actor answers about its own process (the driver's start-up wait, benches, fault tests)."""

    index = 0

    def ready(self) -> int:
        return self.index

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def pid(self) -> int:
        """The actor's process id (fault-injection tests kill it)."""
        import os

        return os.getpid()


def setup_actor(resources: ActorResources) -> str:
    """Set torch's thread count (Ray's fractional CPUs don't limit it) and return the device to use."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(resources.torch_threads)
    return "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
