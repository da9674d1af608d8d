"""Tandem's composition root: the `tandem` CLI and the tooling that wires the runtimes together.

Subpackages, one concern each:
- `tandem.cli`: the `tandem` command and its subcommands (they parse flags and call the others).
- `tandem.bench`: benchmark suites that print figures.
- `tandem.models`: the model registry (`registry`, a leaf the runtimes may import), fetching,
  conversion and the tiny random-weight models for tests and benches.
- `tandem.ops`: process supervision, the local multi-process stack, the local Ray cluster.
- `tandem.deploy`: the Ray Serve application builder and the renderer of `deploy/`.
- `tandem.pair`: the drafter and the target in one process (bench, demo, tests).

Leaf modules the runtimes may import: `tandem.paths`, `tandem.limits`, `tandem.config`,
`tandem.security`, `tandem.models.registry`, `tandem.metric_defs`, `tandem.ports`. Everything else
here may import every package (`tandem_core`,
`tandem_sdk`, `protos`, `edge_node`, `cloud_node`, `orchestrator`, `netshape`); nothing outside
`tandem/` imports it (the import contracts in pyproject.toml enforce this).
"""

__version__ = "0.1.0"
