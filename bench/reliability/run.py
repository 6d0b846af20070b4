"""Reliability trials of the production setup: PostgreSQL, Redis, an API server and real Celery workers
running the real engine on a bundled model.

Trials (each against its own private PostgreSQL cluster and Redis server, so that restarting them
disturbs nothing else on the machine):
- kill -9 of the worker running a job while another worker lives: the job must complete on the other
  within lease + 30 s, exactly once;
- Redis killed and restarted empty while jobs wait in the queue: every job must complete;
- PostgreSQL restarted while a job runs: the job completes or fails with a clear error, never stuck;
- schema fuzzing (schemathesis, with an admin key and without one): no 5xx;
- /healthz and /readyz latency while 50 clients keep /v1/generate busy.

    PYTHONPATH=. .venv/bin/python bench/reliability/run.py --out bench/reliability   # ~25 min here
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "service"))  # the service tests' process helpers and fuzzer

import helpers  # noqa: E402
from test_fuzz import fuzz  # noqa: E402

MODEL = "tiny-llamagen"
# a real ptq4arvg job, small enough for 2 CPU cores, long enough to be killed mid-way
JOB = {
    "model": MODEL,
    "recipe": "ptq4arvg",
    "w_bits": 8,
    "a_bits": 8,
    "calibration": {"num_samples": 32, "selection": "dgc-official", "seed": 0, "batch_size": 32},
    "evaluation": {"num_images": 8},
}
LEASE_SECONDS = 5
FINAL = ("succeeded", "failed", "canceled")


# ------------------------------------------------------------------------------ private services


class PrivateRedis:
    """A Redis server of our own that keeps nothing on disk: a restart empties it."""

    def __init__(self, run: Path):
        self.port = helpers.free_port()
        self.log = run / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process = helpers.start_process(cmd, {}, self.log)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start:\n{helpers.tail(self.process)}")
            time.sleep(0.1)

    def kill(self) -> None:
        helpers.kill_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temporary folder, run as the postgres user)."""

    def __init__(self, run: Path):
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        self.data = run / "pgdata"
        self.port = helpers.free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(
                f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout.strip()}"
            )

    def init(self) -> None:
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(self.data.parent, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth", "trust")

    def ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data / "log"),
            "-w",
            "-m",
            "fast",
            action,
        )


# ------------------------------------------------------------------------------------- the stack


class Stack:
    """API server + worker processes on the private services; workers are started and killed at will."""

    def __init__(self, run: Path, pg: PrivatePostgres, redis: PrivateRedis):
        self.run = run
        self.env = helpers.python_env(
            {
                "PTQ4ARVG_DATABASE_URL": pg.url,
                "PTQ4ARVG_BROKER_URL": redis.url,
                "PTQ4ARVG_QUEUE": "ptq4arvg-reliability",
                "PTQ4ARVG_ARTIFACT_DIR": str(run / "artifacts"),
                "PTQ4ARVG_CHECKPOINT_ROOTS": str(run / "checkpoints"),
                "PTQ4ARVG_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
                "PTQ4ARVG_RECONCILE_SECONDS": "1",
                "PTQ4ARVG_VISIBILITY_TIMEOUT": "3600",  # recovery must come from the leases, not redelivery
                "PTQ4ARVG_DEVICE": "cpu",
                "OMP_NUM_THREADS": "1",
            }
        )
        (run / "checkpoints").mkdir()
        result = helpers.cli(self.env, "migrate")
        if result.returncode:
            raise RuntimeError(result.stderr)
        self.token = helpers.create_key(self.env, "root", "admin")
        self.workers = helpers.WorkerPool(self.env, run)
        self.server = None

    @contextlib.contextmanager
    def serving(self):
        with helpers.running_server(self.env, self.run / "uvicorn.log", timeout=120) as service:
            service.client.timeout = 60
            self.server = service
            try:
                yield service
            finally:
                self.workers.stop_all()

    def submit(self, **overrides) -> str:
        r = self.server.client.post(
            "/v1/jobs", json={**JOB, **overrides}, headers=self.server.auth(self.token)
        )
        if r.status_code != 202:
            raise RuntimeError(f"submission: {r.status_code} {r.text}")
        return r.json()["id"]

    def job(self, job_id: str) -> dict | None:
        with contextlib.suppress(httpx.HTTPError):
            r = self.server.client.get(f"/v1/jobs/{job_id}", headers=self.server.auth(self.token))
            if r.status_code == 200:
                return r.json()
        return None  # the database may be restarting

    def wait(self, job_id: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.job(job_id) or seen
            if seen and seen["state"] in FINAL:
                return seen
            time.sleep(0.2)
        return seen

    def unreferenced_artifact_folders(self) -> list[str]:
        referenced, offset = set(), 0
        while True:
            r = self.server.client.get(
                "/v1/jobs", params={"limit": 100, "offset": offset}, headers=self.server.auth(self.token)
            )
            page = r.json()
            referenced |= {j["artifact_id"] for j in page["items"] if j.get("artifact_id")}
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
        root = self.run / "artifacts"
        folders = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(set(folders) - referenced)


def successes(job: dict) -> int:
    return sum(1 for e in job["events"] if e["to_state"] == "succeeded")


# ------------------------------------------------------------------------------------- the trials


def kill_rounds(stack: Stack, rounds: int) -> dict:
    outcomes = []
    for i in range(rounds):
        stack.workers.ensure(count=2)
        job_id = stack.submit(calibration={**JOB["calibration"], "seed": 100 + i})
        deadline = time.monotonic() + 120
        seen = stack.job(job_id)
        while not (seen and seen["state"] == "running" and seen["progress"]["percent"] > 5):
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {i}: job not running after 120 s: {seen}")
            time.sleep(0.1)
            seen = stack.job(job_id)
        victim = stack.workers.by_node(seen["worker"])
        helpers.kill_group(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        killed = time.monotonic()
        done = stack.wait(job_id, timeout=LEASE_SECONDS + 120)
        recovered_in = time.monotonic() - killed
        state = done["state"] if done else "unknown"
        outcomes.append(
            {
                "round": i,
                "killed_at_percent": round(seen["progress"]["percent"], 1),
                "state": state,
                "seconds_to_final": round(recovered_in, 1),
                "completed_by_other_worker": bool(done and done["worker"] != seen["worker"]),
                "successes": successes(done) if done else 0,
            }
        )
        print(f"kill round {i}: {outcomes[-1]}", flush=True)
    succeeded = [o for o in outcomes if o["state"] == "succeeded"]
    return {
        "rounds": rounds,
        "lease_seconds": LEASE_SECONDS,
        "lost": sum(o["state"] == "failed" for o in outcomes),
        "duplicated": sum(o["successes"] > 1 for o in outcomes),
        "stuck": sum(o["state"] not in FINAL for o in outcomes),
        "within_lease_plus_30s": sum(o["seconds_to_final"] <= LEASE_SECONDS + 30 for o in succeeded),
        "seconds_to_final_max": max(o["seconds_to_final"] for o in outcomes),
        "outcomes": outcomes,
    }


def redis_restart(stack: Stack, redis: PrivateRedis, jobs: int) -> dict:
    stack.workers.ensure()
    ids = [stack.submit(calibration={**JOB["calibration"], "seed": 200 + i}) for i in range(jobs)]
    time.sleep(1.0)  # the first job runs, the others wait in the broker
    redis.kill()
    redis.start()
    restarted = time.monotonic()
    finals = [stack.wait(job_id, timeout=120 + 60 * jobs) for job_id in ids]
    states = [f["state"] if f else "unknown" for f in finals]
    print(f"redis restart: {states}", flush=True)
    return {
        "jobs": jobs,
        "succeeded": states.count("succeeded"),
        "lost": sum(s not in FINAL or s == "failed" for s in states),
        "duplicated": sum(successes(f) > 1 for f in finals if f),
        "seconds_after_restart": round(time.monotonic() - restarted, 1),
    }


def postgres_restart(stack: Stack, pg: PrivatePostgres) -> dict:
    stack.workers.ensure()
    job_id = stack.submit(calibration={**JOB["calibration"], "seed": 300})
    deadline = time.monotonic() + 120
    while (stack.job(job_id) or {}).get("state") != "running":
        if time.monotonic() > deadline:
            raise RuntimeError("the postgres trial's job did not start")
        time.sleep(0.1)
    t0 = time.monotonic()
    pg.ctl("restart")
    down_seconds = time.monotonic() - t0
    done = stack.wait(job_id, timeout=300)
    state = done["state"] if done else "unknown"
    print(f"postgres restart: {state} ({done and done.get('error')})", flush=True)
    return {
        "state": state,
        "stuck": state not in FINAL,
        "restart_seconds": round(down_seconds, 1),
        "error": done.get("error") if done else None,
    }


def fuzzing(stack: Stack, with_key: int, without_key: int) -> dict:
    results = {}
    for label, headers, examples in (
        ("admin key", stack.server.auth(stack.token), with_key),
        ("no key", {}, without_key),
    ):
        statuses, errors = fuzz(stack.server.base_url, headers, examples)
        first = [repr(case)[:500] for case in errors[:3]]  # bodies may be bytes: kept as text
        results[label] = {"requests": sum(statuses.values()), "5xx": len(errors), "first_5xx": first}
        print(f"fuzzing ({label}): {results[label]['requests']} requests, {len(errors)} 5xx", flush=True)
    return results


def health_under_load(stack: Stack, clients: int, seconds: float) -> dict:
    base, headers = stack.server.base_url, stack.server.auth(stack.token)
    stop = threading.Event()
    generate_statuses: dict[int, int] = {}
    lock = threading.Lock()

    def generator(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while not stop.is_set():
                body = {"model": MODEL, "classes": [i % 10], "seed": i}
                try:
                    code = client.post("/v1/generate", json=body, headers=headers).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    generate_statuses[code] = generate_statuses.get(code, 0) + 1

    latencies: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
    probe_codes: dict[str, dict[int, int]] = {path: {} for path in latencies}

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                for path, values in latencies.items():
                    t0 = time.perf_counter()
                    code = client.get(path).status_code
                    values.append((time.perf_counter() - t0) * 1000)
                    probe_codes[path][code] = probe_codes[path].get(code, 0) + 1
                time.sleep(0.05)

    threads = [threading.Thread(target=generator, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)  # the queue fills before the probe starts
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(seconds)
    stop.set()
    prober.join(timeout=30)
    for t in threads:
        t.join(timeout=130)

    def summary(values: list[float]) -> dict:
        ordered = sorted(values)
        return {
            "probes": len(ordered),
            "p50_ms": round(statistics.median(ordered), 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max_ms": round(ordered[-1], 1),
        }

    return {
        "clients": clients,
        "seconds": seconds,
        "generate_statuses": {str(k): v for k, v in sorted(generate_statuses.items())},
        **{path: {**summary(values), "statuses": probe_codes[path]} for path, values in latencies.items()},
    }


# ------------------------------------------------------------------------------------------ report


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def markdown(result: dict) -> str:
    k, r, p, f, h = (
        result[key] for key in ("kill_9", "redis_restart", "postgres_restart", "fuzzing", "health")
    )
    m = result["machine"]
    lines = [
        "# Reliability trials",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {result['date']}. Private PostgreSQL cluster and "
        f"Redis server, API server (`python -m app.server`), real Celery workers, the real engine on `{MODEL}` "
        f"(ptq4arvg W8A8, 32 calibration images). Job lease {LEASE_SECONDS} s. Produced by "
        "`bench/reliability/run.py`.",
        "",
        "| trial | tried | lost | duplicated | stuck | detail |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| kill -9 of the busy worker, another alive | {k['rounds']} | {k['lost']} | {k['duplicated']} | "
        f"{k['stuck']} | {k['within_lease_plus_30s']}/{k['rounds']} done within lease + 30 s; slowest "
        f"{k['seconds_to_final_max']} s after the kill |",
        f"| Redis killed and restarted empty with jobs queued | {r['jobs']} | {r['lost']} | {r['duplicated']} | "
        f"{r['jobs'] - r['succeeded'] - r['lost']} | all final {r['seconds_after_restart']} s after the restart |",
        f"| PostgreSQL restarted mid-job | 1 | – | – | {int(p['stuck'])} | job {p['state']}"
        + (f" ({p['error']})" if p.get("error") else "")
        + f"; restart took {p['restart_seconds']} s |",
        "",
        "| fuzzing (schemathesis) | requests | 5xx |",
        "| --- | --- | --- |",
        *(f"| {label} | {v['requests']} | {v['5xx']} |" for label, v in f.items()),
        "",
        f"Health under {h['clients']} concurrent `/v1/generate` clients for {h['seconds']} s "
        f"(generate answers: {h['generate_statuses']}):",
        "",
        "| probe | probes | p50 ms | p99 ms | max ms | statuses |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {path} | {h[path]['probes']} | {h[path]['p50_ms']} | {h[path]['p99_ms']} | {h[path]['max_ms']} | "
            f"{h[path]['statuses']} |"
            for path in ("/healthz", "/readyz")
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="kill -9 rounds")
    parser.add_argument("--queued-jobs", type=int, default=4, help="jobs waiting when Redis restarts")
    parser.add_argument("--fuzz-examples", type=int, default=60, help="per operation and mode, with a key")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    run = Path(tempfile.mkdtemp(prefix="ptq4arvg-reliability-"))
    run.chmod(0o755)  # the postgres user reaches its cluster below it
    pg, redis = PrivatePostgres(run / "pg"), PrivateRedis(run)
    (run / "pg").mkdir()
    pg.init()
    pg.ctl("start")
    redis.start()
    started = time.monotonic()
    try:
        (run / "stack").mkdir()
        stack = Stack(run / "stack", pg, redis)
        with stack.serving():
            result = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine(),
                "kill_9": kill_rounds(stack, args.rounds),
                "redis_restart": redis_restart(stack, redis, args.queued_jobs),
                "postgres_restart": postgres_restart(stack, pg),
                "fuzzing": fuzzing(stack, args.fuzz_examples, max(1, args.fuzz_examples // 3)),
                "health": health_under_load(stack, args.clients, args.load_seconds),
            }
            result["unreferenced_artifact_folders"] = stack.unreferenced_artifact_folders()
    finally:
        with contextlib.suppress(Exception):
            pg.ctl("stop")
        with contextlib.suppress(Exception):
            redis.kill()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result) + (
        f"\nArtifact folders left unreferenced: {len(result['unreferenced_artifact_folders'])}. "
        f"Wall time {result['wall_seconds']} s.\n"
    )
    (args.out / "results.md").write_text(text)
    print(text)
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
