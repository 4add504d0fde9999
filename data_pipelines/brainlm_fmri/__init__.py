"""TFDS dataset `brainlm_fmri` (importing this package registers the builder)."""

from data_pipelines.brainlm_fmri.brainlm_fmri_dataset_builder import (Builder, BrainLMConfig,
                                                                   build_config,
                                                                   source_config_name)

__all__ = ["Builder", "BrainLMConfig", "build_config", "source_config_name"]
