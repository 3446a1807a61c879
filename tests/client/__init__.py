"""Tests of the Python client SDK (`modelmora.client`) against a running server (a package, so its
conftest does not shadow tests/conftest.py)."""
