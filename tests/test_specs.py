"""Spec validation: good specs load, every malformed one is refused with an error naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.specs import ExperimentSpec, SpecError, apply_overrides, flatten, load_spec

EXPERIMENTS = sorted(Path(__file__).resolve().parents[1].joinpath("experiments").glob("*.yaml"))


def test_defaults_validate_and_run_on_a_laptop():
    spec = ExperimentSpec()
    assert spec.method.name == "normal"
    assert spec.scaling.num_workers == 1 and not spec.scaling.use_gpu
    assert spec.data.source == "generated"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_spec_loads(path):
    spec = load_spec(path)
    assert spec.name


def test_overrides_are_validated_like_the_file():
    spec = load_spec({"name": "x"}, ["model.fusion=film", "method.name=ogm_ge", "method.alpha=0.3", "train.epochs=5"])
    assert spec.model.fusion == "film"
    assert spec.method.alpha == pytest.approx(0.3)
    with pytest.raises(SpecError, match=r"model\.fusion"):
        load_spec({}, ["model.fusion=avg"])


def test_override_does_not_mutate_input():
    data = {"model": {"fusion": "sum"}}
    apply_overrides(data, ["model.fusion=film"])
    assert data["model"]["fusion"] == "sum"


def test_flatten_gives_dotted_params():
    flat = flatten(ExperimentSpec().model_dump(mode="json"))
    assert flat["model.fusion"] == "concat"
    assert flat["train.epochs"] == 3
    assert isinstance(flat["data.decode.normalize_mean"], str)


# (case id, spec mapping or raw YAML text, overrides, text the error must contain)
BAD_SPECS = [
    ("unknown top field", {"nmae": "x"}, [], "nmae: unknown field"),
    ("unknown nested field", {"train": {"epoch": 3}}, [], "train.epoch: unknown field"),
    ("epochs wrong type", {"train": {"epochs": "many"}}, [], "train.epochs"),
    ("negative epochs", {"train": {"epochs": -1}}, [], "train.epochs"),
    ("zero epochs", {"train": {"epochs": 0}}, [], "train.epochs"),
    ("zero batch", {"train": {"global_batch_size": 0}}, [], "train.global_batch_size"),
    ("zero worker batch", {"train": {"batch_size_per_worker": 0}}, [], "train.batch_size_per_worker"),
    ("bare batch_size", {"train": {"batch_size": 16}}, [], "batch_size is ambiguous over several workers"),
    ("both batch fields", {"train": {"global_batch_size": 16, "batch_size_per_worker": 8}}, [],
     "global_batch_size or batch_size_per_worker, not both"),
    ("global batch not divisible", {"train": {"global_batch_size": 64}, "scaling": {"num_workers": 3}}, [],
     "train.global_batch_size 64 does not divide over scaling.num_workers 3"),
    ("default batch not divisible", {"scaling": {"num_workers": 3}}, [], "does not divide over scaling.num_workers 3"),
    ("warm-up longer than the run", {"train": {"epochs": 3, "warmup_epochs": 4}}, [], "warmup_epochs 4.0 is longer"),
    ("unknown schedule", {"train": {"lr_schedule": "poly"}}, [], "train.lr_schedule"),
    ("negative lr", {"train": {"learning_rate": -0.1}}, [], "train.learning_rate"),
    ("unknown optimizer", {"train": {"optimizer": "rmsprop"}}, [], "train.optimizer"),
    ("momentum one", {"train": {"momentum": 1.0}}, [], "train.momentum"),
    ("decay ratio zero", {"train": {"lr_decay_ratio": 0}}, [], "train.lr_decay_ratio"),
    ("unknown method", {"method": {"name": "ogmx"}}, [], "method"),
    ("method without name", {"method": {"alpha": 0.3}}, [], "method"),
    ("alpha zero", {"method": {"name": "ogm_ge", "alpha": 0}}, [], "method.alpha"),
    ("alpha negative", {"method": {"name": "ogm", "alpha": -1}}, [], "method.alpha"),
    ("alpha string", {"method": {"name": "ogm", "alpha": "big"}}, [], "method.alpha"),
    ("window reversed", {"method": {"name": "ogm_ge", "modulation_starts": 5, "modulation_ends": 2}}, [], "modulation_ends"),
    ("window empty", {"method": {"name": "ogm_ge", "modulation_starts": 2, "modulation_ends": 2}}, [], "modulation_ends"),
    ("window starts negative", {"method": {"name": "ogm_ge", "modulation_starts": -1}}, [], "method.modulation_starts"),
    ("window outside epochs", {"train": {"epochs": 3}, "method": {"name": "ogm_ge", "modulation_starts": 5, "modulation_ends": 9}}, [], "modulation_starts"),
    ("unknown fusion", {"model": {"fusion": "avg"}}, [], "model.fusion"),
    ("unknown audio arch", {"model": {"audio_arch": "vit"}}, [], "model.audio_arch"),
    ("width zero", {"model": {"width": 0}}, [], "model.width"),
    ("gblend unknown mode", {"method": {"name": "gblend", "mode": "sometimes"}}, [], "method.mode"),
    ("gblend negative weight", {"method": {"name": "gblend", "weights": {"audio": -1, "visual": 1, "joint": 1}}}, [], "method.weights"),
    ("gblend zero weights", {"method": {"name": "gblend", "weights": {"audio": 0, "visual": 0, "joint": 0}}}, [], "weights"),
    ("drop pathway above one", {"method": {"name": "avslowfast", "drop_pathway_rate": 1.5}}, [], "method.drop_pathway_rate"),
    ("avid field on ogm", {"method": {"name": "ogm", "embedding_dim": 64}}, [], "method.embedding_dim: unknown field"),
    ("dataset without root", {"data": {"source": "dataset", "layout": "cremad"}}, [], "data.root"),
    ("unknown layout", {"data": {"layout": "audioset"}}, [], "data.layout"),
    ("unknown source", {"data": {"source": "youtube"}}, [], "data.source"),
    ("bad on_bad_media", {"data": {"on_bad_media": "ignore"}}, [], "data.on_bad_media"),
    ("informative above one", {"data": {"synth": {"audio_informative": 1.2}}}, [], "data.synth.audio_informative"),
    ("two classes minimum", {"data": {"synth": {"classes": 1}}}, [], "data.synth.classes"),
    ("zero frames", {"data": {"decode": {"num_frames": 0}}}, [], "data.decode.num_frames"),
    ("zero workers", {"scaling": {"num_workers": 0}}, [], "scaling.num_workers"),
    ("cpus negative", {"scaling": {"cpus_per_worker": -2}}, [], "scaling.cpus_per_worker"),
    ("name with slash", {"name": "../evil"}, [], "name"),
    ("empty name", {"name": ""}, [], "name"),
    ("section is a list", {"train": [1, 2]}, [], "train"),
    ("yaml list top level", "- a\n- b\n", [], "top level must be a mapping"),
    ("yaml scalar top level", "just text\n", [], "top level must be a mapping"),
    ("yaml syntax error", "train: {epochs: 3\n", [], "not valid YAML"),
    ("override without equals", {}, ["model.fusion"], "KEY=VALUE"),
    ("override bad value", {}, ["train.epochs=-3"], "train.epochs"),
    ("override into scalar", {"name": "abc"}, ["name.x=1"], "'name' is not a section"),
]


@pytest.mark.parametrize("case,spec,overrides,expected", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_refused_naming_the_field(tmp_path, case, spec, overrides, expected):
    source = spec
    if isinstance(spec, str):
        source = tmp_path / "spec.yaml"
        source.write_text(spec)
    with pytest.raises(SpecError) as info:
        load_spec(source, overrides)
    assert expected in str(info.value), str(info.value)


def test_missing_spec_file_names_the_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_spec_builds_its_model_and_search(path):
    from orchestrator.sweep import build_param_space
    from workers.engine import Runtime
    from workers.methods import get_method

    spec = load_spec(path)
    model = get_method(spec.method.name)(spec, Runtime()).build_model(num_classes=6)
    assert sum(p.numel() for p in model.parameters()) > 0
    if spec.search is not None:
        assert build_param_space(spec, {"audio": 0.2, "visual": 0.3, "joint": 0.5})


def test_ensure_data_makes_every_path_absolute(tmp_path, monkeypatch, synth_dataset):
    """Tune trials and Train workers run in working directories of their own: relative paths in a
    spec would resolve there (checkpoints under Ray's session folder)."""
    import shutil

    from orchestrator.training import ensure_data

    shutil.copytree(synth_dataset, tmp_path / "clips")
    monkeypatch.chdir(tmp_path)
    spec = ensure_data(load_spec({"data": {"source": "dataset", "root": "clips", "cache_dir": "cache"},
                                  "storage": {"runs_dir": "runs"}}))
    assert spec.storage.runs_dir == tmp_path / "runs"
    assert spec.data.root == tmp_path / "clips" and spec.data.cache_dir == tmp_path / "cache"


def test_cma_paper_spec_is_the_official_two_stage_schedule():
    """configs/main/avid/kinetics/Cross-N1024.yaml (30 epochs) then configs/main/avid-cma/kinetics/
    InstX-N1024-PosW-N64-Top32.yaml (20 epochs, from the AVID checkpoint); Adam 2e-4, wd 1e-5, gamma 1."""
    from workers.methods import get_method

    root = Path(__file__).resolve().parents[1] / "experiments"
    cma, avid = load_spec(root / "cma_kinetics_sounds.yaml"), load_spec(root / "avid_kinetics_sounds.yaml")
    assert cma.search.compare == ["cma"] and cma.method.init_from == ""
    stage = get_method("cma").start_stage(cma.method)
    assert stage == {"name": "avid", "config": "Cross-N1024", "embedding_dim": 128, "probe_epochs": 100}
    assert (avid.method.config, avid.train.epochs) == (stage["config"], get_method("cma").start_stage_epochs(cma.method)) == ("Cross-N1024", 30)
    assert (cma.method.config, cma.train.epochs) == ("InstX-N1024-PosW-N64-Top32", 20)
    for spec in (cma, avid):
        t = spec.train
        assert (t.optimizer, t.learning_rate, t.weight_decay, t.lr_decay_ratio) == ("adam", 0.0002, 0.00001, 1.0)
        assert spec.global_batch == 256 and spec.worker_batch * spec.scaling.num_workers == 256
