"""Task payloads: plain dataclasses that travel as JSON between the client and the workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .config import Config


class _Payload:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def config_obj(self) -> Config:
        return Config.from_mapping(self.config, source=self.config_source)


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
    config: dict
    config_source: str = ""
    monitor: list[float] | None = None


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
