"""Background jobs: the APScheduler job that unloads idle models."""

from __future__ import annotations

import logging

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from model_manager import ModelManager

log = logging.getLogger(__name__)

IDLE_JOB_ID = "evict-idle-models"


def start_scheduler(manager: ModelManager, check_interval: float) -> BackgroundScheduler:
    """Start a scheduler that runs ``manager.evict_idle`` every ``check_interval`` seconds."""
    # One named worker: the idle job never overlaps itself, and its thread is easy to spot.
    executor = ThreadPoolExecutor(max_workers=1, pool_kwargs={"thread_name_prefix": "idle-job"})
    scheduler = BackgroundScheduler(daemon=True, executors={"default": executor},
                                    job_defaults={"coalesce": True, "max_instances": 1})
    scheduler.add_job(_evict_idle, "interval", seconds=check_interval, args=[manager], id=IDLE_JOB_ID)
    scheduler.start()
    return scheduler


def reschedule(scheduler: BackgroundScheduler, check_interval: float) -> None:
    """Apply a new ``check_interval`` after a config reload."""
    scheduler.reschedule_job(IDLE_JOB_ID, trigger="interval", seconds=check_interval)


def _evict_idle(manager: ModelManager) -> None:
    # The job must survive anything a single run hits; the next tick tries again.
    try:
        manager.evict_idle()
    except Exception:
        log.exception("idle eviction failed")
