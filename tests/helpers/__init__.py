"""Shared helpers of the test suite: set-ups, fakes, reference maths and a subprocess worker.

Nothing here is a test (pytest collects only ``tests/test_*.py``); the test modules import from here.
"""
