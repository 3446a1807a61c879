"""Keep bench/RESULTS.md current: each benchmark replaces its own `## ` section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(heading: str, section: str) -> None:
    """Replace the section that starts with `heading` (or append it)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = section.rstrip("\n") + "\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end != -1 else "")
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a results section."""
    import platform

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def report(heading: str, text: str, *, write: bool) -> None:
    """Print a section and, unless told not to, store it in RESULTS.md."""
    print(text)
    if write:
        write_section(heading, text)
