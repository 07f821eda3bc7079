"""What every benchmark reports beside its own figures: peak memory and where JAX computed."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def jax_device() -> str:
    """``platform:device kind`` of JAX's first device (the solves and kernels run there on a GPU)."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"
