"""Drop-in protocol tests: the OpenAI-compatible endpoints and the Open Inference Protocol (a package,
so its conftest does not shadow tests/conftest.py)."""
