"""The deployment files, checked without a Docker engine: the compose file's structure, the
Dockerfiles (hadolint, and the habits the deployment issue asks for), and the nginx config (nginx -t)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.settings import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_every_service_has_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    assert {"indexer", "api", "api-gpu", "lb"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name
        assert service.get("deploy", {}).get("resources", {}).get("limits"), name


def test_topology(compose: dict) -> None:
    services = compose["services"]
    api, lb, indexer = services["api"], services["lb"], services["indexer"]
    assert "index:/index:ro" in api["volumes"] and "index:/index" in indexer["volumes"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert api["deploy"]["replicas"] == 3 and api["stop_signal"] == "SIGTERM"
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert "./nginx.conf:/etc/clipsearch/nginx.conf:ro" in lb["volumes"]
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_limits_agree_between_app_and_load_balancer(compose: dict) -> None:
    nginx = (DOCKER / "nginx.conf").read_text()
    body_mb = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    env = compose["services"]["api"]["environment"]
    assert int(env["CLIPSEARCH_MAX_BODY_BYTES"]) == body_mb * 1024 * 1024 == Settings().max_body_bytes
    upstream_keepalive = int(re.search(r"keepalive_timeout (\d+)s;\n\s*}", nginx).group(1))
    assert int(env["CLIPSEARCH_KEEP_ALIVE_S"]) > upstream_keepalive  # else intermittent 502s
    assert "non_idempotent" in nginx and "max_fails" in (DOCKER / "upstream.compose.conf").read_text()
    assert float(env["CLIPSEARCH_DRAIN_S"]) < 10  # inside Docker's SIGTERM -> SIGKILL grace


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_habits_and_hadolint(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert text.index("pip install /src") < text.index("COPY models")  # dependency layer before code
    assert re.search(r"^USER 10001$", text, re.M)  # non-root
    assert re.search(r"^HEALTHCHECK .*\n.*readyz", text, re.M)
    assert re.search(r'^CMD \["clipsearch", "serve"\]$', text, re.M)  # exec form: SIGTERM reaches us
    hadolint = shutil.which("hadolint") or str(Path(__file__).resolve().parents[2] / ".venv/bin/hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "install nginx (make install does)"
    prefix = tmp_path / "nginx"
    (prefix / "conf").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    shutil.copyfile(DOCKER / "nginx.conf", prefix / "conf" / "nginx.conf")
    (prefix / "conf" / "upstream.conf").write_text("server 127.0.0.1:9 max_fails=2 fail_timeout=5s;\n")
    result = subprocess.run([nginx, "-t", "-p", f"{prefix}/", "-c", str(prefix / "conf" / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_config_when_the_plugin_exists() -> None:
    docker = shutil.which("docker")
    has_plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if not has_plugin:
        # No compose plugin here: the structural checks above stand in for `docker compose config`.
        return
    result = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, env={"DATA": "/tmp", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
