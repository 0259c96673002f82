"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver, through
selenium) loads the page of a deployment and of a fedsim run while they go, and sees the round
counter advance and the accuracy curve drawn; /metrics scraped from the live process parses.

Skipped, with the reason, where the browser, its driver or selenium is missing (`make test-data`
installs them as root). FLOWERBED_SCREENSHOT=PATH saves the fedsim page's screenshot there
(docs/img/dashboard.png is taken so, see docs/dashboard.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedserver.state import StateDir
from shared.processes import free_port, stop_tree

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = os.environ.get("FLOWERBED_SCREENSHOT")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium driven by selenium; the test skips, saying why, where it cannot start."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: as root, apt-get install chromium chromium-driver (make test-data)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1150"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def shown_round(driver) -> int:
    text = driver.find_element("id", "round").text
    return int(text) if text.isdigit() else -1


def curve_points(driver, chart: str) -> int:
    paths = driver.find_elements("css selector", f"#{chart} path.curve")
    return max((int(path.get_attribute("data-points") or 0) for path in paths), default=0)


def watch_rounds_advance(driver, url: str, e2e, rounds_seen: int, timeout: float) -> tuple[int, int]:
    """Load `url` once it answers; the round the page first showed and the one it shows once it
    has shown `rounds_seen` rounds with an accuracy curve of as many points."""
    e2e.wait_until(lambda: _answers(url), timeout, f"the dashboard at {url}")
    driver.get(url)
    e2e.wait_until(lambda: shown_round(driver) >= 0, 30, "the page's first poll")
    first = shown_round(driver)
    e2e.wait_until(lambda: shown_round(driver) >= max(first + 1, rounds_seen) and
                   curve_points(driver, "accuracy-chart") >= rounds_seen, timeout,
                   f"the page to show round {rounds_seen} and its curve")  # fmt: skip
    return first, shown_round(driver)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "api/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scraped(url: str) -> dict[str, float]:
    """/metrics' unlabelled samples, by name."""
    text = httpx.get(url + "metrics", timeout=5).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_a_deployment_s_page_shows_its_rounds_advance_in_a_browser(tmp_path, e2e, browser):
    # Prepare: a daemon with its dashboard on a free port, two devices, five rounds
    assert e2e.run_cli(["fedserver.cli", "init", str(tmp_path / "pki"), "--clients", "2"]).returncode == 0
    parts, server_data = e2e.write_partitions(tmp_path, 2, 300)
    config = tmp_path / "run.toml"
    config.write_text(e2e.run_toml(server_data, 2, 5))
    state, address, port = StateDir(tmp_path / "state"), f"127.0.0.1:{free_port()}", free_port()
    url = f"http://127.0.0.1:{port}/"
    e2e.start_daemon("dashboard-fedserver", tmp_path / "pki", config, state, address, "--dashboard", str(port))
    for k in (1, 2):
        e2e.start_fedclient(f"dashboard-client-{k}", address, tmp_path / "pki",
                            tmp_path / "pki" / "clients" / f"client-{k}.key", parts[k - 1])  # fmt: skip

    # Execute
    first, later = watch_rounds_advance(browser, url, e2e, rounds_seen=3, timeout=240)
    metrics = scraped(url)
    nodes = httpx.get(url + "api/nodes", timeout=5).json()["nodes"]

    # Assert
    assert later > first and later >= 3
    assert metrics["flowerbed_round"] >= 3 and 0 <= metrics["flowerbed_accuracy"] <= 1
    assert metrics["flowerbed_replies_received_total"] >= 6
    assert len(nodes) == 2 and all(n["rounds_taken_part"] >= 3 and n["name"] is None for n in nodes)
    assert f"dashboard on {url}" in e2e.log("dashboard-fedserver")


def test_a_fedsim_run_s_page_shows_its_rounds_advance_in_a_browser(tmp_path, e2e, browser):
    # Prepare: a synthetic run of many short rounds, its dashboard on a free port
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    argv = [*e2e.python, "simulations.cli", "run", "--quiet", "--output", str(tmp_path / "run"), "--dashboard", str(port),
            "--set", "rounds=40", "--set", "num-clients=20", "--set", "clients-per-round=10", "--set", "workers=1"]  # fmt: skip
    run = e2e.start("dashboard-fedsim", argv)

    # Execute
    try:
        first, later = watch_rounds_advance(browser, url, e2e, rounds_seen=4, timeout=120)
        metrics = scraped(url)
        off_tiles = [browser.find_element("id", tile).is_displayed() for tile in ("secagg-tile", "privacy-tile")]
        if SCREENSHOT:
            e2e.wait_until(lambda: shown_round(browser) >= 12, 120, "round 12 for the screenshot")
            browser.save_screenshot(SCREENSHOT)
    finally:
        stop_tree(run, grace=10)

    # Assert
    assert later > first and later >= 4
    assert off_tiles == [False, False]  # neither secure aggregation nor DP in this run
    assert metrics["flowerbed_round"] >= 4 and metrics["flowerbed_devices_connected"] == 20
    assert f"dashboard on {url}" in e2e.log("dashboard-fedsim")


def test_fedsim_without_prometheus_client_refuses_the_dashboard_in_one_line(tmp_path):
    shadow = tmp_path / "shadow"
    (shadow / "prometheus_client").mkdir(parents=True)
    (shadow / "prometheus_client" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(Path(__file__).resolve().parents[2])])}

    done = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--dashboard", "0",
                           "--output", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fedsim: error: the dashboard's /metrics needs prometheus-client: pip install 'flowerbed[server]'"
    ]
