"""`tandem serve cloud` settings: flag > TANDEM_CLOUD_* > default, and bad values exit 2 naming the
field. No Ray is started here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cloud_node.cli import CloudConfig, add_cloud_parser, config_from, gateway_config_from
from tandem.cli.main import main as tandem_main
from tandem.limits import SESSION_IDLE_S


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cloud_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["cloud", *argv])


def test_flag_beats_env_beats_default(model_dir: Path) -> None:
    env = {"TANDEM_CLOUD_PORT": "7001", "TANDEM_CLOUD_REPLICAS": "3", "TANDEM_CLOUD_MODEL_DIR": str(model_dir)}
    args = _args("--port", "7002", "--serve-port", "7003")
    config, front = config_from(args, env), gateway_config_from(args, env)
    assert (front.port, config.serve_port, config.replicas, config.model_dir) == (7002, 7003, 3, model_dir)
    assert (front.host, front.tls_cert, front.tokens_file, front.insecure) == ("127.0.0.1", None, None, False)
    assert (config.dtype, config.max_sessions, config.address) == ("bf16", 32, None)
    limits = config.limits()
    assert (limits.kv_budget_bytes, limits.max_batch_rows, limits.batch_window_ms) == (2048 << 20, 64, 20.0)


def test_batching_knobs_reach_the_limits(model_dir: Path) -> None:
    env = {"TANDEM_CLOUD_BATCH_WINDOW_MS": "2.5", "TANDEM_CLOUD_MODEL_DIR": str(model_dir)}
    limits = config_from(_args("--max-batch-rows", "64"), env).limits()
    assert (limits.max_batch_rows, limits.batch_window_ms) == (64, 2.5)
    # the smallest pass holds one whole round: the last token and max_draft_len drafts
    assert config_from(_args("--max-draft-len", "4", "--max-batch-rows", "5"), env).max_batch_rows == 5
    assert config_from(_args("--session-idle-s", "30"), env).limits().idle_s == 30.0
    assert config_from(_args(), env).limits().idle_s == SESSION_IDLE_S


@pytest.mark.parametrize(("argv", "field"), [
    (["--replicas", "0"], "replicas"), (["--serve-port", "70000"], "serve_port"),
    (["--max-draft-len", "0"], "max_draft_len"),
    (["--kv-budget-mb", "-1"], "kv_budget_mb"), (["--replica-cpus", "-1"], "replica_cpus"),
    (["--max-batch-rows", "16"], "max_batch_rows"), (["--max-draft-len", "4", "--max-batch-rows", "4"], "max_batch_rows"),
    (["--batch-window-ms", "-0.5"], "batch_window_ms"), (["--batch-window-ms", "1000"], "batch_window_ms"),
    (["--session-idle-s", "0"], "session_idle_s"), (["--session-idle-s", "nan"], "session_idle_s"),
    (["--session-idle-s", "inf"], "session_idle_s"), (["--session-idle-s", "-5"], "session_idle_s"),
])
def test_invalid_values_name_the_field(model_dir: Path, argv: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        config_from(_args("--model-dir", str(model_dir), *argv), {})


def test_bad_env_value_names_the_variable(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="TANDEM_CLOUD_MAX_SESSIONS"):
        config_from(_args("--model-dir", str(model_dir)), {"TANDEM_CLOUD_MAX_SESSIONS": "many"})
    with pytest.raises(ValueError, match="^dtype:"):
        CloudConfig(model_dir=model_dir, dtype="int4")


def test_cli_exits_2_with_a_message(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--replicas", "0"]) == 2
    assert "replicas: must be >= 1" in capsys.readouterr().err
    assert tandem_main(["serve", "cloud", "--model-dir", str(model_dir / "missing")]) == 2
    assert "model_dir" in capsys.readouterr().err


def test_gateway_flags_are_checked(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^port:"):
        gateway_config_from(_args("--port", "70000"), {})
    with pytest.raises(ValueError, match="^tls_cert, tls_key:"):
        gateway_config_from(_args("--tls-cert", str(model_dir / "config.json")), {})
    with pytest.raises(ValueError, match="^tls_key: no file"):
        gateway_config_from(_args("--tls-cert", str(model_dir / "config.json"), "--tls-key", str(tmp_path / "no")), {})


def test_unsafe_binds_exit_2_before_ray_starts(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "non-loopback" in err and "--insecure" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--gateway-secret", "hunter2-secret"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "never goes on the command line" in err and "hunter2-secret" not in err
