"""Cores counted honestly: the affinity mask and the cgroup CPU quota (``docker run --cpus N``)."""

from __future__ import annotations

import os
import socket

import pytest

from transferkit.core.system import available_cores, cgroup_cpu_limit, free_port, library_versions


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", None), ("200000 100000", 2.0),
                                                   ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_v2_quota_is_read_in_cpus(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cgroup_cpu_limit(tmp_path / "cpu.max", tmp_path / "q", tmp_path / "p") == expected


def test_cgroup_v1_quota_is_read_when_v2_is_absent(tmp_path):
    (tmp_path / "quota").write_text("300000\n")
    (tmp_path / "period").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "quota", tmp_path / "period") == 3.0
    (tmp_path / "quota").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "quota", tmp_path / "period") is None


def test_available_cores_is_capped_by_the_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr("transferkit.core.system.cgroup_cpu_limit", lambda: 0.5)
    assert available_cores() == 1
    monkeypatch.setattr("transferkit.core.system.cgroup_cpu_limit", lambda: affinity + 8.0)
    assert available_cores() == affinity


def test_available_cores_respects_the_affinity_mask():
    """A real child process pinned to one core sees one core, whatever the machine has."""
    import subprocess
    import sys

    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from transferkit.core.system import available_cores; print(available_cores())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "1"


def test_library_versions_and_free_port():
    versions = library_versions(("numpy", "no-such-distribution-xyz"))
    assert versions["numpy"].split(".")[0].isdigit() and "no-such-distribution-xyz" not in versions
    assert "transferkit" in versions
    port = free_port()
    with socket.socket() as sock:  # free: this process can bind it now (a port in use, or 0, would fail here)
        sock.bind(("127.0.0.1", port))
        assert port and sock.getsockname()[1] == port
