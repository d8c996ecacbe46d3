"""The `procedural_driving` TFDS dataset (importing this registers the builder)."""

from data_pipelines.procedural_driving.procedural_driving import (BUILDER_CONFIGS,
                                                                  ProceduralDriving,
                                                                  ProceduralDrivingConfig,
                                                                  build)

__all__ = ["BUILDER_CONFIGS", "ProceduralDriving", "ProceduralDrivingConfig", "build"]
