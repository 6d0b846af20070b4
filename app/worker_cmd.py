"""Start a production Celery worker: one process per GPU, solo pool (no fork, so torch is safe).

python -m app.worker_cmd [--queue Q] [--hostname NAME] [--loglevel info]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from app.config import Settings, get_settings

log = logging.getLogger(__name__)


def worker_argv(settings: Settings, *, hostname: str | None = None, loglevel: str = "info") -> list[str]:
    argv = ["worker", "--pool=solo", "--concurrency=1", "-Q", settings.queue, f"--loglevel={loglevel}"]
    argv += ["--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def run_worker(
    *,
    hostname: str | None = None,
    loglevel: str = "info",
    settings: Settings | None = None,
    parent_pid: int | None = None,
) -> None:
    """Run a Celery worker (solo pool) in this process until it is stopped. Settings come from the env.

    ``parent_pid``: stop (warm shutdown) once this process is no longer our parent, e.g. when an
    embedded server that started us was killed with SIGKILL.
    """
    from worker.celery_app import celery_app, make_celery

    if parent_pid is not None:
        _watch_parent(parent_pid)

    app = celery_app if settings is None else make_celery(settings)
    app.worker_main(worker_argv(settings or get_settings(), hostname=hostname, loglevel=loglevel))


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(interval)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_worker_process(
    settings: Settings,
    *,
    hostname: str | None = None,
    loglevel: str = "info",
    exit_with_parent: bool = False,
    env_extra: dict[str, str] | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """Start a worker as a child process in its own process group (stop it with stop_process)."""
    env = {**os.environ, **settings.to_env(), **(env_extra or {})}
    cmd = [sys.executable, "-m", "app.worker_cmd", f"--loglevel={loglevel}"]
    if hostname:
        cmd += ["--hostname", hostname]
    if exit_with_parent:
        cmd += ["--parent-pid", str(os.getpid())]
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen_kwargs)


class GpuSelectionError(ValueError):
    pass


def parse_gpus(text: str, visible: int) -> list[int]:
    """`all` or `0,1,...` -> GPU indices, checked against the `visible` count."""
    if text.strip().lower() == "all":
        if visible == 0:
            raise GpuSelectionError(
                "--gpus all: no CUDA GPU is visible here; run `ptq4arvg worker` for a CPU worker"
            )
        return list(range(visible))
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GpuSelectionError(
            f"--gpus {text!r}: give `all` or comma-separated GPU indices like 0,1"
        ) from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise GpuSelectionError(f"--gpus {text!r}: give `all` or distinct GPU indices like 0,1")
    if max(gpus) >= visible:
        raise GpuSelectionError(f"--gpus {text!r}: GPU {max(gpus)} is not visible ({visible} visible)")
    return gpus


def run_gpu_workers(gpus: list[int], *, loglevel: str = "info", settings: Settings | None = None) -> int:
    """One solo worker process per GPU, pinned with CUDA_VISIBLE_DEVICES; jobs spread over them through
    the broker. A worker that dies is restarted; SIGTERM/SIGINT stop them all (warm shutdown first)."""
    settings = (settings or get_settings()).model_copy(update={"device": "cuda"})  # each sees one card
    stopping = threading.Event()

    def start(gpu: int) -> subprocess.Popen:
        return start_worker_process(
            settings, hostname=f"gpu{gpu}@%h", loglevel=loglevel, env_extra={"CUDA_VISIBLE_DEVICES": str(gpu)}
        )

    children = {gpu: start(gpu) for gpu in gpus}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        while not stopping.wait(1.0):
            for gpu, child in children.items():
                if child.poll() is not None:
                    print(f"worker on GPU {gpu} exited ({child.returncode}); restarting it", file=sys.stderr)
                    children[gpu] = start(gpu)
    finally:
        for child in children.values():
            stop_process(child, timeout=30.0)
    return 0


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """TERM the process group, wait, then KILL it (a hung worker only dies with SIGKILL)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class SupervisedWorker:
    """The embedded server's worker child: restarted when it dies, stopped with the server.

    A job the dead child was running is taken over through its lease by the new child's reconciler.
    """

    HEALTHY_AFTER_S = 60.0  # a child that lived this long restarts at once; faster deaths back off

    def __init__(self, settings: Settings, hostname: str):
        self.settings = settings
        self.hostname = hostname
        self.process: subprocess.Popen | None = None
        self._started = 0.0

    def start(self) -> subprocess.Popen:
        self.process = start_worker_process(self.settings, hostname=self.hostname, exit_with_parent=True)
        self._started = time.monotonic()
        return self.process

    async def watch(self, interval: float = 1.0) -> None:
        backoff = 1.0
        while True:
            await asyncio.sleep(interval)
            code = self.process.poll()
            if code is None:
                continue
            lived = time.monotonic() - self._started
            backoff = 1.0 if lived > self.HEALTHY_AFTER_S else min(2 * backoff, 30.0)
            log.error(
                "the worker child (pid %d) exited with %s after %.0fs; restarting",
                self.process.pid,
                code,
                lived,
            )
            await asyncio.sleep(backoff)
            self.start()

    def stop(self, timeout: float) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.worker_cmd", description=__doc__.splitlines()[0])
    parser.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu0@%%h")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this parent process dies")
    args = parser.parse_args(argv)
    run_worker(hostname=args.hostname, loglevel=args.loglevel, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
