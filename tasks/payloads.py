"""Task payloads: plain dataclasses that travel as JSON between the client and the workers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from .config import Config
from .errors import RingflowError


class _Payload:
    def to_dict(self) -> dict:
        """A shallow dict (the config mapping is shared, not copied): enqueueing 10,000 files
        converts 10,000 payloads, and asdict's deep copy of each config was most of the cost."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ConfigRecord:
    """A job's configuration as its registry stores it, once, and the digest that each file
    task message carries instead: messages stay small whatever the configuration's size, and
    a signed message still vouches for the configuration its worker runs with."""

    text: str
    digest: str

    @classmethod
    def of(cls, config: Config) -> ConfigRecord:
        record = {"config": config.payload_mapping(), "source": config.source}
        text = json.dumps(record, sort_keys=True)
        return cls(text, digest_of(text))

    @staticmethod
    def load(text: str, digest: str, job_id: str) -> Config:
        """The configuration of ``text``, once it is checked to have ``digest``."""
        if digest_of(text) != digest:
            raise RingflowError(
                f"job {job_id}: its configuration in the registry is not the one its file "
                "tasks name (digest differs): refused"
            )
        record = json.loads(text)
        return Config.from_mapping(record["config"], source=record["source"])


@dataclass
class FileTask(_Payload):
    """Integrate frames src_start..src_start+n_frames of one Lima dataset into one partial."""

    job_id: str
    task_id: str
    prefix: str
    scan_key: str
    index: int  # position of this file in its scan
    path: str
    dataset: str
    src_start: int
    n_frames: int
    scan_start: int  # row of its first frame in the scan's output
    partial: str  # where the partial result goes
    config_digest: str  # of the job's ConfigRecord, which the worker reads from the registry
    monitor_digest: str = ""  # of its frames' monitor values (registry), "" for none


def digest_of(text: str) -> str:
    """SHA-256 of ``text``: what a message carries of a record it names in the registry."""
    return hashlib.sha256(text.encode()).hexdigest()


def scan_ref(prefix: str, job_id: str, scan_key: str) -> dict:
    """What the chord callback message carries: the scan's payload is in the job's registry.

    Celery copies the callback into every file's message; a full ScanTask (every partial path
    and the configuration) made message size grow with the square of the scan's file count.
    """
    return {"ref": {"prefix": prefix, "job_id": job_id, "scan_key": scan_key}}


@dataclass
class ScanTask(_Payload):
    """Assemble the partials of one scan into its final NeXus file."""

    job_id: str
    prefix: str
    scan_key: str
    master: str
    entry: str
    label: str
    output: str
    n_frames: int
    partials: list[str]
    config: dict
    config_source: str = ""
    fingerprint: str = ""

    def config_obj(self) -> Config:
        return Config.from_mapping(self.config, source=self.config_source)
