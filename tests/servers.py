"""Server helpers only the tests use: a Docker engine probe (for testcontainers), a binary's
version, and a local three-master Redis Cluster. `tickwave.servers` has what the launcher uses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tickwave import servers


def binary_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    for part in out.split():
        if part.startswith("v="):
            return tuple(int(x) for x in part[2:].split(".") if x.isdigit())
    return (0,)


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers `/_ping` (testcontainers needs one)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host[len("unix://"):]
            if not os.path.exists(path):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = path
        elif host.startswith("tcp://"):
            hostport = host[len("tcp://"):].rstrip("/")
            name, _, port = hostport.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(timeout)
            sock.connect(target)  # type: ignore[arg-type]
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


@dataclass
class EmbeddedCluster:
    """A three-master Redis Cluster on free ports (no replicas), for cluster tests."""

    binary: str
    nodes: list[servers.EmbeddedRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, size: int = 3) -> EmbeddedCluster:
        cli = shutil.which("redis-cli") or str(Path(self.binary).with_name("redis-cli"))
        for _ in range(size):
            port = servers.free_port()
            while port > 55_000:  # the cluster bus listens on port + 10000
                port = servers.free_port()
            node = servers.EmbeddedRedis(self.binary, port=port)
            node.workdir = tempfile.mkdtemp(prefix="tickwave-cluster-")
            node.proc = subprocess.Popen(
                [self.binary, "--port", str(node.port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"{node.workdir}/nodes.conf", "--save", "", "--appendonly", "no",
                 "--dir", node.workdir, "--protected-mode", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            servers.wait_port(node.port, 10, node.proc)
            self.nodes.append(node)
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = subprocess.run([cli, "-p", str(self.nodes[0].port), "cluster", "info"],
                                  capture_output=True, text=True).stdout
            if "cluster_state:ok" in info:
                return self
            time.sleep(0.2)
        raise servers.EmbeddedServerError("cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
