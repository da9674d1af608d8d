"""Benchmark suites (`tandem bench --suite ...`): each prints figures and progress lines.

May import every package; only the CLI imports it.
"""
