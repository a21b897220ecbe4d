"""deploy/compose.yaml stays runnable: every lookalike and ray command in it parses with the
real command lines, the gateway forwards to the API services that exist, and the image installs
what the services run. (No container runtime runs in CI; tests/test_topology.py starts the
same topology as processes on loopback.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lookalike.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _expand(text: str) -> str:
    """Compose's ``${NAME:-default}`` with the default taken, as an unset variable gives."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def test_the_topology_has_its_parts(services):
    assert {"postgres", "ray-head", "ray-worker", "indexer", "api-1", "api-2", "gateway"} <= set(
        services
    )
    assert "pgvector" in services["postgres"]["image"]
    assert services["ray-worker"]["deploy"]["replicas"] >= 2
    # Both API servers share one catalog (through the environment), none holds it alone.
    for name in ("api-1", "api-2", "indexer"):
        assert services[name]["environment"]["LOOKALIKE_DB"].startswith("postgresql://")


def test_every_lookalike_command_parses(services):
    parser = build_parser()
    commands = {
        name: [_expand(str(part)) for part in service["command"]]
        for name, service in services.items()
        if isinstance(service.get("command"), list) and service["command"][0] == "lookalike"
    }
    assert set(commands) == {"indexer", "api-1", "api-2"}
    for name, command in commands.items():
        args = parser.parse_args(command[1:])
        assert args.command in {"index", "serve"}, name
    index = parser.parse_args(commands["indexer"][1:])
    assert index.index == "pgvector" and index.ray == "ray-head:6379"


def test_every_ray_command_uses_real_flags(services):
    ray_help = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ray_help.returncode != 0:
        pytest.skip(f"ray's command line is not installed: {ray_help.stderr[-200:]}")
    for name in ("ray-head", "ray-worker"):
        command = services[name]["command"]
        assert command[:2] == ["ray", "start"], name
        for flag in command[2:]:
            option = flag.split("=")[0]
            assert option in ray_help.stdout, f"{name}: {option} is not a `ray start` option"


def test_the_gateway_forwards_to_the_api_services(services):
    conf = (DEPLOY / "nginx.conf").read_text()
    upstreams = set(re.findall(r"server ([\w-]+):8000", conf))
    assert upstreams == {"api-1", "api-2"}
    assert "proxy_next_upstream" in conf  # a restarting server's requests go to the other
    mounted = services["gateway"]["volumes"][0].split(":")[0]
    assert (DEPLOY / mounted).resolve() == (DEPLOY / "nginx.conf").resolve()


def test_the_image_installs_what_the_services_run():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert '".[ray]"' in dockerfile  # the ray command and Ray extraction
    assert "torch==2.13.0" in dockerfile
