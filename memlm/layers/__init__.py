"""Sequence mixers and the building blocks around them. Importing the package registers every mixer."""
from memlm.layers import registry  # noqa: F401
from memlm.layers.base import MIXERS, EmptyState, LayerState, Mixer, MixerConfig, register_mixer  # noqa: F401
