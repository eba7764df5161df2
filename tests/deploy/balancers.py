"""HAProxy and nginx (Debian's) run with the configurations shipped under deploy/, in front of replicas."""

from __future__ import annotations

import os
import socket
import re
import subprocess
import time
from pathlib import Path

from client import HOST, free_port
from podman import ROOT, require

DEPLOY = ROOT / "deploy"


class Balancer:
    """One balancer process on HOST:port in front of replicas A and B; its log beside it."""

    name = ""

    def __init__(self, replica_a: str, replica_b: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.workdir = workdir
        self.vars = {"STT_LISTEN": f"{HOST}:{self.port}", "STT_REPLICA_A": replica_a, "STT_REPLICA_B": replica_b}
        self.log_path = workdir / f"{self.name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), env={**os.environ, **self.vars}, cwd=workdir,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_listening()

    def command(self) -> list[str]:
        raise NotImplementedError

    def _wait_listening(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} is not listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class HAProxy(Balancer):
    name = "haproxy"

    def command(self) -> list[str]:
        require("haproxy")
        # The shipped file as it is: HAProxy reads the addresses from the environment.
        return ["haproxy", "-db", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")]


class Nginx(Balancer):
    name = "nginx"

    def command(self) -> list[str]:
        require("nginx")
        # The shipped template filled in as envsubst would, inside a main file that keeps nginx in the
        # foreground and its temporary files in the test's folder.
        template = (DEPLOY / "nginx" / "livestt.conf.template").read_text()
        site = re.sub(r"\$\{(STT_[A-Z_]+)\}", lambda m: self.vars[m[1]], template)  # envsubst's list only
        (self.workdir / "livestt.conf").write_text(site)
        (self.workdir / "nginx.conf").write_text(f"""
daemon off;
pid {self.workdir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    include {self.workdir}/livestt.conf;
}}
""")
        return ["nginx", "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")]
