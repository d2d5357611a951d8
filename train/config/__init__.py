"""The run configuration: schema (the typed dataclasses), validation (checks across fields) and loading
(files, presets, overrides, the init_from shape merge).

Only the schema is re-exported here. Importing any module of this package runs this file first, and the
checkpoint writer and the weights reader import the schema, while loading reads weights (for
model.init_from's shape): a re-export of loading here would close that circle.
"""

from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SourceConfig,
    StageConfig,
    TrainConfig,
    from_yaml_text,
    read_config_file,
    to_yaml,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceConfig",
    "StageConfig",
    "TrainConfig",
    "from_yaml_text",
    "read_config_file",
    "to_yaml",
]
