"""A throwaway PostgreSQL cluster for tests (PostgreSQL's own binaries, run as the postgres user
when the tests run as root: initdb refuses root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from serverproc import free_port


def available() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


class PgCluster:
    """`start()` initialises and starts a cluster on a free port; `url(db)` names a database in it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mm-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PgCluster:
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def restart(self) -> None:
        """Stop the cluster fast (connections are cut) and start it again."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", "fast", "-o", opts, "-l", str(self.dir / "log"), "-w", "restart"
        )

    def stop(self) -> None:
        subprocess.run([*self._as, "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database `name`; returns its URL."""
        host = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        subprocess.run(["createdb", *host, name], check=True, capture_output=True, timeout=60)
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
