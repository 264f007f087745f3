"""Hostile and careless inputs (issue 16): each is refused early with the field or file named, and
nothing the user owns is overwritten."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.specs import SpecError, load_spec


def plant_cremad(root: Path) -> dict[Path, bytes]:
    """A user's CREMA-D folder: real file names the generator would also write."""
    files = {root / "train.csv": b"1001_IEO_NEU_XX,NEU\n", root / "AudioWAV" / "1001_IEO_NEU_XX.wav": b"RIFF-real-audio"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_generated_data_never_overwrites_a_folder_the_generator_did_not_make(tmp_path):
    from orchestrator.synth import synthesize_dataset
    from orchestrator.training import run_training

    root = tmp_path / "cremad"
    planted = plant_cremad(root)
    # data.root without `source: dataset`: the source defaults to generated.
    spec = load_spec({"data": {"root": str(root), "layout": "cremad"}, "storage": {"runs_dir": str(tmp_path / "runs")}})
    with pytest.raises(SpecError, match=r"data.root: .*cremad is not empty and was not made by the clip generator.*"
                                        r"set data.source: dataset"):
        run_training(spec)
    with pytest.raises(FileExistsError, match="not made by the clip generator"):
        synthesize_dataset(root, layout="cremad", classes=2, clips_per_class=3, clip_seconds=0.5, fps=4, height=16,
                           width=16)
    assert {p: p.read_bytes() for p in planted} == planted
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["AudioWAV", "AudioWAV/1001_IEO_NEU_XX.wav",
                                                                             "train.csv"]
    assert not (tmp_path / "runs").exists()


def test_the_generator_rewrites_only_its_own_folders(tmp_path):
    from orchestrator.synth import GENERATOR_MARKER, synthesize_dataset

    small = dict(layout="avtune", classes=2, clips_per_class=3, clip_seconds=0.5, fps=4, height=16, width=16)
    root = tmp_path / "gen"
    synthesize_dataset(root, **small)  # a new folder
    assert (root / GENERATOR_MARKER).is_file() and (root / "card.json").is_file()
    (root / "card.json").unlink()  # an interrupted run: no card, the marker stays
    synthesize_dataset(root, **small)
    assert (root / "card.json").is_file()
    (root / GENERATOR_MARKER).unlink()  # a complete set from before the marker: its card says it is generated
    synthesize_dataset(root, **small)
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize_dataset(empty, **small)
    assert (empty / "card.json").is_file()


BILLION_LAUGHS = """name: laughs
a: &a ["ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha", "ha"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
train: {epochs: 2}
"""


@pytest.mark.parametrize("text, match", [
    (BILLION_LAUGHS, r"line 2: YAML anchors and aliases \(&a / \*a\) are not allowed"),
    ("train: &t {epochs: 2}\nsearch: {space: {train.epochs: *t}}\n", r"line 1: YAML anchors and aliases"),
    ("name: x\ntrain:\n  epochs: 2\n  epochs: 5\n", r"line 4: duplicate key 'epochs' \(first at line 3\)"),
    ("name: x\nname: y\n", r"line 2: duplicate key 'name' \(first at line 1\)"),
])
def test_yaml_aliases_and_duplicate_keys_are_refused_naming_the_line(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=rf"spec {path}, {match}"):
        load_spec(path)


def test_overrides_are_parsed_by_the_same_strict_loader():
    with pytest.raises(SpecError, match=r"override 'train.epochs=\{a: 1, a: 2\}': line 1: duplicate key 'a'"):
        load_spec({}, ["train.epochs={a: 1, a: 2}"])
    assert load_spec({}, ["train.epochs=4"]).train.epochs == 4


@pytest.mark.parametrize("spec, match", [
    ({"train": {"learning_rate": float("nan")}}, r"train.learning_rate: Input should be a finite number"),
    ({"train": {"weight_decay": float("inf")}}, r"train.weight_decay: Input should be a finite number"),
    ({"search": {"compare": ["normal"], "trial_cpus": float("inf")}}, r"search.trial_cpus: Input should be a finite number"),
    ({"train": {"seed": -1}}, r"train.seed: Input should be greater than or equal to 0"),
    ({"train": {"seed": 2**64}}, r"train.seed: Input should be less than or equal to 4294967295"),
    ({"search": {"seeds": [0, 2**40]}}, r"search.seeds.1: Input should be less than or equal to 4294967295"),
    ({"search": {"compare": ["normal"], "metric": "accc"}}, r"search.metric: Input should be 'acc', 'loss'"),
    ({"tracking": {"experiment": "../../escape"}}, r"tracking.experiment: String should match pattern"),
    ({"method": {"name": "avid", "config": "Cros-N1024"}}, r"method.config: AVID config 'Cros-N1024': part 1 'Cros'"),
    ({"method": {"name": "cma", "config": "Cross-N1024"}}, r"method.config: 'Cross-N1024' is an AVID criterion"),
])
def test_late_spec_errors_are_found_at_validation(spec, match):
    with pytest.raises(SpecError, match=match):
        load_spec(spec)


def test_search_values_and_paths_are_checked_before_data_or_runs(tmp_path):
    from orchestrator.sweep import run_sweep

    base = {"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
            "storage": {"runs_dir": str(tmp_path / "runs")}}
    for search, match in (
        ({"space": {"train.learnin_rate": {"grid": [0.1]}}}, r"train.learnin_rate: unknown field"),
        ({"space": {"method.alpha": {"choice": [0.5, -1]}}, "searcher": "random"}, r"method.alpha=-1: method.alpha"),
        ({"space": {"train.learning_rate": {"loguniform": [1e-4, 100]}}, "searcher": "random"},
         r"train.learning_rate=100.0: train.learning_rate: Input should be less than or equal to 10"),
    ):
        with pytest.raises(SpecError, match=match):
            run_sweep(load_spec({**base, "search": search}))
    assert not (tmp_path / "runs").exists(), "no clips generated, nothing logged"
