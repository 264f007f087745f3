"""The recipe table (experiments/recipes/official.yaml): every paper spec trains the official recipe, item by
item, or the table names the departure; shapes come from decoding a real clip with each spec's settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.recipes import EXPERIMENTS, ITEMS, compare, effective_recipe, load_recipes, markdown
from orchestrator.synth import synthesize_dataset
from workers.datasets import decode_record, load_records
from workers.specs import load_spec

pytestmark = pytest.mark.timeout(180)

NOT_PAPER = ("demo", "leaderboard", "quick")
PAPER_SPECS = sorted(p.stem for p in EXPERIMENTS.glob("*_*.yaml") if not p.stem.startswith(NOT_PAPER))
OGM_FAMILY_CREMAD = ("ogm_ge_cremad", "agm_cremad", "mmpareto_cremad", "pmr_cremad")
FBANK_KINETICS = ("ogm_ge_kinetics_sounds", "agm_kinetics_sounds", "mmpareto_kinetics_sounds", "pmr_kinetics_sounds",
                  "mla_kinetics_sounds")


@pytest.fixture(scope="module")
def ten_second_clip(tmp_path_factory) -> object:
    """One real generated mp4 of 10 s (the longest clip a paper spec decodes)."""
    root = tmp_path_factory.mktemp("recipes") / "clips"
    synthesize_dataset(root, layout="avtune", classes=2, clips_per_class=3, clip_seconds=10.0, fps=8, height=32,
                       width=32, sample_rate_hz=16000, seed=3)
    records, _ = load_records(root, "avtune", "train")
    return records[0]


def test_every_paper_spec_has_one_recipe_row_and_every_row_a_spec():
    recipes = load_recipes()
    assert sorted(recipes) == PAPER_SPECS
    for name, row in recipes.items():
        assert row["source"], name
        assert set(row["official"]) == set(ITEMS), (name, set(ITEMS) ^ set(row["official"]))
        assert all(entry["ref"] for entry in row["official"].values()), name
        assert set(row.get("departures", {})) <= set(ITEMS), name


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_spec_trains_its_official_recipe_or_names_the_departure(name, ten_second_clip):
    spec = load_spec(EXPERIMENTS / f"{name}.yaml")
    frames, audio = decode_record(ten_second_clip, spec.data.decode)
    # The decoded clip, not only the shape formula: what the encoders receive.
    assert tuple(frames.shape) == (spec.data.decode.decoded_frames, spec.data.decode.frame_height,
                                   spec.data.decode.frame_width, 3)
    assert audio.shape[0] == 1 and bool(audio.isfinite().all())
    effective = effective_recipe(spec, audio_input=tuple(audio.shape[1:]))
    assert effective["audio_input"] == effective_recipe(spec)["audio_input"]
    assert compare(name, load_recipes()[name], effective) == []


def test_official_shapes_and_batches_of_the_done_when(ten_second_clip):
    for name in OGM_FAMILY_CREMAD:
        spec = load_spec(EXPERIMENTS / f"{name}.yaml")
        assert tuple(decode_record(ten_second_clip, spec.data.decode)[1].shape) == (1, 188, 257), name
    for name in FBANK_KINETICS:
        spec = load_spec(EXPERIMENTS / f"{name}.yaml")
        assert spec.data.decode.audio_feature == "fbank", name
        assert tuple(decode_record(ten_second_clip, spec.data.decode)[1].shape) == (1, 1024, 128), name
    recipes = load_recipes()
    for name in PAPER_SPECS:
        spec = load_spec(EXPERIMENTS / f"{name}.yaml")
        official = recipes[name]["official"]["global_batch"]["value"]
        if "global_batch" not in recipes[name].get("departures", {}):
            assert spec.global_batch == official, name
            assert spec.worker_batch * spec.scaling.num_workers == official, name


def test_a_changed_setting_or_a_stale_departure_is_caught():
    name = "ogm_ge_kinetics_sounds"
    row = load_recipes()[name]
    spec = load_spec(EXPERIMENTS / f"{name}.yaml", ["train.global_batch_size=256"])  # 4 workers x 64
    problems = compare(name, row, effective_recipe(spec))
    assert len(problems) == 2 and all("global_batch" in p or "eval_batch" in p for p in problems), problems
    spec = load_spec(EXPERIMENTS / f"{name}.yaml", ["data.decode.audio_feature=spectrogram"])
    assert any("front_end" in p for p in compare(name, row, effective_recipe(spec)))
    stale = {**row, "departures": {**row["departures"], "epochs": "claimed but not true"}}
    assert compare(name, stale, effective_recipe(load_spec(EXPERIMENTS / f"{name}.yaml"))) == [
        f"{name}: epochs matches the official 100 but the row lists a departure"]


def test_readme_shows_the_generated_recipe_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown() in readme, "README's recipe table is stale: python -m orchestrator.recipes"
