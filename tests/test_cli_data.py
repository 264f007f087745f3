"""`avtune data synth|inspect` through typer's CliRunner, on real generated files."""
from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli_data import data_app

runner = CliRunner()


def _invoke(*args: str):
    # rich reads COLUMNS on every print; 200 keeps table rows on one line
    return runner.invoke(data_app, list(args), terminal_width=200, env={"COLUMNS": "200"})


@pytest.mark.parametrize("command", [[], ["synth"], ["inspect"]])
def test_help(command):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command == ["synth"]:
        for option in ("--out", "--layout", "--classes", "--clips-per-class", "--clip-seconds", "--fps",
                       "--height", "--width", "--sample-rate-hz", "--audio-informative",
                       "--visual-informative", "--seed"):
            assert option in result.output
    if command == ["inspect"]:
        assert "--layout" in result.output


def test_synth_writes_the_dataset_and_prints_the_card(tmp_path):
    out = tmp_path / "set"
    result = _invoke("synth", "--out", str(out), "--layout", "ave", "--classes", "3", "--clips-per-class", "4",
                     "--clip-seconds", "0.5", "--fps", "8", "--height", "32", "--width", "32",
                     "--audio-informative", "0.75", "--visual-informative", "0.5", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert "wrote 12 clips (3 classes, ave layout)" in result.output
    card = json.loads((out / "card.json").read_text())
    assert card["layout"] == "ave" and card["seed"] == 4
    assert card["params"]["audio_informative"] == 0.75 and card["params"]["height"] == 32
    for name in ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt", "manifest.csv"):
        assert (out / name).is_file()
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all((out / r["path"]).is_file() for r in rows)
    # the card table: realised audio share on train (2 per class -> 6 clips, round(0.75 * 6) = 5)
    assert "0.833" in result.output


def test_inspect_prints_counts_streams_and_card(synth_dataset):
    result = _invoke("inspect", str(synth_dataset))
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("class_00", "class_01", "class_02", "h264", "aac", "16000 Hz", "32x32", "8 fps",
                 "durations:", "best audio acc"):
        assert text in out, text
    # per-class row: 6 train, 1 val, 1 test, 8 total
    assert any(line.split("│")[1:6] == [" class_01 ", "     6 ", "   1 ", "    1 ", "     8 "]
               for line in out.splitlines() if "class_01" in line)


def test_inspect_json_and_layouts(synth_layouts):
    result = _invoke("inspect", str(synth_layouts["cremad"]), "--layout", "cremad", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["class_names"] == ["NEU", "HAP", "SAD"]
    assert summary["totals"] == {"train": 6, "val": 3, "test": 3, "all": 12}
    types = {(s["type"], s["extension"], s["codec"]) for s in summary["media"]["streams"]}
    assert types == {("video", ".flv", "h264"), ("audio", ".wav", "pcm_s16le")}


def test_inspect_reports_bad_rows(tmp_path, synth_layouts):
    import shutil

    root = tmp_path / "ks"
    shutil.copytree(synth_layouts["kinetics-sounds"], root)
    with open(root / "my_test.txt", "a") as handle:
        handle.write("abc_000001_000011,1,9\n")
    result = _invoke("inspect", str(root), "--layout", "kinetics-sounds")
    assert result.exit_code == 1, result.output  # problems found (issue 16 item 10)
    assert "1 problem(s)" in result.output and "unknown label index 9" in result.output


def test_bad_input_exits_with_a_message(tmp_path, synth_dataset):
    result = _invoke("synth", "--out", str(tmp_path / "x"), "--audio-informative", "1.5")
    assert result.exit_code == 2
    assert "audio_informative" in result.output and "[0, 1]" in result.output
    result = _invoke("synth", "--out", str(tmp_path / "x"), "--layout", "kinetics")
    assert result.exit_code == 2
    result = _invoke("inspect", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _invoke("inspect", str(synth_dataset), "--layout", "cremad")
    assert result.exit_code == 2 and "train.csv" in result.output and "split list not found" in result.output


# ---- clear messages (issue 16 item 10): a bad card.json, and problems found by `inspect` --------------


def _invoke_narrow(*args: str, width: int = 40):
    # narrower than any tmp path: nothing that names a file may be wrapped, folded or cut
    return runner.invoke(data_app, list(args), terminal_width=width, env={"COLUMNS": str(width)})


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    raise AssertionError("text is valid JSON")


def _drop(card: dict, *keys: str) -> str:
    *parents, last = keys
    node = card
    for key in parents:
        node = node[key]
    del node[last]
    return json.dumps(card, indent=2)


# name -> (damage(card text, card) -> new text, expected message after "card.json at <path>: ")
CARD_DAMAGE = {
    "truncated": (lambda text, card: text[: len(text) // 2], lambda text: _json_error(text)),
    "junk": (lambda text, card: "\x00\x01 not json\n", lambda text: _json_error(text)),
    "empty": (lambda text, card: "", lambda text: "empty file (regenerate the dataset with `avtune data synth`)"),
    "array": (lambda text, card: "[1, 2]\n", lambda text: "top level is an array, expected a JSON object"),
    "no_params": (lambda text, card: _drop(card, "params"), lambda text: "missing key 'params'"),
    "no_informative": (lambda text, card: _drop(card, "informative_realised"),
                       lambda text: "missing key 'informative_realised'"),
    "params_not_object": (lambda text, card: json.dumps({**card, "params": []}),
                          lambda text: "key 'params' is an array, expected a JSON object"),
    "nested_key": (lambda text, card: _drop(card, "best_achievable_accuracy", "val", "audio_visual"),
                   lambda text: "missing key 'best_achievable_accuracy.val.audio_visual'"),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["tables", "json"])
@pytest.mark.parametrize("damage", list(CARD_DAMAGE))
def test_inspect_bad_card_exits_2_naming_the_file(tmp_path, synth_layouts, damage, as_json):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(synth_layouts["avtune"], root)
    card_file = root / "card.json"
    text = card_file.read_text()
    make, expected = CARD_DAMAGE[damage]
    card_file.write_text(make(text, json.loads(text)))
    new_text = card_file.read_text()

    result = _invoke_narrow("inspect", str(root), *(["--json"] if as_json else []))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no KeyError / JSONDecodeError
    assert "Traceback" not in result.output
    message = f"error: card.json at {card_file}: {expected(new_text)}"
    assert message in result.output.splitlines(), result.output  # the whole message, on one line


def test_inspect_problems_exit_1_with_full_paths(tmp_path, synth_layouts):
    import shutil

    root = (tmp_path / "a_folder_with_a_long_name_so_paths_are_wider_than_the_console" / "set").resolve()
    shutil.copytree(synth_layouts["avtune"], root)
    with open(root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    broken = root / rows[0]["path"]
    broken.write_bytes(b"\x00junk, not a video" * 64)  # bad media
    with open(root / "manifest.csv", "a") as handle:  # a manifest error on line 14 (header + 12 rows + 1)
        handle.write("../outside.mp4,class_00,train,\n")

    result = _invoke_narrow("inspect", str(root))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert "2 problem(s):" in lines, result.output
    # each problem on one line that starts with the full, intact path
    assert any(line.startswith(f"{broken}: ") and len(line) > len(f"{broken}: ") for line in lines), result.output
    assert f"{root / 'manifest.csv'}, line 14: video path '../outside.mp4' contains '..'" in lines, result.output
    assert "generation parameters:" in result.output  # the card is still shown

    result = _invoke_narrow("inspect", str(root), "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output)
    assert [path for path, _ in summary["media"]["errors"]] == [str(broken)]
    assert summary["problems"] == [[f"{root / 'manifest.csv'}, line 14", "video path '../outside.mp4' contains '..'"]]

    # the clean set still exits 0
    result = _invoke_narrow("inspect", str(synth_layouts["avtune"]))
    assert result.exit_code == 0, result.output
