"""Benchmarks: scripts run as `python benchmarks/<name>.py`; `benchmarks.common` is shared with the tests."""
