"""Datasets of genie_jax: TFDS builders writing episode chunks to ArrayRecord.

`get_builder(config.data, prepare=...)` returns the builder of the configured dataset (and
generates it when asked); `default_data_config(name)` gives the `config.data` defaults.
The record format is described in `data_pipelines.episode_builder`.
"""

from data_pipelines.registry import DATASET_NAMES
from data_pipelines.registry import default_data_config
from data_pipelines.registry import get_builder
from data_pipelines.registry import make_builder
