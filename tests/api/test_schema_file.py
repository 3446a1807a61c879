"""schema/openapi.json is the generated document, kept in the repository for client generators."""

from __future__ import annotations

import json
from pathlib import Path

from modelmora.api import openapi


def test_committed_openapi_is_current() -> None:
    committed = json.loads((Path(__file__).parents[2] / "schema" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi.document())), "run `uv run just schema` and commit the result"
