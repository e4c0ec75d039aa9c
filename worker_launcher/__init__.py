"""Starting brokers and workers: the embedded Redis, local Celery workers (SLURM jobs next)."""
