"""Preloading this module kills the zygote before it is ready (a start failure, for the tests)."""

import os

os._exit(3)
