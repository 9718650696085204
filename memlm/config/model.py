"""Model configuration: global widths and defaults plus an explicit list of per-layer mixer configs."""
from __future__ import annotations

from dataclasses import dataclass, field

from memlm.config.base import Config, check_choice, check_positive
from memlm.layers.base import MixerConfig

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "none", "cms")
RESIDUALS = ("sequential", "parallel", "parallel2", "pfp")
POSITIONS = ("rope", "xpos", "none", "learned")


@dataclass(kw_only=True)
class ModelConfig(Config):
    """Everything needed to build a :class:`memlm.models.lm.MemoryLM`.

    residual: "sequential" (pre-norm, x + f(norm x) then x + mlp(norm x)), "parallel" (PaLM: one norm,
    x + mixer(n) + mlp(n)), "parallel2" (GPT-NeoX: two norms, x + mixer(norm1 x) + mlp(norm2 x)), "pfp"
    (sequential plus the Bayesian-residual variance channel and its logit temperature, memlm/layers/residual.py).
    position: "rope" | "xpos" | "none" apply inside attention; "learned" adds absolute position embeddings
    (position inside the document) to the token embeddings.
    """

    vocab_size: int = 263
    d_model: int = 256
    n_heads: int = 4
    layers: list[MixerConfig] = field(default_factory=list)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    mlp: str = "swiglu"
    d_ff: int = 0  # 0 means the family default: 8/3·d rounded to 64 for SwiGLU, 4·d for GELU
    mlp_bias: bool = False
    residual: str = "sequential"
    position: str = "rope"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    xpos_scale_base: float = 512.0
    max_seq_len: int = 4096  # only bounds learned absolute positions
    tie_embeddings: bool = True
    init_std: float = 0.02
    # CMS feed-forward (mlp="cms", memlm/layers/cms.py — issue 6): one SwiGLU level per entry of cms_levels, level ℓ
    # updated every cms_levels[ℓ] optimizer steps with its summed gradient; cms_d_ff: each level's hidden width (0: d_ff).
    cms_levels: list[int] = field(default_factory=lambda: [1, 4, 16])
    cms_d_ff: int = 0
    # Attention-only ablation in one flag: mixers with a neural-memory branch (mag, mal) build without it (issue 4).
    memory_off: bool = False
    # Oumnix model-level switches (memlm/models/oumnix.py, issue 5); each off by its default.
    moop_off: bool = False  # moop mixers mix their operators with fixed equal weights (no router): the ablation
    weave_rank: int = 0  # > 0: Linear layers matching weave_targets become W = U diag(s) Vᵀ of this rank
    weave_targets: list[str] = field(default_factory=lambda: ["w_in", "w_out"])
    cell_layers: list[int] = field(default_factory=list)  # an Oumnix cell after each of these layers
    cell_d_ff: int = 0  # hidden width of each cell candidate (0: d_model)
    exit_layers: list[int] = field(default_factory=list)  # early-exit points (after these layers)
    exit_weight: float = 0.1  # weight of the exits' self-distillation loss
    exit_threshold: float | None = None  # inference: exit when max probability ≥ this (None: never)
    name: str = ""

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        check_choice("mlp", self.mlp, MLPS)
        check_choice("residual", self.residual, RESIDUALS)
        check_choice("position", self.position, POSITIONS)
        for n in ("vocab_size", "d_model", "n_heads", "max_seq_len"):
            check_positive(n, getattr(self, n))
        if not self.layers:
            raise ValueError("layers must list at least one mixer config")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _round_up(8 * self.d_model // 3, 64)
        if not 0 < self.rope_fraction <= 1:
            raise ValueError(f"rope_fraction={self.rope_fraction} must be in (0, 1]")
        if not self.cms_levels or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.cms_levels):
            raise ValueError(f"cms_levels={self.cms_levels} must be a non-empty list of update periods ≥ 1")
        check_positive("cms_d_ff", self.cms_d_ff, allow_zero=True)
        n = len(self.layers)
        for name in ("cell_layers", "exit_layers"):
            bad = [i for i in getattr(self, name) if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise ValueError(f"{name}={getattr(self, name)}: indices must be layers 0 … {n - 1}")
        if self.exit_layers and max(self.exit_layers) >= n - 1:
            raise ValueError(f"exit_layers={self.exit_layers}: an exit after the last layer ({n - 1}) is the output")
        for name in ("weave_rank", "cell_d_ff", "exit_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.exit_threshold is not None and not 0 < self.exit_threshold <= 1:
            raise ValueError(f"exit_threshold={self.exit_threshold} must be in (0, 1] or null")

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
