"""Regenerate the checked-in Python code for protos/tandem/v1/*.proto.

Usage: python scripts/gen_protos.py [--check]
With --check, regenerate into a temp folder and exit 1 if the checked-in files differ.
Generated modules live next to their sources (protos/tandem/v1/*_pb2*.py) and import each other
as `protos.tandem.v1...`, so installing the project needs no protoc.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("tandem") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run grpc_tools.protoc on every .proto; returns the generated files (relative)."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(s.relative_to(PROTO_ROOT)) for s in sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for path in sorted((out_root / PACKAGE).glob("*_pb2*.py*")):
        text = path.read_text()
        # protoc writes `from tandem.v1 import x_pb2`; our package root is `protos`.
        text = text.replace("from tandem.v1 import", "from protos.tandem.v1 import")
        # The module name the messages register under must be importable (pickling, e.g. by
        # Ray, looks the classes up by it).
        text = re.sub(r"'tandem\.v1\.(\w+_pb2)'", r"'protos.tandem.v1.\1'", text)
        path.write_text(text)
        generated.append(path.relative_to(out_root))
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        checked_in = {p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).glob("*_pb2*.py*")}
        if args.check:
            stale = [str(g) for g in generated if not (PROTO_ROOT / g).exists()
                     or not filecmp.cmp(out / g, PROTO_ROOT / g, shallow=False)]
            stale += [str(c) for c in checked_in - set(generated)]
            if stale:
                print("stale generated code: " + ", ".join(stale) + "; run scripts/gen_protos.py",
                      file=sys.stderr)
                return 1
            return 0
        for g in generated:
            shutil.copyfile(out / g, PROTO_ROOT / g)
        for c in checked_in - set(generated):
            (PROTO_ROOT / c).unlink()
    print(f"generated {len(generated)} files under {PROTO_ROOT / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
