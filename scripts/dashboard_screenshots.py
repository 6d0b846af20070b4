"""Screenshots of every dashboard page at 1280x800 with headless Chromium (docs/dashboard/*.png).

    python scripts/dashboard_screenshots.py --url http://127.0.0.1:8000 --key "$(cat var/admin.token)"

Against a running service (`ptq4arvg serve`) with a worker: it submits four small jobs on tiny-llamagen
(rtn and ptq4arvg at W6A6 and W8A8), waits for them, then visits each page. Needs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from quantcore.images import compact_png

PAGES = ("login", "jobs", "report", "report-plots", "compare", "generate", "artifacts", "models")
CHROMEDRIVER = "/usr/bin/chromedriver"
SMALL_JOB = {"calibration_num_samples": "16", "calibration_batch_size": "16", "evaluation_num_images": "8"}


def browser(width: int = 1280, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # the window size includes the browser's frame: pin the page's own viewport
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def log_in(driver, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/login")
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def submit_job(driver, url: str, recipe: str, w_bits: int, a_bits: int) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(f"{url}/ui/jobs")
    Select(driver.find_element(By.ID, "model")).select_by_value("tiny-llamagen")
    Select(driver.find_element(By.ID, "recipe")).select_by_value(recipe)
    fields = {"w_bits": str(w_bits), **SMALL_JOB}
    for name, value in fields.items():
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    Select(driver.find_element(By.ID, "a_bits")).select_by_value(str(a_bits))
    driver.find_element(By.CSS_SELECTOR, "#submit-form > button[type=submit]").click()
    return driver.current_url.rsplit("/", 1)[1]


def wait_ended(driver, timeout: float = 300) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        driver.refresh()
        if driver.find_element(By.CSS_SELECTOR, "#job-status .badge").text in (
            "succeeded",
            "failed",
            "canceled",
        ):
            return
        time.sleep(2)
    raise SystemExit("the job did not end in time")


def wait_images(driver, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    script = "return Array.from(document.images).every(i => i.complete);"
    while time.monotonic() < deadline and not driver.execute_script(script):
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an API key with the jobs and generate scopes")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard"))
    args = parser.parse_args(argv)
    if not Path(CHROMEDRIVER).exists():
        print(f"error: {CHROMEDRIVER} not found: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    args.out.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        driver.get(f"{args.url}/ui/login")
        driver.save_screenshot(str(args.out / "login.png"))
        log_in(driver, args.url, args.key)
        runs = [("rtn", 6, 6), ("rtn", 8, 8), ("ptq4arvg", 6, 6), ("ptq4arvg", 8, 8)]
        jobs = [submit_job(driver, args.url, *run) for run in runs]
        driver.get(f"{args.url}/ui/jobs")
        time.sleep(2)  # one live update on the list while the jobs run
        driver.save_screenshot(str(args.out / "jobs.png"))
        for job in jobs:
            driver.get(f"{args.url}/ui/jobs/{job}")
            wait_ended(driver)
        driver.get(f"{args.url}/ui/jobs/{jobs[-1]}")
        wait_images(driver)
        driver.execute_script("document.getElementById('metrics-h').scrollIntoView()")
        driver.save_screenshot(str(args.out / "report.png"))
        driver.execute_script("document.getElementById('bits-h').scrollIntoView()")
        driver.save_screenshot(str(args.out / "report-plots.png"))
        driver.get(f"{args.url}/ui/compare")
        boxes = driver.find_elements(By.CSS_SELECTOR, "input[name=artifact]")[:3]
        for box in boxes:
            box.click()
        driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
        wait_images(driver)
        driver.save_screenshot(str(args.out / "compare.png"))
        driver.get(f"{args.url}/ui/generate")
        Select(driver.find_element(By.ID, "source")).select_by_value("model:tiny-llamagen")
        for box in driver.find_elements(By.CSS_SELECTOR, "input[name=class_names]")[:5]:
            box.click()
        driver.find_element(By.CSS_SELECTOR, "#generate-form > button[type=submit]").click()
        driver.execute_script("document.getElementById('result').scrollIntoView()")
        driver.save_screenshot(str(args.out / "generate.png"))
        for page in ("artifacts", "models"):
            driver.get(f"{args.url}/ui/{page}")
            driver.save_screenshot(str(args.out / f"{page}.png"))
    finally:
        driver.quit()
    for shot in args.out.glob("*.png"):
        compact_png(shot)  # 256 colours: half the bytes of the tree's budget
    print(f"wrote {', '.join(p + '.png' for p in PAGES)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
