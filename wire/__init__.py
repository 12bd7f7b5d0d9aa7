"""What crosses process boundaries, with neither torch nor nixl: the spec a worker
starts from, prefill's result, typed errors, the workers' stats (`api`), sampling
parameters (`sampling_params`), the router's end of a decode output channel
(`channel`), and what a process reports about its host (`host`).

The router imports this package and never the workers' engine: the layering
contracts in pyproject.toml ([tool.importlinter]) enforce it.
"""
