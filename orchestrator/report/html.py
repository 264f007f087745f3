"""The report's page: ``build_report`` reads the sweep, writes the plots, ``report.html``
(self-contained, images embedded), the summary CSV and ``findings.json``, and logs them to MLflow.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.report.analysis import (CONFIG_SUMMARY_FILE, REPORT_DIR, SUMMARY_FILE, TESTS_FILE, gblend_finding, SweepData, config_means, findings, gblend_weights,
                                          gblend_weights_source, imbalance_summary, load_sweep, log_sweep_imbalance,
                                          ogm_scores_note, resolve_sweep, utilisation)
from orchestrator.report.comparisons import (config_summary, find_test, format_interval, format_p, report_tests,
                                             tests_table, verdict, weak_modality)
from orchestrator.report.references import CEILING, KINDS, format_ratio, reference_summary
from orchestrator.report.leaderboard import LEADERBOARD_FILE, LEADERBOARD_NUMBERS_FILE, display_rows, leaderboard
from orchestrator.folders import claim_report_folder
from orchestrator.runs import csv_safe
from orchestrator.tracking import redact_uri
from orchestrator.report.plots import (SEEDS_DRAWN, plot_ablation, plot_intervals, plot_gap, plot_gblend,
                                       plot_modality_curves, plot_ogm_coefficients, plot_shapley, plot_utilisation)


# Trials the page lists row by row; beyond, they are in imbalance_summary.csv only (`trials_section`).
TRIALS_SHOWN = 300
TABLE_COLUMNS = ["run_name", "status", "method", "alpha", "window", "fusion", "seed", "epochs", "acc", "acc_audio",
                 "acc_visual", "gap", "util_audio", "util_visual", "shapley_audio", "shapley_visual", "balance"]


def _html_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            v = row.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                text = ""
            elif isinstance(v, (float, np.floating)):
                text = f"{v:g}" if c == "alpha" else f"{v:.3f}"
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{html.escape(path.stem)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)} '
            f'(<code>{html.escape(path.name)}</code>)</figcaption></figure>')


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0}td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}
li{margin:.4em 0}code{background:#f4f4f4;padding:0 3px}.meta{color:#666;font-size:13px}"""


READING_INTERVALS = (
    "How to read: [low, high] is a 95% t-interval of the mean over seeds, cut to [0, 1] (n seeds; none with one "
    "seed or when all seeds agree). 'vs normal' is the paired difference from the normal joint model of the same "
    "group on the same seeds and validation clips, with its 95% interval, its p-value and its Holm-adjusted p-value "
    "over all of the report's comparisons with normal. The test treats each trained model (seed) as one "
    "observation and the clips as a second source of noise (a paired t over seeds when per-clip predictions are "
    "missing); it needs at least 3 common seeds ('no verdict' otherwise). The verdict comes from the adjusted "
    "p-value: 'not distinguishable' from normal on this data unless it is at most 0.05.")


READING_LEADERBOARD = (
    "One row per configuration, best joint accuracy first: validation accuracy of the joint prediction and of each "
    "head (AVID / CMA: linear probes on frozen features), mean ± half-width of its 95% t-interval over seeds; "
    "'weak util' is the weak modality's head accuracy over its uni-modal baseline's (1 = as good as trained "
    "alone); 'balance' is the Shapley balance 1 - |phi_a - phi_v| / (|phi_a| + |phi_v|) (1 = both modalities add "
    "the same); 's/epoch' is training seconds per epoch on this machine; 'acc - normal' is the paired difference "
    "from the normal joint model on the same seeds and validation clips ('on k seeds' when fewer than the row's) "
    "with its 95% interval, p-value and Holm-adjusted p-value over the report's comparisons with normal; the "
    "verdict comes from the adjusted one ('no verdict' under 3 seeds); 'weak head - normal' is the same for the "
    "weak modality's head (the one a paired test finds weaker in the normal model; empty when neither is); "
    "'headroom recovered vs ensemble / ceiling' is (acc - normal) / (reference - normal) over the seeds both share, "
    "with its 95% Fieller interval (see References).")


READING_REFERENCES = (
    "References for joint accuracy, each against the normal joint model of the group. The uni-modal ensemble is "
    "late fusion of the audio_only and visual_only runs of the same seed: the mean of their class probabilities "
    "on each validation clip (final models), its argmax scored like a trained model; mean and 95% t-interval over "
    "seeds, and 'ensemble - normal' is paired on seeds and clips like any configuration. The ceiling (generated "
    "clips only) is the best accuracy any recogniser can reach on these validation clips from what they carry "
    "(the generator's card); 'ceiling - normal' is a one-sample t over normal's seeds. Both tests form one family, "
    "Holm-adjusted. 'Headroom recovered' = (acc - normal) / (reference - normal), seed by seed on the seeds both "
    "share: mean gain over mean headroom, with its 95% Fieller interval over seeds (Fieller 1954; conditional on "
    "these validation clips). 1 = reaches the reference, 0 = no better than normal, below 0 = worse; "
    "'[unbounded]' when the headroom itself is not distinguishable from 0 over the seeds; 'no headroom' when "
    "normal is at or above the reference on average.")


def references_section(refs: pd.DataFrame, tests: pd.DataFrame, summary: pd.DataFrame | None) -> str:
    """The page's references: per group normal, the ensemble and the ceiling with their tests against
    normal, then per joint configuration the share of the headroom it recovers against each."""
    rows = []
    for _, r in refs.iterrows():
        ensemble = find_test(tests, "headroom", r["group"], r["ensemble_config"], "acc") if r["ensemble_config"] else None
        ceiling = find_test(tests, "headroom", r["group"], CEILING, "acc")
        rows.append({**({"group": r["group"]} if refs["group"].astype(bool).any() else {}),
                     "normal": format_interval(r["normal"], r["normal_low"], r["normal_high"]),
                     "ensemble (audio_only + visual_only)": format_interval(r["ensemble"], r["ensemble_low"],
                                                                            r["ensemble_high"])
                     or f"none: {r['ensemble_missing']}",
                     "ensemble - normal": test_cell(ensemble),
                     "ceiling": "" if pd.isna(r["ceiling"]) else f"{r['ceiling']:.3f}",
                     "ceiling - normal": test_cell(ceiling)})
    table = pd.DataFrame(rows)
    parts = ["<h2 id='references'>References: uni-modal ensemble, ceiling and headroom recovered</h2>",
             _html_table(table, list(table.columns))]
    columns = [f"headroom recovered vs {kind}" for kind in KINDS]
    if summary is not None and "headroom_ensemble_status" in summary:
        joint = summary[summary[[f"headroom_{kind}_status" for kind in KINDS]].notna().any(axis=1)]
        if not joint.empty:
            shown = pd.DataFrame([{"config": r["config"], "acc": format_interval(r["acc"], r["acc_low"], r["acc_high"]),
                                   **{f"headroom recovered vs {kind}": format_ratio(
                                       r[f"headroom_{kind}"], r[f"headroom_{kind}_low"], r[f"headroom_{kind}_high"],
                                       r[f"headroom_{kind}_status"]) for kind in KINDS}}
                                  for _, r in joint.iterrows()])
            parts.append(_html_table(shown, ["config", "acc", *columns]))
    parts.append(f"<p class='meta'>{html.escape(READING_REFERENCES)}</p>")
    return "".join(parts)


def test_cell(test) -> str:
    """"+0.043 [+0.020, +0.066] Holm p=0.01: higher"; "" without a test."""
    if test is None:
        return ""
    if not test.testable:
        return f"{test.difference:+.3f}: no verdict"
    return (f"{test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}] p={format_p(test.p_value)} "
            f"Holm p={format_p(test.p_adjusted)}: {verdict(test)}")


def comparison_cell(r: pd.Series, key: str) -> str:
    """"+0.052 [+0.021, +0.083] p=0.002 Holm p=0.04: higher" (the page's and the CLI's configurations table)."""
    d, low, high = r[f"d_{key}"], r[f"d_{key}_low"], r[f"d_{key}_high"]
    interval = "" if pd.isna(low) else f" [{low:+.3f}, {high:+.3f}] p={format_p(r[f'p_{key}'])} " \
                                       f"Holm p={format_p(r[f'p_holm_{key}'])}"
    return f"{d:+.3f}{interval}: {r[f'vs_normal_{key}']}"


def _interval_table(summary: pd.DataFrame) -> str:
    rows = []
    for _, r in summary.iterrows():
        row = {"config": r["config"], "n": str(int(r["n"]))}
        for key in ("acc", "acc_audio", "acc_visual"):
            row[key] = format_interval(r[key], r[f"{key}_low"], r[f"{key}_high"])
            if f"d_{key}" in r and not pd.isna(r.get(f"d_{key}")):
                row[f"{key} vs normal"] = comparison_cell(r, key)
            else:
                row[f"{key} vs normal"] = ""
        rows.append(row)
    columns = ["config", "n", "acc", "acc_audio", "acc_visual", "acc vs normal", "acc_audio vs normal",
               "acc_visual vs normal"]
    return _html_table(pd.DataFrame(rows, columns=columns), columns)


def trials_section(table: pd.DataFrame) -> str:
    """The per-trial table, or beyond TRIALS_SHOWN rows a pointer to its CSV (every row, beside the page): a
    page of thousands of rows is slow to open and nobody reads it; the means and intervals below summarise it."""
    if len(table) <= TRIALS_SHOWN:
        return "<h2>Trials</h2>" + _html_table(table, TABLE_COLUMNS)
    return (f"<h2>Trials</h2><p>{len(table)} trials: one row each in <a href='{SUMMARY_FILE}'><code>{SUMMARY_FILE}"
            f"</code></a> beside this page (also on the sweep's parent run under <code>{REPORT_DIR}/</code>); the "
            "page shows the per-configuration means and intervals below.</p>")


def render_html(sweep: SweepData, table: pd.DataFrame, definition: str, items: list[dict[str, Any]],
                figures: list[tuple[Path, str]], weights: dict[str, float] | None,
                summary: pd.DataFrame | None = None, board: pd.DataFrame | None = None,
                references: str = "") -> str:
    """The page; `references`: the references section's HTML (`references_section`), "" without one."""
    title = f"avtune imbalance report: {sweep.experiment_name}"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>sweep parent run <code>{sweep.parent_run_id}</code>, {len(table)} trials, "
             f"tracking URI <code>{html.escape(redact_uri(sweep.tracking_uri))}</code>, generated {stamp}. "
             "All accuracies are on the validation split at the last epoch; numbers in the findings are means over seeds.</p>",
             "<h2>Findings</h2><ul>"]
    parts += [f"<li id='{html.escape(i['id'])}'>{html.escape(i['text'])}</li>" for i in items]
    if not items:
        parts.append("<li>No joint audio-visual trial with per-modality accuracies in this sweep.</li>")
    parts.append("</ul>")
    if board is not None and not board.empty:
        shown = display_rows(board)
        parts.append("<h2 id='leaderboard'>Leaderboard</h2>" + _html_table(shown, list(shown.columns))
                     + f"<p class='meta'>{html.escape(READING_LEADERBOARD)}</p>")
    parts.append(references)
    parts.append("<h2>Definitions</h2><ul>"
                 "<li><b>utilisation</b> util_m = accuracy of modality m's head inside the joint model / accuracy of the "
                 "matching uni-modal baseline (same seed when the sweep has it, else mean over seeds), per epoch and final.</li>"
                 f"<li><b>balance</b> = {html.escape(definition)}.</li>"
                 "<li><b>Shapley values</b>: two-player Shapley values of joint accuracy, a modality masked by zero input.</li>"
                 "<li><b>dominant modality</b>: the one whose head is more accurate in the normal joint model by a paired "
                 "test of its audio head against its visual head (Holm-adjusted over the report's groups); when the "
                 "test does not distinguish them, neither is weak.</li></ul>")
    parts.append(trials_section(table))
    means = config_means(table)
    if (means["n"] > 1).any():
        parts.append("<h3>Means over seeds</h3>" + _html_table(
            means, ["config", "n", "acc", "acc_audio", "acc_visual", "gap", "util_audio", "util_visual", "balance"]))
    if summary is not None and not summary.empty:
        parts.append("<h2 id='configurations'>Configurations: means with 95% intervals, paired against normal</h2>"
                     + _interval_table(summary) + f"<p class='meta'>{html.escape(READING_INTERVALS)}</p>")
    if weights:
        parts.append("<p>G-Blend weights: " + ", ".join(f"{k} {v:.3f}" for k, v in weights.items()) + "</p>")
    parts.append("<h2>Plots</h2>")
    parts += [_img(path, caption) for path, caption in figures]
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step: a reader (the MLflow UI, a browser) never sees half a report. A symlink planted
    under either name is never followed: the partial file is created exclusively ("x": O_EXCL, which refuses a
    link) and the rename replaces the link itself, not what it points to."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    with open(partial, "x", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)


def default_report_dir(runs_dir: Path, experiment: str, sweep_run_id: str) -> Path:
    return Path(runs_dir) / "reports" / f"{experiment}-{sweep_run_id[:8]}"


def build_report(experiment: str, sweep_run_id: str | None = None, tracking_uri: str | None = None,
                 out_dir: Path | None = None, log_to_mlflow: bool = True) -> Path:
    """Write the imbalance report of a sweep (default: the experiment's latest) and return the
    path of ``report.html``.

    Reads MLflow only (`tracking_uri` default: MLFLOW_TRACKING_URI, else ``runs/mlflow.db``).
    Writes PNG plots, ``report.html`` (self-contained: images embedded),
    ``imbalance_summary.csv`` and ``findings.json`` into `out_dir` (default
    ``runs/reports/<experiment>-<run id prefix>``). With `log_to_mlflow`, also logs utilisation
    into the child runs and the summary on the parent (:func:`log_sweep_imbalance`), and the
    report's files as artifacts under ``report/`` of the sweep's parent run.
    """
    from orchestrator.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, Path("runs")))
    sweep_run_id = resolve_sweep(client, experiment, sweep_run_id)
    out = Path(out_dir) if out_dir is not None else default_report_dir(Path("runs"), experiment, sweep_run_id)
    claim_report_folder(out)  # first: never a user's folder, whose files would be deleted or replaced
    sweep = load_sweep(client, sweep_run_id)
    util, per_epoch = utilisation(sweep)
    table, definition = imbalance_summary(sweep, util)
    references = sweep.references()
    tests = report_tests(table, sweep.predictions, references)
    summary = config_summary(table, sweep.predictions, tests, references)
    board = leaderboard(sweep, table, summary)
    if log_to_mlflow:
        log_sweep_imbalance(client, sweep_run_id, sweep, summary, board, tests, references, (util, per_epoch))
    items = findings(table, sweep.predictions, tests, references)
    weak = weak_modality(tests)
    if (blend := gblend_finding(sweep, table)) is not None:
        items.append(blend)

    weights = gblend_weights(sweep)
    scores_note = ogm_scores_note(sweep)
    planned = [
        (lambda p: plot_intervals(summary, p), "configurations.png",
         "final acc / acc_audio / acc_visual per configuration: mean over seeds with its 95% t-interval"),
        (lambda p: plot_modality_curves(sweep, p), "acc_per_modality.png",
         "acc_audio / acc_visual vs epoch per method: per configuration the mean over seeds with its 95% band (seeds as "
         f"thin lines up to {SEEDS_DRAWN}); dashed: uni-modal baselines"),
        (lambda p: plot_gap(sweep, p), "gap.png", "acc_audio - acc_visual vs epoch per configuration (mean over seeds, 95% band)"),
        (lambda p: plot_utilisation(sweep, per_epoch, p), "utilisation.png", "utilisation vs epoch per configuration (mean over seeds, 95% band; 1 = as good as alone)"),
        (lambda p: plot_ogm_coefficients(sweep, p), "ogm_coefficients.png", "OGM k_audio / k_visual vs epoch for each alpha (computed every epoch, applied only inside the modulation window)"),
        (lambda p: plot_ablation(table, "alpha", p, weak), "ablation_alpha.png",
         "final joint and weak-modality accuracy vs alpha (dashed: normal)" + scores_note),
        (lambda p: plot_ablation(table, "window", p, weak), "ablation_window.png",
         "final joint and weak-modality accuracy vs modulation window (dashed: normal)" + scores_note),
        (lambda p: plot_shapley(table, p), "shapley.png", "final Shapley values of joint accuracy per configuration (mean over seeds, 95% interval)"),
        (lambda p: plot_gblend(weights, p), "gblend_weights.png",
         "G-Blend loss weights" + (f" (source: {source})" if (source := gblend_weights_source(sweep)) else "")),
    ]
    figures = []
    for plot, name, caption in planned:
        (out / name).unlink(missing_ok=True)  # a plot that no longer applies must not linger from an older report
        path = plot(out / name)
        if path is not None:
            figures.append((path, caption))
    _write_atomic(out / SUMMARY_FILE, csv_safe(table).to_csv(index=False))
    _write_atomic(out / CONFIG_SUMMARY_FILE, summary.to_csv(index=False))
    _write_atomic(out / TESTS_FILE, tests_table(tests).to_csv(index=False))
    _write_atomic(out / "findings.json", json.dumps(
        {"parent_run_id": sweep_run_id, "experiment": experiment, "balance_definition": definition, "findings": items},
        indent=2, default=str))
    report = out / "report.html"
    _write_atomic(out / LEADERBOARD_NUMBERS_FILE, board.to_csv(index=False))
    _write_atomic(out / LEADERBOARD_FILE, display_rows(board).to_csv(index=False))
    refs = reference_summary(table, references)
    section = references_section(refs, tests, summary) if not refs.empty else ""
    _write_atomic(report, render_html(sweep, table, definition, items, figures, weights, summary, board, section))
    if log_to_mlflow:
        for path in [report, out / SUMMARY_FILE, out / CONFIG_SUMMARY_FILE, out / TESTS_FILE, out / LEADERBOARD_FILE,
                     out / LEADERBOARD_NUMBERS_FILE, out / "findings.json", *(p for p, _ in figures)]:
            client.log_artifact(sweep_run_id, str(path), artifact_path=REPORT_DIR)
    return report.resolve()
