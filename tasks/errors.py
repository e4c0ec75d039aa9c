"""ringflow's exceptions: one base class, precise subclasses carrying the path, key or value.

Internals raise these; only ``cli/`` turns them into user-facing messages.

RingflowError
 +- ConfigError        a configuration key has an invalid or unsupported value
 +- DiscoveryError     a dataset file, entry or detector could not be resolved
 +- InputDataError     a file is unreadable or its content does not fit (shape, dtype)
 |   +- TransientInputError  ... for now: missing, locked by its writer, I/O error (retried)
 +- OutputError        an output location cannot be written, or an output exists already
 +- OutsideJobError    a task names a path outside the folders of the job its worker runs
 +- BrokerError        the broker cannot be started or reached
 +- WorkerError        a worker process could not start or died
"""

from __future__ import annotations


class RingflowError(Exception):
    """Base class of every error ringflow reports to a user."""


class ConfigError(RingflowError):
    def __init__(self, section: str, key: str, value: object, reason: str, path: str = ""):
        self.section, self.key, self.value, self.reason, self.path = (
            section,
            key,
            value,
            reason,
            path,
        )
        where = f"{path}: " if path else ""
        if not section:  # the file as a whole
            super().__init__(f"{value}: {reason}")
        else:
            super().__init__(f"{where}[{section}] {key} = {value!r}: {reason}")


class DiscoveryError(RingflowError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class InputDataError(DiscoveryError):
    """A file exists but its content cannot be used."""


class TransientInputError(InputDataError):
    """A file cannot be read now but may be soon: worth retrying, unlike corrupt data."""


class OutputError(RingflowError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class OutsideJobError(RingflowError):
    """A task would write or delete outside its job's folders (see :mod:`tasks.confine`)."""


class BrokerError(RingflowError):
    pass


class WorkerError(RingflowError):
    pass
