"""The states of a job and of its scans, and what a scan callback's result means.

One definition for every reader (watch, status, recovery, requeue and the CLI's ``--json``):

- a Celery task has ended once its state is one of Celery's ``READY_STATES`` (SUCCESS,
  FAILURE, REVOKED): a revoked callback will never run, so nothing waits for it;
- a scan's callback (:func:`tasks.assemble.assemble_scan`) returns an *outcome*, a dict whose
  ``status`` is one of :class:`Outcome`'s kinds; a callback that raised or was revoked has no
  such dict, and :func:`parse_outcome` turns it into a ``failed`` outcome with a message;
- a scan is ``running`` until its callback ended, then ``written``, ``incomplete`` (a file
  failed) or ``failed`` (the assembly); a job is ``running`` while a scan is, then ``done``
  when every scan was written, else ``incomplete``; ``interrupted`` when its run was killed.
"""

from __future__ import annotations

from enum import StrEnum

from celery import states as celery_states

FINAL = frozenset(celery_states.READY_STATES)  # SUCCESS, FAILURE, REVOKED
REVOKED = celery_states.REVOKED
FAILURE = celery_states.FAILURE
PENDING = celery_states.PENDING  # also: unknown to the backend (never sent, or expired)
SUCCESS = celery_states.SUCCESS


class Outcome(StrEnum):
    """The ``status`` of a scan callback's result."""

    DONE = "done"  # the NeXus file is written: "output", "frames"
    INCOMPLETE = "incomplete"  # a file of the scan failed: "failed" lists their results
    FAILED = "failed"  # the assembly failed: "error", "message"


class ScanState(StrEnum):
    RUNNING = "running"
    WRITTEN = "written"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    INCOMPLETE = "incomplete"
    INTERRUPTED = "interrupted"  # its run was killed before every scan had an outcome


def is_final(celery_state: str) -> bool:
    """A task in this Celery state will not run (again) by itself."""
    return celery_state in FINAL


def parse_outcome(meta: dict) -> dict | None:
    """A callback's outcome from its Celery meta (``backend.get_task_meta``): the dict it
    returned, or a ``failed`` outcome when it raised, was revoked or returned something else;
    None while it has not ended."""
    state, result = meta.get("status"), meta.get("result")
    if not is_final(state):
        return None
    if state == REVOKED:
        reason = str(result or "").strip()
        why = f" ({reason})" if reason not in ("", "revoked") else ""
        return _failed("TaskRevokedError", f"assembly revoked{why}: the scan was not written")
    if state == FAILURE:
        return _failed(type(result).__name__, f"assembly: {_first_line(result)}")
    if not isinstance(result, dict) or result.get("status") not in tuple(Outcome):
        return _failed("UnexpectedResult", f"assembly: unexpected result {result!r:.200}")
    return result


def scan_state(outcome: dict | None) -> tuple[ScanState, str]:
    """A scan's state and a message (empty when nothing to add) from its outcome."""
    if outcome is None:
        return ScanState.RUNNING, ""
    kind = outcome.get("status")
    if kind == Outcome.DONE:
        return ScanState.WRITTEN, ""
    if kind == Outcome.INCOMPLETE:
        return ScanState.INCOMPLETE, f"{len(outcome.get('failed', []))} file(s) failed"
    return ScanState.FAILED, str(outcome.get("message", ""))


def job_state(scan_states: list[str]) -> JobState:
    """A job's state from its scans' states."""
    if any(s == ScanState.RUNNING for s in scan_states):
        return JobState.RUNNING
    if all(s == ScanState.WRITTEN for s in scan_states):
        return JobState.DONE
    return JobState.INCOMPLETE


def _failed(error: str, message: str) -> dict:
    return {"status": Outcome.FAILED.value, "error": error, "message": message}


def _first_line(value) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__
