"""Signed messages on a shared broker: with ``[queue] security_*``, the client and the
workers sign every message, and workers refuse unsigned or wrongly signed ones.

Real keys and self-signed certificates made here with ``cryptography``; a real Redis; real
workers started by the job script. A signed job runs end to end; then a plain JSON task and
one signed by a key outside the store are sent by real Celery clients, and neither runs.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks import keys, registry
from tasks.app import SECURITY_ENV, Signing, configure
from tasks.config import Config
from tasks.errors import ConfigError
from worker_launcher.distributed import job_outcomes
from worker_launcher.nodes import live_nodes

from .conftest import ROOT, cli_env, edit_config, run_cli
from .services import redis_url, unique_prefix, wait_until
from .test_distributed import cluster_config, start_cli


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """A 2048-bit RSA key (mode 0600) and its self-signed certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ringflow {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    """The facility's key and certificate (its certificate alone in the store), and another."""
    key, cert = make_identity(tmp_path / "pki", "facility")
    other_key, other_cert = make_identity(tmp_path / "pki", "intruder")
    store = tmp_path / "pki" / "store"
    store.mkdir()
    (store / "facility.pem").write_bytes(cert.read_bytes())
    return {"key": key, "cert": cert, "store": store, "other_key": other_key, "other": other_cert}


def signing_keys(pki: dict[str, Path]) -> dict[str, str]:
    return {
        "security_key": str(pki["key"]),
        "security_certificate": str(pki["cert"]),
        "security_cert_store": str(pki["store"]),
    }


def test_signing_files_are_checked_at_load(small_demo, tmp_path, pki):
    def load(**queue) -> Config:
        return Config.from_file(
            edit_config(small_demo.config, {"queue": queue}, tmp_path / "c.ini")
        )

    good = signing_keys(pki)
    assert Signing.of(load(**good).queue) == Signing(*good.values())
    assert Signing.of(load().queue) is None  # off by default
    pki["key"].chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group or others .*chmod 600"):
        load(**good)
    pki["key"].chmod(0o600)
    with pytest.raises(ConfigError, match="security_certificate.*no such file"):
        load(**good | {"security_certificate": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="security_cert_store.*no certificate"):
        load(**good | {"security_cert_store": str(tmp_path / "empty" / "*.pem")})
    with pytest.raises(ConfigError, match="needs all of"):
        load(security_key=str(pki["key"]))
    relative = {k: os.path.relpath(v, tmp_path) for k, v in good.items()}  # from the INI's folder
    assert Signing.of(load(**relative).queue) == Signing(*good.values())


def send_as_client(url: str, queue: str, payload: dict, signing: Signing | None) -> None:
    """Send one integrate_file message as another Celery client would: plain JSON, or
    signed with ``signing``'s key."""
    code = (
        "import json, sys\n"
        "from tasks.app import app\n"
        "payload = json.loads(sys.argv[1])\n"
        "app.send_task('ringflow.integrate_file', args=[payload], queue=sys.argv[2],\n"
        "              task_id=payload['task_id'])\n"
    )
    env = {k: v for k, v in cli_env().items() if k not in SECURITY_ENV.values()}
    env |= {"RINGFLOW_BROKER_URL": url} | (signing.env() if signing else {})
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(payload), queue],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_signed_job_runs_and_forged_messages_do_not(small_demo, tmp_path, pki):
    url, prefix = redis_url(), unique_prefix("sign")
    ws = tmp_path / "ws"  # cluster_config's workspace
    sections = {"computations distribution": {"n_workers": "1"}, "queue": signing_keys(pki)}
    config = cluster_config(small_demo, tmp_path, prefix, **sections)
    env = {"RINGFLOW_BROKER_URL": url}
    signing = Signing.of(Config.from_file(config).queue)
    app = configure(url, signing=signing)
    client = app.backend.client
    enqueued = run_cli("enqueue", config, env=env)  # before any worker: messages wait
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip().splitlines()[-1]
    waiting = [json.loads(m) for m in client.lrange(keys.gpu_queue(prefix, 0), 0, -1)]
    assert len(waiting) == 4 and {m["content-type"] for m in waiting} == {"application/data"}

    local = start_cli(["workers", "local", str(config)], env, tmp_path / "local")
    try:
        outcomes = wait_until(
            lambda: (o := job_outcomes(app, prefix, job_id)) and all(o.values()) and o,
            180,
            "the signed job",
        )
        assert [o["status"] for o in outcomes.values()] == ["done", "done"], outcomes
        assert all(os.path.exists(o["output"]) for o in outcomes.values())
        assert len(live_nodes(app, prefix)) == 2  # signed control messages are answered

        template = next(iter(registry.read_manifest(client, prefix, job_id).values()))
        forged = {}
        other = Signing(str(pki["other_key"]), str(pki["other"]), str(pki["other"]))
        for name, sender in (("unsigned", None), ("intruder", other)):
            task_id = f"{job_id}-forged-{name}-{uuid.uuid4().hex[:6]}"
            partial = str(ws / "partials" / job_id / f"forged-{name}.h5")  # inside the job
            forged[name] = template | {"task_id": task_id, "partial": partial}
            send_as_client(url, keys.gpu_queue(prefix, 0), forged[name], sender)
        log_dir = ws / "logs" / "local"

        def refused() -> str:
            text = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
            unsigned = "ContentDisallowed" in text or "untrusted content" in text
            return text if unsigned and "Unknown certificate" in text else ""

        logs = wait_until(refused, 60, "the worker to refuse both messages")
        time.sleep(2)  # had either run, its partial would be written by now
    finally:
        local.send_signal(2)
        local.wait(60)
    for task in forged.values():
        assert not os.path.exists(task["partial"]), task["partial"]
    done = registry.read_done(client, prefix, job_id)
    assert not set(done) & {t["task_id"] for t in forged.values()}
    assert client.llen(keys.gpu_queue(prefix, 0)) == 0, "refused messages stay queued"
    print(
        "refusals in the worker log:", *[ln for ln in logs.splitlines() if "ertificate" in ln][:1]
    )


def test_a_store_holding_a_file_that_is_no_certificate_is_one_line(small_demo, tmp_path, pki):
    (pki["store"] / "README").write_text("the facility's certificates\n")
    changes = {"queue": signing_keys(pki), "output": {"location": str(tmp_path / "out")}}
    config = edit_config(small_demo.config, changes, tmp_path / "c.ini")
    result = run_cli("status", config, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "security_cert_store" in lines[0] and "cannot sign" in lines[0]
