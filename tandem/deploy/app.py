"""The Serve application builder that `deploy/serve_config.yaml` names as its `import_path`.

Guarantees:
- `serve deploy` / `serve run` / KubeRay call `build(args)` with the config's `args` mapping;
  the keys are exactly `APP_ARGS` (a missing key takes its default, an unknown key raises
  ValueError naming it), validated by `cloud_node.cli.CloudConfig` (messages name the field).
- An empty `model_dir` means the fetched target under `$TANDEM_HOME` (set through the config's
  `runtime_env.env_vars`), resolved where the application is built; every node of a cluster
  runs the same image, so the path is the same on each of them.
- The deployment's scaling, resources and `max_ongoing_requests` come from the config file,
  which overrides what the code sets (Serve's rule); the code's values only apply to
  `serve run module:app` without a config.
- Importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tandem.limits import SESSION_IDLE_S

# Application args and their defaults; the single source (`tandem.deploy.gen`) renders these.
APP_ARGS: dict[str, Any] = {
    "model_dir": "",
    "dtype": "bf16",
    "threads": 0,
    "max_sessions": 32,
    "max_context": 4096,
    "max_draft_len": 16,
    "max_tree_nodes": 64,
    "max_new_tokens": 4096,
    "kv_budget_mb": 2048,
    "max_batch_rows": 64,
    "batch_window_ms": 20.0,
    "session_idle_s": SESSION_IDLE_S,
    # The file (a mounted Secret) with the secret the cloud's gateway shows the replicas; empty: no
    # gateway check (then Serve's own port is open to whoever reaches it; deploy/README.md).
    "gateway_secret_file": "",
}


def cloud_config(args: Mapping[str, Any]) -> Any:  # -> cloud_node.cli.CloudConfig
    """Validated settings for the replicas from the config's `args`."""
    from cloud_node.cli import CloudConfig

    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"args: unknown key(s) {unknown}; known: {sorted(APP_ARGS)}")
    values = {**APP_ARGS, **args}
    values.pop("gateway_secret_file")
    model_dir = values.pop("model_dir")
    if not model_dir:
        from tandem.models import registry as models

        model_dir = models.target_dir()
    return CloudConfig(model_dir=Path(model_dir), **values)


def build(args: dict[str, Any]) -> Any:
    """The bound `CloudVerifierDeployment` (a Serve Application)."""
    from cloud_node import serve_app

    config = cloud_config(args)
    return serve_app.build_app(config.model_dir, dtype=config.dtype, limits=config.limits(),
                               threads=config.threads, gateway_digest=gateway_digest(args))


def gateway_digest(args: Mapping[str, Any]) -> str | None:
    """The digest of the gateway's secret from `gateway_secret_file` (read where the app is
    built), or None when the arg is empty. A missing or unsafe file raises (ConfigError)."""
    path = str(args.get("gateway_secret_file") or "")
    if not path:
        return None
    from cloud_node.gateway import secret_digest
    from tandem.security import read_secret

    secret = read_secret(file=Path(path), what="gateway_secret_file")
    assert secret is not None  # read_secret raises for a missing or empty file
    return secret_digest(secret)
