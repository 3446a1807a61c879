"""Preloading this module takes a minute (a zygote that is never ready in time, for the tests)."""

import time

time.sleep(60)
