"""CMS (continuum memory system) presets: a Llama-style transformer whose feed-forwards are CMS chains."""
from __future__ import annotations

from memlm.config.presets import _debug_train, register_preset, transformer
from memlm.config.train import RunConfig


@register_preset("cms-debug", "cms", "Llama-style with CMS feed-forwards (levels every 1/4/16 steps), debug size")
def _cms_debug() -> RunConfig:
    return RunConfig(model=transformer(64, 2, 4, 2, 263, mlp="cms", cms_levels=[1, 4, 16], cms_d_ff=128),
                     train=_debug_train())
