"""avtune models: pure PyTorch encoders, fusion heads and balancing methods (no Ray / MLflow)."""

from __future__ import annotations

from .av_classifier import (
    PROBE_HEAD_FUSIONS,
    AVClassifier,
    UnimodalClassifier,
    build_av_classifier,
    build_unimodal_classifier,
    ogm_ge_weight_init,
)
from .encoders import AUDIO_ARCHS, VISUAL_ARCHS, build_audio_encoder, build_visual_encoder
from .fusion import FUSION_NAMES, ConcatFusion, FiLM, GatedFusion, SumFusion, build_fusion
from .gblend import (BLEND_KEYS, BlendEstimate, GBlendClassifier, blended_loss, build_gblend_classifier,
                     choose_estimation_window, estimate_blend_weights, estimate_from_histories)
from .ogm_ge import (
    OGMCoefficients,
    in_modulation_window,
    modulate_gradients,
    ogm_coefficients,
    ogm_coefficients_from_scores,
    modality_scores,
)
from .outputs import AVOutput

# --- AVSlowFast / AVID-CMA exports: append below this line (models/avslowfast.py, models/avid_cma.py) ---
from .avid_cma import (
    AVEmbeddings,
    AVIDConfig,
    AVIDCriterion,
    AVIDModel,
    CMACriterion,
    MemoryBank,
    build_avid_model,
    linear_probe_accuracy,
    nce_loss,
    parse_avid_config,
)
from .avslowfast import AVSLOWFAST_CONFIGS, AVSlowFast, AVSlowFastConfig, DropPathway, build_avslowfast, drop_pathway
