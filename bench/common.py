"""What the benchmarks share: progress on stderr, peak memory, where JAX computed, loopback
HTTP helpers."""

from __future__ import annotations

import json
import resource
import socket
import sys
import urllib.request


def say(msg: str) -> None:
    """Progress: one line on stderr (stdout's last line is the benchmark's JSON)."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, payload: dict, timeout: float = 120) -> dict:
    """POST ``payload`` as JSON, return the decoded JSON answer (raises on HTTP errors)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def jax_device() -> str:
    """``platform:device kind`` of JAX's first device (the solves and kernels run there on a GPU)."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"
