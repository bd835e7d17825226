"""A real ``nats-server -js`` on 127.0.0.1 for the shipping tests: a free port, its own store,
stopped (and its files removed) at the end. In CI (``CI`` set) a missing server is a failure,
not a skip: ``.ci/run`` installs the Debian package."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary() -> str:
    found = shutil.which("nats-server")
    if found is None and os.path.exists("/usr/sbin/nats-server"):  # (root's PATH only)
        found = "/usr/sbin/nats-server"
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed (.ci/run installs the Debian package nats-server)")
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    try:
        import nats  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("nats-py is not installed (pip install -e '.[test]')")
        pytest.skip("nats-py is not installed")
    return found


class NatsServer:
    def __init__(self, store: str, config: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = store
        args = ["-c", config] if config else ["-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", store]
        self.proc = subprocess.Popen([server_binary(), *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def cluster(base: str, size: int = 3) -> list[NatsServer]:
    """``size`` JetStream servers of one cluster on loopback, each with its own store."""
    ports = [free_port() for _ in range(size)]
    routes = [free_port() for _ in range(size)]
    servers = []
    for i in range(size):
        conf = os.path.join(base, f"n{i}.conf")
        os.makedirs(os.path.join(base, f"n{i}"), exist_ok=True)
        with open(conf, "w") as f:
            f.write(f"""server_name: n{i}
listen: 127.0.0.1:{ports[i]}
jetstream {{ store_dir: "{os.path.join(base, f'n{i}')}" }}
cluster {{
  name: c
  listen: 127.0.0.1:{routes[i]}
  routes: [{", ".join(f"nats-route://127.0.0.1:{r}" for r in routes)}]
}}
""")
        servers.append(NatsServer(os.path.join(base, f"n{i}"), conf, ports[i]))
    return servers
