"""`mm db upgrade`: brings the job store (and the registry) to this release's schema; a bad
database_url is one line and exit status 1."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from modelmora.jobs import SCHEMA_VERSION

from serverproc import mm


def test_upgrade_creates_and_migrates(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = mm("db", "upgrade", home=home).stdout
    assert f"schema version {SCHEMA_VERSION}" in out
    db = sqlite3.connect(home / "jobs.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()
    assert f"schema version {SCHEMA_VERSION}" in mm("db", "upgrade", home=home).stdout  # again: nothing to do


def test_a_bad_database_url_is_one_line(tmp_path: Path) -> None:
    proc = mm("db", "upgrade", home=tmp_path, env={"MODELMORA_DATABASE_URL": "mysql://db/x"}, check=False)
    assert proc.returncode == 1
    assert "database_url must be a postgresql:// URL" in proc.stderr and "Traceback" not in proc.stderr
