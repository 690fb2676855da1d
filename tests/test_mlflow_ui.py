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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import STALLED_AFTER, cli_env, cpu_ticks, process_group, wait_while_progressing

# One test, so the module's server and browser are built once and stopped when it ends.
pytestmark = pytest.mark.slow

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
    runs = client.search_runs(
        [experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]
    )
    stage_runs = {}
    for run in runs:  # oldest first: later tests add runs of their own to the shared repository
        stage = run.data.tags.get("mockingjay.stage")
        if (
            stage in STAGES
            and "mlflow.parentRunId" not in run.data.tags
            and stage not in stage_runs
        ):
            stage_runs[stage] = run
    # prepare/align/featurize may have run in the repository `pipeline_repo` was copied from; the
    # stages `dvc repro` ran in it are always there.
    assert {"pretrain", "extract", "probe"} <= set(stage_runs), (
        f"stage runs in the store: {sorted(stage_runs)}"
    )
    probe_id = stage_runs["probe"].info.run_id
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == probe_id
    }
    assert "phone/layer_01" in children, sorted(children)
    return Store(url, experiment.experiment_id, stage_runs, children)


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_until_serving(server: subprocess.Popen, url: str, log: Path) -> None:
    """Poll the server's health endpoint on loopback (never through a proxy) until it answers, for as
    long as the server is starting up (uses CPU time or logs): no deadline."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def serving() -> bool:
        if server.poll() is not None:
            pytest.fail(
                f"`mlflow ui` exited with {server.returncode} before serving:\n{log_tail(log)}"
            )
        try:
            with opener.open(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def starting() -> tuple[int, int]:  # CPU time of the server's processes but its job consumers
        # (they poll all the time), and its log
        pids = [pid for pid in process_group(server.pid) if b"huey" not in _cmdline(pid)]
        return cpu_ticks(pids), log.stat().st_size

    wait_while_progressing(
        serving,
        starting,
        lambda: f"`mlflow ui` did not answer on {url}:\n{log_tail(log)}",
        poll=0.25,
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


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


@pytest.fixture(scope="module")
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
        service = Service(
            executable_path=str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log")
        )
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(STALLED_AFTER)  # the waits below watch progress instead
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_repo, tmp_path_factory) -> Store:
    """`mlflow ui` on a free loopback port against the end-to-end test's store."""
    workdir = tmp_path_factory.mktemp("mlflow-ui")  # its cwd, so nothing lands in the repositories
    log = workdir / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        f"sqlite:///{pipeline_repo / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = cli_env({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    with log.open("wb") as out:
        server = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(server, url, log)
        yield read_store(pipeline_repo, url)
    finally:
        stop(server)


def page_state(driver) -> tuple[str, int]:
    """What changes while a page is still loading or rendering: its URL and the size of its DOM.
    (Not CPU time: the server's job consumers and an idle Chromium use some all the time.)"""
    return driver.current_url, len(driver.page_source)


def wait_for(driver, condition, what: str):
    """Wait for `condition(driver)` to be truthy for as long as the page keeps changing (no deadline);
    if it stays as it is, keep a screenshot and show the page text."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    found = {}

    def shown() -> bool:
        try:
            found["value"] = condition(driver)
        except (
            NoSuchElementException,
            StaleElementReferenceException,
        ):  # the page re-rendered meanwhile
            found["value"] = False
        return bool(found["value"])

    try:
        wait_while_progressing(shown, lambda: page_state(driver), lambda: what, poll=0.2)
    except pytest.fail.Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        shot = (
            ARTIFACTS
            / f"mlflow-ui-failed-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')}.png"
        )
        driver.save_screenshot(str(shot))
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(
            f"{what} did not show at {driver.current_url}, and the page stopped changing "
            f"(screenshot {shot}); page text:\n{body[:3000]}"
        )
    return found["value"]


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
        for row in driver.find_elements(
            By.XPATH, f"//div[@role='row'][div[@role='cell'][normalize-space(.)='{name}']]"
        ):
            cells = row.find_elements(By.CSS_SELECTOR, "[role='cell']")
            if len(cells) >= 2 and cells[1].text.strip():
                return row, cells[0].text.strip(), cells[1].text.strip()
        return False

    return find


def child_link(name: str):
    from selenium.webdriver.common.by import By

    return lambda driver: (
        driver.find_elements(By.XPATH, f"//a[normalize-space(.)='{name}']") or False
    )


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
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > MIN_SCREENSHOT_BYTES, (
        f"{path}: {len(data)} bytes"
    )
    return path


def test_runs_table_and_probe_run_page_show_every_stage_run_child_run_and_probe_metric(
    browser, mlflow_ui
):
    from selenium.webdriver.common.by import By

    store = mlflow_ui
    # The experiment opens in the GenAI view; the training runs table is the "machine_learning" workflow.
    browser.get(
        f"{store.url}/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning"
        "&orderByKey=attributes.start_time&orderByAsc=true"
    )
    for stage, run in store.stage_runs.items():
        wait_for(browser, run_row(run.info.run_id, stage), f"the {stage} run in the runs table")
    close_assistant(browser)

    probe_id = store.stage_runs["probe"].info.run_id
    probe = wait_for(browser, run_row(probe_id, "probe"), "the probe run in the runs table")
    expand = probe.find_elements(By.CSS_SELECTOR, "div[col-id='attributes.`Run Name`'] button")
    assert expand, "the probe run has no expander for its child runs"
    expand[0].click()
    for name, child in store.probe_children.items():
        wait_for(
            browser,
            run_row(child.info.run_id, name),
            f"the probe child run {name} in the runs table",
        )
    screenshot(browser, "mlflow-ui-runs.png")

    # The probe run's own page: its metrics as the store has them.
    probe = store.stage_runs["probe"]
    browser.get(
        f"{store.url}/#/experiments/{store.experiment_id}/runs/{probe.info.run_id}?workflowType=machine_learning"
    )
    rows = {}
    for name in PROBE_METRICS:
        row, label, value = wait_for(
            browser, metric_row(name), f"metric {name} on the probe run page"
        )
        assert label == name
        rows[name] = row
        expected = probe.data.metrics[name]
        assert float(value) == pytest.approx(expected, rel=1e-3, abs=1e-6), (
            f"{name}: page shows {value}, store has {expected}"
        )
    # The page links the probe's child runs too; waiting for them leaves no placeholder in the screenshot.
    wait_for(
        browser, child_link("phone/layer_01"), "the child run phone/layer_01 on the probe run page"
    )
    close_assistant(browser)
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});", rows[PROBE_METRICS[0]]
    )
    screenshot(browser, "mlflow-ui-probe-run.png")
