"""The checked-in generated proto code must equal what scripts/gen_protos.py produces now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_proto_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_stale_check_detects_an_edited_proto(tmp_path: Path) -> None:
    """Prove the check can fail: a copy of the tree with one extra field must read as stale."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    proto = copy / "protos" / "tandem" / "v1" / "common.proto"
    proto.write_text(proto.read_text().replace("string content = 2;", "string content = 2;\n  string name = 3;"))
    result = subprocess.run(
        [sys.executable, str(copy / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "stale generated code" in result.stderr
