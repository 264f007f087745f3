"""A sweep logged to a real `mlflow server` over HTTP, checked in the MLflow web UI itself with headless
Chromium (Playwright driving Debian's /usr/bin/chromium; no browser is ever downloaded)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_TIMEOUT_MS = 60_000  # two busy cores: the UI's JavaScript can take a while


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_sweep_and_report_show_in_the_mlflow_ui(browser, shared_sweep, tmp_path):
    from orchestrator.report import build_report

    result, _ = shared_sweep
    mlflow_server = result.tracking_uri
    build_report("shared", result.parent_run_id, mlflow_server, out_dir=tmp_path / "report")
    client = MlflowClient(mlflow_server)
    children = {r.info.run_name: r.data.metrics for r in client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`avtune.stage` = 'main'")
        if {"acc_audio", "acc_visual"} <= set(r.data.metrics)}
    assert len(children) == 3  # normal, ogm_ge, gblend: the joint models

    page = browser.new_page(viewport={"width": 1800, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    # The runs table of the "Model training" view; the sweep's children are nested under its parent run.
    page.goto(f"{mlflow_server}/#/experiments/{result.experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text("sweep_shared", exact=True).wait_for()
    page.locator(".ag-row [col-id='attributes.`Run Name`'] button").first.click()  # expand the parent
    for name in children:
        page.get_by_text(name, exact=True).wait_for()
    page.get_by_role("button", name="Columns").click()
    for key in ("acc_audio", "acc_visual"):
        page.get_by_placeholder("Search columns").fill(key)
        # The tree node whose whole label is the key (not e.g. best_by_acc/acc_audio, where the key is highlighted).
        page.locator(f"xpath=//*[@data-testid='column-selector-tree']//span[normalize-space(.)='{key}'][strong]").click()
    page.keyboard.press("Escape")
    for key in ("acc_audio", "acc_visual"):
        page.locator(f"[role=columnheader][col-id='metrics.`{key}`']").wait_for()
    for name, metrics in children.items():
        # ag-grid renders the pinned run-name column and the metric columns as separate rows: pair them by row index.
        row_index = page.locator(".ag-row", has=page.get_by_text(name, exact=True)).first.get_attribute("row-index")
        for key in ("acc_audio", "acc_visual"):
            cell = page.locator(f".ag-row[row-index='{row_index}'] [col-id='metrics.`{key}`']").first
            assert float(cell.inner_text()) == pytest.approx(metrics[key], abs=1e-6), (name, key)
    close_assistant = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close_assistant.count():  # the side panel hides the table's right-hand columns
        close_assistant.first.click()
    page.locator("[role=columnheader][col-id='metrics.`acc_visual`']").scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / "mlflow_ui_runs.png"), full_page=True)

    # Grouped by configuration (the `avtune.config` tag: settings without the seed). Screenshot
    # mlflow_ui_grouped.png shows, under "Group by: avtune.config", one collapsible row per configuration
    # ("Group: normal_concat", "Group: ogm_ge_concat_a0.5_w0-2", ..., the G-Blend stage's runs in groups of
    # their own) whose acc_audio / acc_visual cells read "<mean over its seeds> (average)", its runs below.
    configs = {r.data.tags["avtune.config"]: r.data.metrics for r in client.search_runs(
        [result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and "
                                              "tags.`avtune.stage` = 'main'") if r.info.run_name in children}
    assert set(configs) == {name.removesuffix("_s0") for name in children}
    page.get_by_role("button", name="Group by").first.click()
    page.get_by_placeholder("Search").last.fill("avtune.config")
    page.get_by_text("avtune.config", exact=True).last.click()
    page.keyboard.press("Escape")
    for config, metrics in configs.items():
        group = page.locator(".ag-row", has=page.get_by_text(f"Group: {config}", exact=True)).first
        row_index = group.get_attribute("row-index")
        for key in ("acc_audio", "acc_visual"):
            text = page.locator(f".ag-row[row-index='{row_index}'] [col-id='metrics.`{key}`']").first.inner_text()
            assert text.endswith("(average)") and float(text.split()[0]) == pytest.approx(metrics[key], abs=1e-6), \
                (config, key, text)
    page.screenshot(path=str(tmp_path / "mlflow_ui_grouped.png"), full_page=True)

    # The report opens in the parent run's artifact viewer, with its embedded plots.
    page.goto(f"{mlflow_server}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}/artifacts")
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("report.html", exact=True).first.click()
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    frame = None
    while frame is None and time.monotonic() < deadline:
        for candidate in page.frames[1:]:
            try:
                if "avtune imbalance report: shared" in candidate.inner_text("body", timeout=1000):
                    frame = candidate
            except Exception:  # noqa: BLE001 - a frame still loading
                pass
        page.wait_for_timeout(500)  # not time.sleep: the sync API handles browser events only while waiting
    if frame is None:
        page.screenshot(path=str(tmp_path / "mlflow_ui_report_missing.png"), full_page=True)
    assert frame is not None, f"report.html did not render in the MLflow artifact viewer (see {tmp_path})"
    assert frame.locator("li#dominance").count() == 1
    loaded = frame.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded), loaded
    page.screenshot(path=str(tmp_path / "mlflow_ui_report.png"), full_page=True)
    assert (tmp_path / "mlflow_ui_runs.png").stat().st_size > 10_000
    page.close()
