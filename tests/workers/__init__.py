"""In-process tests of the task pipelines (a package, so its conftest does not shadow tests/conftest.py)."""
