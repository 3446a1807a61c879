"""`mm serve` tunes the garbage collector before serving: start-up objects frozen, young
generation collected after GC_YOUNG_THRESHOLD allocations (checked in a fresh interpreter, so
that the test process keeps its own collector settings)."""

from __future__ import annotations

import subprocess
import sys

from modelmora.server import GC_YOUNG_THRESHOLD

CHECK = """
import gc
from modelmora.server import _tune_gc
older = gc.get_threshold()[1:]
_tune_gc()
print(gc.get_threshold()[0], gc.get_threshold()[1:] == older, gc.get_freeze_count() > 1000)
"""


def test_serving_freezes_start_up_objects_and_collects_the_young_generation_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(GC_YOUNG_THRESHOLD), "True", "True"]
