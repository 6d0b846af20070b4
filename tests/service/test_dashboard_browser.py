"""The dashboard in a real headless Chromium (Selenium + Debian's chromedriver) against a real server and
worker running the real engine: log in, submit a small job on a bundled model, watch it finish on the
live list, open its report, see the grids load, generate images; a wrong key is refused and another
owner's job is not visible."""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from .helpers import WorkerPool, create_key, forget_queue, python_env, running_server, submit

CHROMEDRIVER = Path("/usr/bin/chromedriver")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def _missing() -> str | None:
    if shutil.which("chromium") is None or not CHROMEDRIVER.exists():
        return "Chromium or chromedriver is absent: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

# a job that finishes in seconds on 2 CPU cores
SMALL_FORM = {"calibration_num_samples": "16", "calibration_batch_size": "16", "evaluation_num_images": "8"}


@pytest.fixture(scope="module")
def engine_env(pg_url, redis_url, service_env, tmp_path_factory):  # service_env: the database is migrated
    run = tmp_path_factory.mktemp("dashboard")
    env = python_env(
        {
            "PTQ4ARVG_DATABASE_URL": pg_url,
            "PTQ4ARVG_BROKER_URL": redis_url,
            "PTQ4ARVG_QUEUE": f"ptq4arvg-ui-{uuid.uuid4().hex[:8]}",
            "PTQ4ARVG_ARTIFACT_DIR": str(run / "artifacts"),
            "PTQ4ARVG_SESSION_SECRET": uuid.uuid4().hex,
            "OMP_NUM_THREADS": "1",
            "RUN_DIR": str(run),
        }
    )
    yield env
    forget_queue(redis_url, env["PTQ4ARVG_QUEUE"])


@pytest.fixture(scope="module")
def ui(engine_env):
    run = Path(engine_env["RUN_DIR"])
    with running_server(engine_env, run / "uvicorn.log", timeout=120) as svc:
        svc.client.timeout = 300
        pool = WorkerPool(engine_env, run)
        try:
            pool.ensure()
            yield svc
        finally:
            pool.stop_all()


@pytest.fixture(scope="module")
def driver():
    from dashboard_screenshots import browser

    chrome = browser()
    chrome.implicitly_wait(0)
    yield chrome
    chrome.quit()


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def log_in(driver, ui, token: str) -> None:
    from dashboard_screenshots import log_in as submit_login

    driver.delete_all_cookies()
    submit_login(driver, ui.base_url, token)
    # the form posts and the browser follows the redirect: wait for the page it lands on
    wait_for(
        lambda: (
            driver.execute_script("return document.readyState") == "complete"
            and (
                not driver.current_url.endswith("/ui/login")
                or driver.find_elements("css selector", "[role=alert]")
            )
        ),
        30,
        "the login to answer",
    )


def images_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        "const ims = Array.from(document.querySelectorAll(arguments[0]));"
        "return ims.length > 0 && ims.every(i => i.complete && i.naturalWidth > 0);",
        selector,
    )


def test_a_wrong_key_is_refused(ui, driver):
    from selenium.webdriver.common.by import By

    log_in(driver, ui, "ptq_wrong-key")
    assert driver.current_url.endswith("/ui/login")
    assert "invalid or revoked API key" in driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
    driver.get(f"{ui.base_url}/ui/jobs")
    assert "/ui/login" in driver.current_url


def test_submit_watch_report_and_generate(ui, driver, engine_env):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    log_in(driver, ui, create_key(engine_env, "ui-uma", "jobs,generate"))
    assert driver.current_url.endswith("/ui/jobs")
    Select(driver.find_element(By.ID, "model")).select_by_value("tiny-llamagen")
    for name, value in SMALL_FORM.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#submit-form > button[type=submit]").click()
    wait_for(lambda: "/ui/jobs/" in driver.current_url, 30, "the job's page")
    job_id = driver.current_url.rsplit("/", 1)[1]
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith(f"Job {job_id[:8]}")

    # the list shows it, and its row changes to succeeded without a reload (the page's live script)
    driver.get(f"{ui.base_url}/ui/jobs")
    driver.execute_script("window.notReloaded = true")
    badge = f'tr[data-job-id="{job_id}"] [data-field="state"] .badge'
    wait_for(
        lambda: driver.find_element(By.CSS_SELECTOR, badge).text == "succeeded", 240, "the job to succeed"
    )
    assert driver.execute_script("return window.notReloaded === true")
    percent = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] .pct').text
    assert percent == "100.0%"

    driver.find_element(By.LINK_TEXT, job_id[:8]).click()
    wait_for(lambda: images_loaded(driver, "figure.grid img"), 120, "the FP and quantized grids")
    grids = driver.find_elements(By.CSS_SELECTOR, "figure.grid img")
    assert len(grids) == 2
    captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "figure.grid figcaption")]
    assert captions[0].startswith("FP") and captions[1].startswith("Quantized (ptq4arvg W8A8)")
    metrics = driver.find_element(By.ID, "metrics").text
    assert "Logit KL to FP" in metrics and "Token agreement with FP" in metrics
    layers = driver.find_elements(By.CSS_SELECTOR, "#layers tbody tr")
    assert len(layers) == 29  # tiny-llamagen: 4 blocks x 7 quantized sites + the output head
    assert "int8-cpu" in driver.find_element(By.ID, "layers").text
    assert driver.find_elements(By.CSS_SELECTOR, "svg.plot")  # per-layer bars, metric vs bits
    assert "manifest.json" in driver.find_element(By.ID, "files").text

    driver.get(f"{ui.base_url}/ui/generate")
    Select(driver.find_element(By.ID, "source")).select_by_value("model:tiny-llamagen")
    boxes = driver.find_elements(By.CSS_SELECTOR, "input[name=class_names]")
    boxes[1].click()  # Trouser
    boxes[7].click()  # Sneaker
    seed = driver.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("5")
    driver.find_element(By.CSS_SELECTOR, "#generate-form > button[type=submit]").click()
    wait_for(lambda: images_loaded(driver, "img.generated"), 120, "the generated images")
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#result figcaption")]
    assert captions == ["Trouser\nseed 5", "Sneaker\nseed 6"]


def test_another_owners_job_is_not_visible(ui, driver, engine_env):
    from selenium.webdriver.common.by import By

    victor = create_key(engine_env, "ui-victor", "jobs")
    spec = {
        "model": "tiny-llamagen",
        "recipe": "rtn",
        "w_bits": 8,
        "a_bits": None,
        "calibration": {"num_samples": 4, "batch_size": 4},
        "evaluation": {"num_images": 0},
    }
    theirs = submit(ui, victor, **spec)
    log_in(driver, ui, create_key(engine_env, "ui-wanda", "jobs"))
    assert driver.current_url.endswith("/ui/jobs")
    assert not driver.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{theirs["id"]}"]')
    driver.get(f"{ui.base_url}/ui/jobs/{theirs['id']}")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Error 404"
    log_in(driver, ui, victor)
    assert driver.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{theirs["id"]}"]')
