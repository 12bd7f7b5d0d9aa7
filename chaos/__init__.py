"""`pdcluster chaos`: faults applied to a serving cluster under steady load, with a report.

- `load.py`: the streaming load generator (also what `pdcluster bench` builds on).
- `agent.py`: a small Ray actor on each node that sends the signals (kill, stop, continue).
- `scenarios.py`: the table of scenarios, one small entry each.
- `harness.py`: runs them, measures, and checks thresholds; `soak.py`: the long run.
- `report.py`: report.json, report.md and one PNG timeline per scenario.
- `memtrace.py`: where a running cluster's memory goes, per process (tracemalloc, glibc).
"""
