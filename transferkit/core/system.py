"""What this process may use and what it runs on: cores (affinity and cgroup quota), library versions, free ports."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

# cgroup v2 writes "max 100000" (no quota) or "200000 100000" (2 CPUs); v1 splits quota and period in two files.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(cpu_max: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                     v1_period: Path = CGROUP_V1_PERIOD) -> float | None:
    """The CPU quota of this process' cgroup in CPUs (``docker run --cpus 1.5`` gives 1.5); None when unlimited."""
    text = _read(cpu_max)
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read(v1_quota), _read(v1_period)
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def available_cores() -> int:
    """Cores this process may really use: the affinity mask, capped by the cgroup CPU quota (rounded up, at least 1).

    ``os.cpu_count()`` reports the host's cores inside a container; sizing thread pools by it oversubscribes a
    ``--cpus 2`` container on a 64-core host 32 times over.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


CACHE_ENV = "TRANSFERKIT_CACHE_DIR"


def default_cache_root() -> Path:
    """``$TRANSFERKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/transferkit``, else ``~/.cache/transferkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferkit"


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of ``/proc/cpuinfo`` (None elsewhere than Linux)."""
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; the platform's name elsewhere)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def matrix_engine_flags() -> list[str]:
    """The CPU flags that decide which precisions run fast here: AMX tiles, AVX-512 BF16 and VNNI (Linux)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx_vnni"))


LIBRARIES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter-common", "onnxruntime-gpu", "bentoml",
             "numpy", "pillow", "scikit-learn")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of transferkit and of ``names`` (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    import transferkit

    versions = {"transferkit": transferkit.__version__}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
