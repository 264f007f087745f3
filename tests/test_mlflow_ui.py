"""A sweep logged to a real `mlflow server` over HTTP, checked in the MLflow web UI itself with headless
Chromium (Playwright driving Debian's /usr/bin/chromium; no browser is ever downloaded); and what the UI
reads from MLflow (experiment kind, dataset inputs), checked on a real SQLite store."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_SWEEP, SMALL_SET
from orchestrator import load_spec
from orchestrator.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, reopen_run
from orchestrator.training import ensure_data, start_mlflow_run
from workers.layouts import LAYOUTS

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


@pytest.mark.slow
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


# ---- what the UI reads: the experiment kind and each run's dataset input (real SQLite store, no server) ----


def start_run(tmp_path: Path, name: str, data: dict) -> tuple[MlflowClient, str, str]:
    """A run started as `avtune train` / `avtune sweep` start theirs (spec resolved, data checked)."""
    spec = ensure_data(load_spec({"name": name, "data": data, "storage": {"runs_dir": str(tmp_path / "runs")}}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment_id, run_id = start_mlflow_run(client, spec)
    return client, experiment_id, run_id


def kind(client: MlflowClient, experiment_id: str) -> str | None:
    return client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)


def test_avtune_experiments_are_model_training_ones_and_a_kind_set_elsewhere_stays(tmp_path, synth_dataset):
    data = {"source": "dataset", "root": str(synth_dataset)}
    client, created, run_id = start_run(tmp_path, "fresh", data)
    assert kind(client, created) == MODEL_TRAINING_KIND == "custom_model_development"

    plain = client.create_experiment("plain")  # made by someone else, no kind: avtune marks it when it logs there
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert kind(client, plain) is None
    for name, experiment_id in (("plain", plain), ("genai", genai)):
        assert start_run(tmp_path, name, data)[1] == experiment_id
    assert kind(client, plain) == MODEL_TRAINING_KIND
    assert kind(client, genai) == "genai_development"  # never overwritten

    client.delete_experiment_tag(created, EXPERIMENT_KIND_TAG)  # an experiment from before the kind existed
    client.set_terminated(run_id, "KILLED")
    reopen_run(client, run_id)  # what a resume does
    assert kind(client, created) == MODEL_TRAINING_KIND


def dataset_input(client: MlflowClient, run_id: str):
    (found,) = client.get_run(run_id).inputs.dataset_inputs
    return found.dataset, {tag.key: tag.value for tag in found.tags}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_run_logs_the_layouts_manifest_as_its_training_dataset(tmp_path, synth_layouts, layout):
    import json

    root = synth_layouts[layout]
    client, _, run_id = start_run(tmp_path, "data", {"source": "dataset", "layout": layout, "root": str(root)})
    dataset, tags = dataset_input(client, run_id)
    assert tags == {"mlflow.data.context": "training"}
    assert dataset.name == f"{layout}:{root.name}"
    assert json.loads(dataset.source) == {"uri": str(root)} and dataset.source_type == "local"
    assert len(dataset.digest) == 8
    # Every clip the generator wrote into the split lists, once (CREMA-D, VGGSound and Kinetics-Sounds: val
    # derived from train), with its split, label and media paths.
    card = json.loads((root / "card.json").read_text())
    assert json.loads(dataset.profile)["num_rows"] == card["num_clips"] == 12
    columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
    assert columns == ["clip_id", "split", "label", "video", "audio"]


def test_the_dataset_digest_follows_the_clips_and_the_generated_card(tmp_path, synth_layouts):
    source = synth_layouts["cremad"]
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)

    # The settings synth_layouts made its sets with: a generated set is used only with the spec that made it.
    made_with = {"classes": 3, "clips_per_class": 4, "clip_seconds": 0.5, "fps": 8, "height": 32, "width": 32,
                 "sample_rate_hz": 16000, "seed": 1}

    def digest(root: Path, generated: bool = False) -> tuple[str, str]:
        data = {"source": "generated" if generated else "dataset", "layout": "cremad", "root": str(root),
                **({"synth": made_with} if generated else {})}
        client, _, run_id = start_run(tmp_path / f"runs{time.monotonic_ns()}", "data", data)
        dataset, _ = dataset_input(client, run_id)
        return dataset.name, dataset.digest

    original = digest(source)
    assert digest(copy) == ("cremad:copy", original[1])  # the same clips under another folder
    train = copy / "train.csv"
    rows = train.read_text().splitlines()
    clip, label = rows[-1].split(",")
    other = next(e for e in ("NEU", "HAP", "SAD") if e != label)
    train.write_text("\n".join(rows[:-1] + [f"{clip},{other}"]) + "\n")  # one label changed
    relabelled = digest(copy)[1]
    assert relabelled != original[1]

    # Generated clips: the generator's card is the source and part of the digest.
    name, generated = digest(copy, generated=True)
    assert name == "generated-cremad:copy" and generated != relabelled
    client, _, run_id = start_run(tmp_path / "gen", "data", {"source": "generated", "layout": "cremad", "root": str(copy),
                                                             "synth": made_with})
    assert dataset_input(client, run_id)[0].source == f'{{"uri": "{copy / "card.json"}"}}'
    card = copy / "card.json"
    card.write_text(card.read_text().replace('"format"', '"format" ', 1))
    assert digest(copy, generated=True)[1] != generated


# ---- in the browser: the experiment page opens on the runs table, whose Dataset column names the data ----


@pytest.mark.slow
def test_the_experiment_page_shows_the_runs_table_with_each_runs_dataset(browser, shared_sweep, synth_dataset, tmp_path):
    import json

    result, _ = shared_sweep
    client = MlflowClient(result.tracking_uri)
    assert client.get_experiment(result.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    runs = client.search_runs([result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    runs.append(client.get_run(result.parent_run_id))
    assert len(runs) >= 9  # the parent, 3 G-Blend estimation runs, 5 compared methods
    digests = set()
    for run in runs:  # the parent and every trial, the estimation stage's included
        dataset, tags = dataset_input(client, run.info.run_id)
        assert (dataset.name, tags, json.loads(dataset.source)) == (
            f"avtune:{synth_dataset.name}", {"mlflow.data.context": "training"}, {"uri": str(synth_dataset)}), run.info.run_name
        assert json.loads(dataset.profile)["num_rows"] == SMALL_SET["classes"] * SMALL_SET["clips_per_class"]
        digests.add(dataset.digest)
    assert len(digests) == 1

    context = browser.new_context(viewport={"width": 1800, "height": 1000})  # a fresh browser profile
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    root_url = f"{result.tracking_uri}/#/experiments/{result.experiment_id}"
    # MLflow 3.17.2 routes the experiment root by the browser's "GenAI | Model training" switch (GenAI until
    # switched; the experiment's kind tag is not consulted), so a fresh profile lands on the GenAI overview.
    page.goto(root_url)
    page.wait_for_url("**/overview/**")
    page.goto(f"{result.tracking_uri}/#/experiments")  # the overview's pop-ups cover the switch
    page.get_by_text("Model training", exact=True).first.click()  # once per browser, remembered
    page.wait_for_function("() => (localStorage.getItem('mlflow.workflowType_v1') || '').includes('machine_learning')")
    page.goto(root_url)
    page.wait_for_url(f"**/experiments/{result.experiment_id}/runs?**")
    page.get_by_text(f"sweep_{SHARED_SWEEP}", exact=True).wait_for()
    assert "/overview" not in page.url and "/traces" not in page.url, page.url
    assert page.locator("[role=columnheader][col-id='attributes.`Dataset`']").count() >= 1
    page.locator(".ag-row [col-id='attributes.`Run Name`'] button").first.click()  # expand the parent
    shown = {run.info.run_name: run for run in runs if run.info.run_name in {
        f"sweep_{SHARED_SWEEP}", "normal_concat_s0", "ogm_ge_concat_a0.5_w0-2_s0", "audio_only_concat_s0"}}
    assert len(shown) == 4, sorted(r.info.run_name for r in runs)
    (digest,) = digests
    for name in shown:
        page.get_by_text(name, exact=True).wait_for()
        row_index = page.locator(".ag-row", has=page.get_by_text(name, exact=True)).first.get_attribute("row-index")
        cell = page.locator(f".ag-row[row-index='{row_index}'] [col-id='attributes.`Dataset`']").first
        text = cell.inner_text()
        assert text.split("\n") == [f"avtune:{synth_dataset.name} ({digest})", "Training"], (name, text)
    page.screenshot(path=str(tmp_path / "mlflow_ui_datasets.png"), full_page=True)
    context.close()
