"""Everything that runs on a worker: Celery app, config, discovery, engine, readers, writers."""

__version__ = "0.1.0"
