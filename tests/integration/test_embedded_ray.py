"""The embedded Ray `raytune-ft` starts (here: the session's, started the same way) listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import socket

import psutil
import pytest

pytestmark = pytest.mark.integration


def listening(process: psutil.Process) -> list[tuple[str, int]]:
    try:
        return [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just exited
        return []


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def network_addresses() -> list[str]:
    """This machine's addresses other than loopback (IPv4)."""
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]


def test_the_embedded_ray_listens_on_loopback_only(local_ray):
    gcs_host, gcs_port = local_ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert gcs_host == "127.0.0.1"
    # this process (the driver's core worker) and every process Ray started for it: GCS, raylet, dashboard and its
    # agents, workers
    processes = [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(recursive=True)]
    sockets = {(p.name(), a.ip, a.port) for p in processes for a in listening(p)}
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 6, sockets
    assert [s for s in sockets if not is_loopback(s[1])] == [], "Ray listens beyond loopback"
    # and from the network side: the GCS port is closed on the machine's other addresses
    for address in network_addresses():
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex((address, int(gcs_port))) != 0, f"the GCS answers on {address}"
