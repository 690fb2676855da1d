"""End to end in a browser: `mlflow ui` serves the store that `dvc repro` wrote, on loopback and
offline, and headless Chromium shows every stage run, the probe's child runs and the probe metrics.

Needs the Debian packages chromium and chromium-driver (`make test` installs them when missing).
Screenshots are kept under test-artifacts/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow-ui")]  # module fixtures: one worker

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# offline machine refuses; a fresh profile keeps runs independent.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
    "--window-size=1600,1100",
)
STAGES = ("prepare", "align", "featurize", "pretrain", "extract", "probe")
PROBE_METRICS = ("phone_accuracy.layer_01", "phone_accuracy.input", "speaker_accuracy.layer_02")
SERVER_START_TIMEOUT = 90
RENDER_TIMEOUT = 30
MIN_SCREENSHOT_BYTES = 10_000


@dataclass
class Store:
    url: str
    experiment_id: str
    stage_runs: dict  # stage name -> the first (`dvc repro`) top-level run of that stage
    probe_children: dict  # child run name -> run, children of stage_runs["probe"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_store(repo: Path, url: str) -> Store:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mockingjay")
    assert experiment is not None, f"no 'mockingjay' experiment in {repo / 'mlflow.db'}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    stage_runs = {}
    for run in runs:  # oldest first: later tests add runs of their own to the shared repository
        stage = run.data.tags.get("mockingjay.stage")
        if stage in STAGES and "mlflow.parentRunId" not in run.data.tags and stage not in stage_runs:
            stage_runs[stage] = run
    # prepare/align/featurize may have run in the repository `pipeline_repo` was copied from; the
    # stages `dvc repro` ran in it are always there.
    assert {"pretrain", "extract", "probe"} <= set(stage_runs), f"stage runs in the store: {sorted(stage_runs)}"
    probe_id = stage_runs["probe"].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == probe_id}
    assert "phone/layer_01" in children, sorted(children)
    return Store(url, experiment.experiment_id, stage_runs, children)


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_until_serving(server: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll the server's health endpoint on loopback (never through a proxy) until it answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`mlflow ui` exited with {server.returncode} before serving:\n{log_tail(log)}")
        try:
            with opener.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"`mlflow ui` did not answer on {url} within {timeout}s:\n{log_tail(log)}")


def stop(server: subprocess.Popen) -> None:
    """End the server and whatever it started (it runs in a process group of its own)."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def browser(tmp_path_factory):
    """Headless Chromium through the system chromedriver; selenium-manager never downloads anything."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: this test drives headless Chromium. Run `make test`, which "
            "installs the Debian packages chromium and chromium-driver when they are missing "
            "(or, as root: apt-get install -y --no-install-recommends chromium chromium-driver).",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    workdir = tmp_path_factory.mktemp("chromium")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        env.setenv("SE_AVOID_STATS", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={workdir / 'profile'}")
        service = Service(executable_path=str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log"))
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(RENDER_TIMEOUT)
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def mlflow_ui(pipeline_repo, tmp_path_factory) -> Store:
    """`mlflow ui` on a free loopback port against the end-to-end test's store."""
    workdir = tmp_path_factory.mktemp("mlflow-ui")  # its cwd, so nothing lands in the repositories
    log = workdir / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "ui",
        "--backend-store-uri", f"sqlite:///{pipeline_repo / 'mlflow.db'}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = cli_env({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_serving(server, url, log, SERVER_START_TIMEOUT)
        yield read_store(pipeline_repo, url)
    finally:
        stop(server)


def wait_for(driver, condition, what: str, timeout: float = RENDER_TIMEOUT):
    """Wait for `condition(driver)` to be truthy; on timeout keep a screenshot and show the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"mlflow-ui-failed-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')}.png"
        driver.save_screenshot(str(shot))
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{what} did not show within {timeout}s at {driver.current_url} (screenshot {shot}); "
                    f"page text:\n{body[:3000]}")


def run_row(run_id: str, name: str):
    """The runs-table row of a run (AG Grid keys rows by run id) once its name link has rendered."""
    from selenium.webdriver.common.by import By

    def find(driver):
        for row in driver.find_elements(By.CSS_SELECTOR, f"div[role='row'][row-id='{run_id}']"):
            for link in row.find_elements(By.CSS_SELECTOR, f"a[href$='/runs/{run_id}']"):
                if link.text.strip() == name:
                    return row
        return False

    return find


def metric_row(name: str):
    """The (name, value) cells of a metric in a run page's metrics table."""
    from selenium.webdriver.common.by import By

    def find(driver):
        for row in driver.find_elements(By.XPATH, f"//div[@role='row'][div[@role='cell'][normalize-space(.)='{name}']]"):
            cells = row.find_elements(By.CSS_SELECTOR, "[role='cell']")
            if len(cells) >= 2 and cells[1].text.strip():
                return row, cells[0].text.strip(), cells[1].text.strip()
        return False

    return find


def child_link(name: str):
    from selenium.webdriver.common.by import By

    return lambda driver: driver.find_elements(By.XPATH, f"//a[normalize-space(.)='{name}']") or False


def close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel on first load; close it so screenshots show the page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        try:
            if button.is_displayed():
                button.click()
        except WebDriverException:
            pass


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > MIN_SCREENSHOT_BYTES, f"{path}: {len(data)} bytes"
    return path


def test_runs_table_shows_every_stage_run_and_the_probe_child_runs(browser, mlflow_ui):
    from selenium.webdriver.common.by import By

    store = mlflow_ui
    # The experiment opens in the GenAI view; the training runs table is the "machine_learning" workflow.
    browser.get(f"{store.url}/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning"
                "&orderByKey=attributes.start_time&orderByAsc=true")
    for stage, run in store.stage_runs.items():
        wait_for(browser, run_row(run.info.run_id, stage), f"the {stage} run in the runs table")
    close_assistant(browser)

    probe_id = store.stage_runs["probe"].info.run_id
    probe = wait_for(browser, run_row(probe_id, "probe"), "the probe run in the runs table")
    expand = probe.find_elements(By.CSS_SELECTOR, "div[col-id='attributes.`Run Name`'] button")
    assert expand, "the probe run has no expander for its child runs"
    expand[0].click()
    for name, child in store.probe_children.items():
        wait_for(browser, run_row(child.info.run_id, name), f"the probe child run {name} in the runs table")
    screenshot(browser, "mlflow-ui-runs.png")


def test_probe_run_page_shows_the_probe_metrics(browser, mlflow_ui):
    store = mlflow_ui
    probe = store.stage_runs["probe"]
    browser.get(f"{store.url}/#/experiments/{store.experiment_id}/runs/{probe.info.run_id}?workflowType=machine_learning")
    rows = {}
    for name in PROBE_METRICS:
        row, label, value = wait_for(browser, metric_row(name), f"metric {name} on the probe run page")
        assert label == name
        rows[name] = row
        expected = probe.data.metrics[name]
        assert float(value) == pytest.approx(expected, rel=1e-3, abs=1e-6), f"{name}: page shows {value}, store has {expected}"
    # The page links the probe's child runs too; waiting for them leaves no placeholder in the screenshot.
    wait_for(browser, child_link("phone/layer_01"), "the child run phone/layer_01 on the probe run page")
    close_assistant(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", rows[PROBE_METRICS[0]])
    screenshot(browser, "mlflow-ui-probe-run.png")
