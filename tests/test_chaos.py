"""Seeded chaos: real `ringflow run` jobs, one ringflow process SIGKILLed at a random moment;
and real `ringflow integrate-slurm` jobs on the CI SLURM, one worker or the client killed.

Each trial kills a pool child of gpu0, gpu0's Celery main process, the assembly worker's
main process, the embedded broker or the client itself (see tests/chaos.py), 0-4 s after the
first file task reached gpu0 (0-0.3 s after the first assembly task started, for the
assembly worker), and requires what a clean run gives: exit code 0 (of the run,
or of `requeue --stranded` after the client was killed), outputs equal byte for byte, no
process of the trial left alive, nothing but the outputs in the output folder.

    RINGFLOW_CHAOS_TRIALS=200 RINGFLOW_CHAOS_SEED=7 python -m pytest tests/test_chaos.py -s -n 0

runs the long mode; a failing trial prints its seed, which alone reruns it
(RINGFLOW_CHAOS_SEED=<trial seed> RINGFLOW_CHAOS_TRIALS=1). RINGFLOW_CHAOS_KINDS=a,b keeps
the trials to some kinds.

The distributed variant (test_seeded_faults_during_integrate_slurm) runs `integrate-slurm`
on the shared test Redis (2 GPU worker jobs and the assembly job, a queue prefix per trial)
and, 0-3 s after the victim's GPU worker received its first file, does one of:
`scancel --signal=KILL` of a GPU worker job, SIGKILL of a prefork child or of the Celery
main process of a GPU worker, `scancel --signal=KILL` of the assembly job, or SIGKILL of
the client (then `requeue JOB --stranded`, `status JOB --watch --json`, `workers stop`).
It requires exit code 0, the clean run's outputs, no SLURM job of the prefix left in squeue
and no process left. RINGFLOW_CHAOS_SLURM_SEED / _TRIALS (5: one per kind) / _KINDS.
"""

from __future__ import annotations

import json

import pytest

from tasks.demo import DemoSpec, write_demo

from . import chaos
from .conftest import last_json, run_cli
from .services import redis_url, require_slurm

SEED, TRIALS, KINDS = chaos.settings()
SLURM_SEED, SLURM_TRIALS, SLURM_KINDS = chaos.settings(
    "RINGFLOW_CHAOS_SLURM", chaos.SLURM_KINDS, chaos.SLURM_TRIALS
)
# every trial is bounded (a hung one fails by itself); this only backs those bounds up
TEST_TIMEOUT_S = 120 + TRIALS * (chaos.FIRST_FILE_TIMEOUT_S + 3 * chaos.COMMAND_TIMEOUT_S)
SLURM_TIMEOUT_S = 120 + SLURM_TRIALS * (
    chaos.FIRST_FILE_TIMEOUT_S + 4 * chaos.COMMAND_TIMEOUT_S + chaos.SLURM_GONE_S
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def chaos_data(tmp_path_factory):
    """2 scans x 2 Lima files x 40 frames (a file takes ~2 s: kills land mid-file, and the
    first scan is assembled while the second integrates), and a clean run's outputs."""
    root = tmp_path_factory.mktemp("chaos-data")
    demo = write_demo(DemoSpec(str(root), scans=2, files_per_scan=2, frames_per_file=40))
    config = chaos.chaos_config(demo.config, root)
    clean = run_cli("run", config, "--json", timeout=chaos.COMMAND_TIMEOUT_S)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert len(last_json(clean.stdout)["outputs"]) == 2
    reference = chaos.output_files(root / "out")
    assert len(reference) == 2, reference  # the outputs, nothing else
    return demo.config, reference


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_seeded_sigkill_of_any_ringflow_process(chaos_data, tmp_path, measured):
    demo_config, reference = chaos_data
    trials = chaos.plan_trials(SEED, TRIALS, KINDS)
    run_trials(
        trials,
        lambda trial: chaos.run_trial(trial, demo_config, reference, tmp_path),
        SEED,
        KINDS,
        tmp_path / "chaos-summary.json",
        measured,
    )


@pytest.mark.timeout(SLURM_TIMEOUT_S)
def test_seeded_faults_during_integrate_slurm(chaos_data, tmp_path, measured):
    require_slurm()
    url = redis_url()
    demo_config, reference = chaos_data
    trials = chaos.plan_trials(SLURM_SEED, SLURM_TRIALS, SLURM_KINDS, chaos.SlurmTrial)
    run_trials(
        trials,
        lambda trial: chaos.run_slurm_trial(trial, demo_config, reference, tmp_path, url),
        SLURM_SEED,
        chaos.SLURM_KINDS,
        tmp_path / "chaos-slurm-summary.json",
        measured,
    )


def run_trials(trials, run, seed: int, kinds: tuple[str, ...], path, measured) -> None:
    """Each trial in turn, one line each; the report (also to ``measured``), the JSON
    summary; fail if one failed."""
    names = ", ".join(sorted({t.kind for t in trials}, key=kinds.index))
    print(f"\nchaos: seed {seed}, {len(trials)} trials, kinds {names}", flush=True)
    outcomes = []
    for trial in trials:
        outcomes.append(run(trial))
        print(chaos.line(outcomes[-1]), flush=True)
        if outcomes[-1].error:
            print(f"  {outcomes[-1].error}", flush=True)
    summary = chaos.summarise(outcomes, seed, kinds)
    path.write_text(json.dumps(summary, indent=1))
    print(chaos.report(summary))
    measured(f"chaos ({path.name}):\n{chaos.report(summary)}")
    print(f"chaos: summary in {path}", flush=True)
    failed = [o.error for o in outcomes if not o.ok]
    assert not failed, f"{len(failed)} of {len(outcomes)} chaos trials failed:\n" + "\n".join(
        failed
    )
