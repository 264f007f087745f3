"""The experiment spec, as the orchestrator's API names it. The models live at the bottom of the
dependency chain (`workers.specs`, torch-free) because every Train worker validates the spec it
receives into them; this module only re-exports them."""
from workers.specs import (  # noqa: F401
    MAX_SWEEP_RUNS,
    METHOD_NAMES,
    SEARCH_METRICS,
    DataSpec,
    DecodeParams,
    ExperimentSpec,
    MethodSpec,
    ModelSpec,
    ScalingSpec,
    SearchDimension,
    SearchSpec,
    SpecError,
    StorageSpec,
    SynthSpec,
    TrackingSpec,
    TrainSpec,
    apply_overrides,
    dump_spec_yaml,
    flatten,
    load_spec,
    parse_override,
    validate_spec,
)
