"""Screenshots of what a person looks at: the report page and the MLflow UI's runs tables, in headless Chromium.

Run after `micronet report`: python bench/screenshots.py [--report reports/index.html] [--out reports/screenshots]
[--experiment NAME ...]. The UI is a throwaway `mlflow ui` on a free 127.0.0.1 port over the project's store
(MLFLOW_TRACKING_URI or <repository>/mlflow.db). Needs Chromium (Debian: apt-get install chromium); without one it
says so and exits 0. Nothing is downloaded.

Chromium's one-shot `--screenshot` fires at the load event, when the MLflow single-page app still shows its
loading skeleton, and `--virtual-time-budget` never ends on that app; so the browser is driven over its DevTools
pipe (`--remote-debugging-pipe`: JSON messages, NUL-terminated, on file descriptors 3 and 4, no extra package)
and each shot waits until the page shows a text it must contain (a run's name).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from micronet.report import REPORT_EXPERIMENT, collect_runs
from micronet.tracking import runs_view_url, save_runs_view, tracking_uri

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
STARTUP_S = 300  # a cold `mlflow ui` takes a minute or more on a busy two-core machine
# The runs table is shot at the link `make mlflow-ui` prints (micronet.tracking.runs_view_url: the saved view with
# the headline columns), in a fresh browser profile, so what it shows comes from the link alone. The charts view
# uses the UI's own URL state: workflowType=machine_learning selects the classic runs pages over the GenAI ones,
# then only the pipelines' parent runs, best score first, one bar chart per metric.
PARENT_RUNS = quote("tags.`micronet.pipeline` LIKE '%'", safe="")
RUNS_VIEW = ("#/experiments/{id}/runs?workflowType=machine_learning&searchFilter=" + PARENT_RUNS
             + "&orderByKey=" + quote("metrics.`score`", safe="") + "&orderByAsc=true")
CHARTS_VIEW = RUNS_VIEW + "&compareRunsMode=CHART"
RUN_ARTIFACTS_VIEW = "#/experiments/{id}/runs/{run}/artifacts/pareto.png?workflowType=machine_learning"
WINDOW = (1920, 1080)  # a desktop: narrower, MLflow 3.17's Assistant panel hides the runs table's metric columns


def find_browser() -> Optional[str]:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    """One headless Chromium, driven through the DevTools protocol over a pipe."""

    def __init__(self, binary: str):
        self.binary = binary

    def __enter__(self) -> "Chromium":
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        # Chromium reads commands from fd 3 and writes replies to fd 4; keep our pipe ends clear of 0-4.
        to_browser, self.commands = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in os.pipe())
        self.replies, from_browser = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in os.pipe())

        def wire() -> None:  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        command = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                   f"--user-data-dir={self.profile.name}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                   "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=wire, pass_fds=(3, 4),
                                        start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.next_id = b"", 0
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.profile.cleanup()

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:  # everything else is an event nobody subscribed to here
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} within {timeout:.0f} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed its DevTools pipe during {method}")
            self.buffer += chunk

    def screenshot(self, url: str, png: Path, size: tuple[int, int] = WINDOW, wait_for: str = "",
                   timeout: float = 120, settle: float = 1.5) -> Path:
        """`url` at `size` as PNG, taken once the page's text contains `wait_for` (then `settle` seconds more
        for late drawing); if it never does within `timeout`, the shot is taken anyway and a note printed."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}, session)
            self.send("Page.navigate", {"url": url}, session)
            deadline = time.monotonic() + timeout
            check = (f"document.readyState === 'complete' && document.body !== null && "
                     f"document.body.innerText.includes({json.dumps(wait_for)})")
            while not self.send("Runtime.evaluate", {"expression": check, "returnByValue": True},
                                session)["result"].get("value"):
                if time.monotonic() > deadline:
                    print(f"note: {url} did not show {wait_for!r} within {timeout:.0f} s; screenshot as it is")
                    break
                time.sleep(0.5)
            time.sleep(settle)
            data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        finally:
            self.send("Target.closeTarget", {"targetId": target})
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(data))
        return png


class MlflowUI:
    """`mlflow ui` over one store on a free local port, for the length of a `with` block."""

    def __init__(self, store: str):
        self.store, self.port = store, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "MlflowUI":
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.store,
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # Its own process group: the server's worker processes are stopped with it, and nothing else is.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"mlflow ui exited ({self.process.returncode}): {self.log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise SystemExit(f"mlflow ui did not answer on {self.url} within {STARTUP_S} s")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("reports/index.html"))
    parser.add_argument("--out", type=Path, default=Path("reports/screenshots"))
    parser.add_argument("--experiment", action="append", help="runs table of this experiment (repeatable); "
                        "default: every experiment with pipeline runs")
    args = parser.parse_args()

    binary = find_browser()
    if binary is None:
        print(f"skip: no Chromium found (looked for {', '.join(BROWSERS)} on PATH); "
              "install one (Debian: apt-get install chromium) to take screenshots")
        return
    if not args.report.is_file():
        raise SystemExit(f"{args.report}: no report page; run `micronet report` first (or pass --report)")

    from mlflow.tracking import MlflowClient

    store = tracking_uri()
    client = MlflowClient(store)
    runs = collect_runs(client)
    names = args.experiment or sorted({run.experiment for run in runs})
    shots: list[Path] = []
    with Chromium(binary) as browser:
        page = args.report.resolve().as_uri()
        shots.append(browser.screenshot(page, args.out / "report.png", wait_for="micronet report"))
        shots.append(browser.screenshot(page, args.out / "report-full.png", (1400, 2400), wait_for="micronet report"))
        with MlflowUI(store) as ui:
            for name in names:
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    print(f"note: no experiment {name!r} in {store}")
                    continue
                first = next((r.name for r in runs if r.experiment == name), "")
                save_runs_view(client, experiment.experiment_id)  # as `make mlflow-ui` does for older stores
                runs_url = runs_view_url(experiment.experiment_id, port=ui.port)
                charts_url = ui.url + CHARTS_VIEW.format(id=experiment.experiment_id)
                for view, url in (("runs", runs_url), ("charts", charts_url)):
                    shots.append(browser.screenshot(url, args.out / f"mlflow-{name}-{view}.png", wait_for=first))
            report = client.get_experiment_by_name(REPORT_EXPERIMENT)
            latest = (client.search_runs([report.experiment_id], max_results=1, order_by=["start_time DESC"])
                      if report else [])
            if latest:
                url = ui.url + RUN_ARTIFACTS_VIEW.format(id=report.experiment_id, run=latest[0].info.run_id)
                shots.append(browser.screenshot(url, args.out / "mlflow-report-artifacts.png",
                                                wait_for="summary.md"))  # the artifact list, pareto.png open
    for png in shots:
        print(png)


if __name__ == "__main__":
    main()
