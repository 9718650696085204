"""Function-preserving progressive growth: wider d_ff, more heads, wider d_model, more layers (SPEC.md, Onyx).

Notation: D → D' model width, F → F' hidden width of an MLP, Hq → Hq' query heads, Hk → Hk' key/value (memory)
heads, G = Hq/Hk heads per group, Dh head width (never changes), V vocabulary (never changes), L → L' layers.

Every tensor of the grown model is its old tensor scattered into a bigger one ("index maps" per dimension: new
index ← old index, or −1 for a new entry). New entries keep the new model's fresh initialisation, except where
they would change the function:

- residual writers (o_proj / w_out / out_proj): new rows (new residual dims) AND new columns (new heads, new
  hidden units) are zero; a new layer's (or new CMS level's) writers are zero, so the block is the identity;
- embeddings: new columns (residual dims) are zero, so the residual stream is zero on the new dims;
- RMSNorm over the residual: with x zero on the new dims, mean(x²) shrinks by D/D'; w ← w·√(D/D') and
  norm_eps ← norm_eps·D/D' (in the grown config) give exactly the old output on the old dims. LayerNorm's mean
  would shift every old dim: d_model growth with LayerNorm is refused;
- readers of the residual (q/k/v, u, w_in, an untied head): new input columns see zeros, so they keep their
  random init — which is what lets the new dims learn;
- heads: old query head r of group g moves to group g of the new layout (G' = Hq'/Hk' per group); when Hk' = m·Hk,
  old kv head k sits at slot k·m and, where its old group does not fit into one new group, at a few following
  slots as exact copies. New heads' output columns are zero. Fused qkv and SwiGLU [gate|up] layouts are remapped
  per segment. HOPE layers grow like attention (u_proj/mem_init/η/α biases follow the memory heads).

Any other mixer grows generically (Linear inputs of width D padded, RESIDUAL_OUT outputs zero-padded, other
shapes must stay); ``grow_model`` then checks the logits numerically and refuses a growth that changed them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from memlm.config.model import ModelConfig
from memlm.errors import UserError
from memlm.models.init import RESIDUAL_OUT
from memlm.models.lm import MemoryLM
from memlm.ops.testing import rel_err

__all__ = ["carry_optimizer_state", "default_layer_map", "grow_checkpoint", "grow_config", "grow_model", "growth_error",
           "head_maps", "parse_target"]

# Model-level fields that may change in a growth; anything else must be equal.
GROWABLE = {"d_model", "n_heads", "d_ff", "layers", "cms_levels", "cms_d_ff", "norm_eps", "name", "max_seq_len",
            "init_std"}
LAYER_GROWABLE = {"n_heads", "n_kv_heads", "d_ff", "head_dim", "alpha_init"}
VERIFY_TOL = 1e-4


def head_maps(hq: int, hk: int, hq2: int, hk2: int) -> tuple[list[int], list[int]]:
    """(qmap [Hq'], kvmap [Hk']): the old head each new head copies, −1 for a new head (see module docstring)."""
    if hq == hk and hq2 == hk2 and hq2 >= hq:  # MHA → MHA: old heads keep their slots, new ones are appended
        keep = list(range(hq)) + [-1] * (hq2 - hq)
        return keep, list(keep)
    if hq2 < hq or hk2 < hk or hk2 % hk or hq2 % hk2:
        raise UserError(f"heads {hq}/{hk} → {hq2}/{hk2} (query/kv): need Hq' ≥ Hq, Hk' a multiple of Hk and Hq' a "
                        f"multiple of Hk'")
    g, g2, m = hq // hk, hq2 // hk2, hk2 // hk
    copies = -(-g // g2)  # new kv slots an old group needs
    if copies > m:
        raise UserError(f"heads {hq}/{hk} → {hq2}/{hk2}: an old group of {g} query heads does not fit into {m} new "
                        f"groups of {g2}")
    qmap, kvmap = [-1] * hq2, [-1] * hk2
    for k in range(hk):
        for c in range(copies):
            kvmap[k * m + c] = k
        for r in range(g):
            qmap[(k * m + r // g2) * g2 + r % g2] = k * g + r
    return qmap, kvmap


def default_layer_map(n_old: int, n_new: int) -> list[int]:
    """Old layer i stays at index i; new layers are appended."""
    return list(range(n_old))


def _resolve_heads(layer_cfg, model_cfg: ModelConfig) -> tuple[int, int, int]:
    hq = getattr(layer_cfg, "n_heads", None) or model_cfg.n_heads
    hk = getattr(layer_cfg, "n_kv_heads", None) or hq
    dh = getattr(layer_cfg, "head_dim", None) or model_cfg.d_model // hq
    return hq, hk, dh


def grow_config(src: ModelConfig, target: ModelConfig, layer_map: Sequence[int] | None = None) -> ModelConfig:
    """Check that ``src`` → ``target`` is a growth we can make function-preserving; returns the target config with
    norm_eps rescaled (RMSNorm, D → D'). Raises UserError naming what cannot grow."""
    a, b = src.to_dict(), target.to_dict()
    fixed = sorted(k for k in a if k not in GROWABLE and a[k] != b.get(k))
    if fixed:
        raise UserError("growth cannot change " + ", ".join(f"{k} ({a[k]!r} → {b.get(k)!r})" for k in fixed))
    if target.d_model < src.d_model or target.d_ff < src.d_ff or target.cms_d_ff < src.cms_d_ff:
        raise UserError(f"growth only widens: d_model {src.d_model} → {target.d_model}, d_ff {src.d_ff} → {target.d_ff}")
    if target.max_seq_len < src.max_seq_len:
        raise UserError(f"max_seq_len {src.max_seq_len} → {target.max_seq_len} would drop learned positions")
    if target.cms_levels[: len(src.cms_levels)] != src.cms_levels:
        raise UserError(f"cms_levels {src.cms_levels} → {target.cms_levels}: existing levels keep their periods, "
                        f"new levels are appended")
    if target.d_model != src.d_model and src.norm == "layernorm":
        raise UserError("d_model growth with LayerNorm is not function-preserving (the mean over the zero-padded dims "
                        "shifts every old dim); grow d_ff, heads or layers only, or use an RMSNorm model")
    lmap = list(layer_map) if layer_map is not None else default_layer_map(src.n_layers, target.n_layers)
    if len(lmap) != src.n_layers or sorted(set(lmap)) != lmap or not 0 <= lmap[0] <= lmap[-1] < target.n_layers:
        raise UserError(f"layer map {lmap}: need {src.n_layers} strictly increasing indices < {target.n_layers}")
    for i, j in enumerate(lmap):
        lo, ln = src.layers[i], target.layers[j]
        if lo.kind != ln.kind:
            raise UserError(f"layer {i} → {j}: kind {lo.kind!r} cannot become {ln.kind!r}")
        do, dn = lo.to_dict(), ln.to_dict()
        diff = sorted(k for k in do if k not in LAYER_GROWABLE and do[k] != dn.get(k))
        if diff:
            raise UserError(f"layer {i} → {j}: growth cannot change " + ", ".join(f"{k} ({do[k]!r} → {dn.get(k)!r})"
                                                                                 for k in diff))
        if hasattr(lo, "n_heads") or lo.kind in ("attention", "hope"):
            (hq, hk, dh), (hq2, hk2, dh2) = _resolve_heads(lo, src), _resolve_heads(ln, target)
            if dh != dh2:
                raise UserError(f"layer {i} → {j}: head width {dh} → {dh2} cannot grow (RoPE frequencies and the "
                                f"1/√Dh scale depend on it); grow n_heads with d_model or set head_dim={dh}")
            head_maps(hq, hk, hq2, hk2)  # validates
        fo, fn = lo.d_ff or src.d_ff, ln.d_ff or target.d_ff
        if fn < fo:
            raise UserError(f"layer {i} → {j}: d_ff {fo} → {fn} would shrink")
    out = ModelConfig.from_dict(b)
    if src.norm == "rmsnorm" and target.d_model != src.d_model:
        out.norm_eps = src.norm_eps * src.d_model / target.d_model
    return out


# ---------------------------------------------------------------------------------------------------- index maps

def _pad(n_old: int, n_new: int) -> Tensor:
    if n_new < n_old:
        raise UserError(f"a dimension would shrink from {n_old} to {n_new}")
    return torch.cat([torch.arange(n_old), torch.full((n_new - n_old,), -1)])


def _heads(hmap: list[int], dh: int) -> Tensor:
    return torch.cat([torch.arange(dh) + h * dh if h >= 0 else torch.full((dh,), -1) for h in hmap])


def _offset(m: Tensor, off: int) -> Tensor:
    return torch.where(m >= 0, m + off, m)


def _rules(old: MemoryLM, new: MemoryLM, inv: dict[int, int]):
    """Yield (new key, old key, maps, fill) for every tensor an owner module knows how to grow."""
    D, D2 = old.config.d_model, new.config.d_model
    old_mods = dict(old.named_modules())

    def old_name(name: str) -> str | None:
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "blocks":
            j = int(parts[1])
            if j not in inv:
                return None
            parts[1] = str(inv[j])
        n = ".".join(parts)
        return n if n in old_mods else None

    def reader(key_prefix, om_prefix, nm: nn.Linear, out_map, fill="init"):
        yield f"{key_prefix}.weight", f"{om_prefix}.weight", [out_map, _pad(nm_in(om_prefix), nm.in_features)], fill
        if nm.bias is not None:
            yield f"{key_prefix}.bias", f"{om_prefix}.bias", [out_map], fill

    def writer(key_prefix, om_prefix, nm: nn.Linear, in_map):
        yield f"{key_prefix}.weight", f"{om_prefix}.weight", [_pad(old_mods[om_prefix].out_features, nm.out_features),
                                                              in_map], 0.0
        if nm.bias is not None:
            yield f"{key_prefix}.bias", f"{om_prefix}.bias", [_pad(old_mods[om_prefix].out_features,
                                                                    nm.out_features)], 0.0

    def nm_in(om_prefix):
        return old_mods[om_prefix].in_features

    for name, nm in new.named_modules():
        on = old_name(name) if name else ""
        if on is None:
            continue
        om = old_mods[on]
        p = f"{name}." if name else ""
        q = f"{on}." if on else ""
        cls = type(nm).__name__
        if nm is new:
            yield "embed.weight", "embed.weight", [None, _pad(D, D2)], 0.0
            if new.pos_embed is not None:
                yield ("pos_embed.weight", "pos_embed.weight",
                       [_pad(old.config.max_seq_len, new.config.max_seq_len), _pad(D, D2)], 0.0)
            if new.head is not None:
                yield "head.weight", "head.weight", [None, _pad(D, D2)], "init"
        elif name.rsplit(".", 1)[-1] in ("norm1", "norm2", "norm_f"):
            keys = [k for k, _ in nm.named_parameters()]
            for k in keys:
                fill = "norm" if k == "weight" else 0.0
                yield f"{p}{k}", f"{q}{k}", [_pad(D, D2)], fill
        elif cls in ("AttentionCore",):
            qmap, kvmap = head_maps(om.hq, om.hk, nm.hq, nm.hk)
            qi, ki = _heads(qmap, nm.dh), _heads(kvmap, nm.dh)
            Q, K = om.hq * om.dh, om.hk * om.dh
            if getattr(nm, "fused", False):
                yield from reader(f"{p}qkv", f"{q}qkv", nm.qkv, torch.cat([qi, _offset(ki, Q), _offset(ki, Q + K)]))
            else:
                yield from reader(f"{p}q_proj", f"{q}q_proj", nm.q_proj, qi)
                for part in ("k_proj", "v_proj"):
                    if hasattr(nm, part):
                        yield from reader(f"{p}{part}", f"{q}{part}", getattr(nm, part), ki)
            yield from writer(f"{p}o_proj", f"{q}o_proj", nm.o_proj, qi)
        elif cls == "Hope":
            qmap, kvmap = head_maps(om.hq, om.hm, nm.hq, nm.hm)
            ki = _heads(kvmap, nm.dh)
            hm = torch.tensor(kvmap)
            yield from reader(f"{p}u_proj", f"{q}u_proj", nm.u_proj, ki)
            yield f"{p}mem_init", f"{q}mem_init", [hm, None, None], "init"
            yield f"{p}eta_bias", f"{q}eta_bias", [hm], "init"
            yield f"{p}alpha_bias", f"{q}alpha_bias", [hm], "init"
            if nm.cfg.read == "memory":
                qi = _heads(qmap, nm.dh)
                yield from reader(f"{p}q_proj", f"{q}q_proj", nm.q_proj, qi)
                yield from writer(f"{p}o_proj", f"{q}o_proj", nm.o_proj, qi)
        elif cls in ("SwiGLU", "CMSLevel", "GeluMLP"):
            F_old, F_new = om.w_out.in_features, nm.w_out.in_features
            if cls == "GeluMLP":
                fmap = _pad(F_old, F_new)
            else:
                half = _pad(F_old, F_new)
                fmap = torch.cat([half, _offset(half, F_old)])
            yield from reader(f"{p}w_in", f"{q}w_in", nm.w_in, fmap)
            yield from writer(f"{p}w_out", f"{q}w_out", nm.w_out, _pad(F_old, F_new))
            if cls == "CMSLevel" and nm.period > 1:
                if om.period != nm.period:
                    raise UserError(f"{name}: CMS period {om.period} → {nm.period} cannot change")
                for pname, _ in nm.named_parameters():
                    acc = f"acc_{pname.replace('.', '_')}"
                    maps = {"w_in.weight": [fmap, _pad(D, D2)], "w_in.bias": [fmap],
                            "w_out.weight": [_pad(D, D2), _pad(F_old, F_new)], "w_out.bias": [_pad(D, D2)]}[pname]
                    yield f"{p}{acc}", f"{q}{acc}", maps, 0.0
        elif isinstance(nm, nn.Linear) and type(nm) is nn.Linear:
            # generic: a reader of the residual pads its input, a residual writer pads its output with zeros
            leaf = name.rsplit(".", 1)[-1]
            rows = _pad(om.out_features, nm.out_features) if leaf in RESIDUAL_OUT and om.out_features == D else None
            cols = _pad(om.in_features, nm.in_features) if om.in_features == D else None
            fill = 0.0 if rows is not None else "init"
            yield "generic", f"{p}weight", f"{q}weight", [rows, cols], fill
            if nm.bias is not None:
                yield "generic", f"{p}bias", f"{q}bias", [rows], fill


def _remap_named(key: str, old: Tensor, new: Tensor, maps: list, fill, scale: float) -> Tensor:
    try:
        return _remap(old, new, maps, fill, scale)
    except ValueError as e:
        raise UserError(f"cannot grow {key} {tuple(old.shape)} → {tuple(new.shape)}: {e}") from None


def _remap(old: Tensor, new: Tensor, maps: list, fill, scale: float) -> Tensor:
    """old scattered into a tensor of new's shape through per-dim maps (None: identity); new entries per ``fill``."""
    if len(maps) < old.ndim:
        maps = list(maps) + [None] * (old.ndim - len(maps))
    g, mask = old, torch.ones((), dtype=torch.bool)
    for d, m in enumerate(maps):
        if m is None:
            if old.shape[d] != new.shape[d]:
                raise ValueError(f"dimension {d} changes {old.shape[d]} → {new.shape[d]} and has no growth rule")
            continue
        if len(m) != new.shape[d]:
            raise AssertionError(f"map of dim {d} has {len(m)} entries for size {new.shape[d]}")
        g = g.index_select(d, m.clamp(min=0).to(old.device))
        shape = [1] * old.ndim
        shape[d] = len(m)
        mask = mask & (m >= 0).view(shape).to(old.device)
    if fill == "init":
        base = new
    elif fill == "norm":
        g = g * scale
        base = torch.full_like(new, scale)
    else:
        base = torch.full_like(new, float(fill))
    return torch.where(mask, g.to(new.dtype), base)


@torch.no_grad()
def grow_model(model: MemoryLM, target: ModelConfig, *, layer_map: Sequence[int] | None = None, seed: int = 0,
               verify: bool = True) -> MemoryLM:
    """A new MemoryLM of config ``grow_config(model.config, target)`` computing the same function as ``model``.

    layer_map[i]: the new index of old layer i (default: kept in place, new layers appended). New tensors are
    initialised from ``seed`` (the global RNG is left alone). verify: compare logits on a random batch in fp32 and
    raise UserError when the relative error exceeds 1e-4 (a mixer whose growth is not preservable)."""
    cfg = grow_config(model.config, target, layer_map)
    lmap = list(layer_map) if layer_map is not None else default_layer_map(model.config.n_layers, cfg.n_layers)
    inv = {j: i for i, j in enumerate(lmap)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            new = MemoryLM(cfg).to(next(model.parameters()).device)
        except ValueError as e:  # a layer config that the new widths make invalid
            raise UserError(f"grown config is invalid: {e}") from None
    old_sd, new_sd = model.state_dict(), new.state_dict()
    D, D2 = model.config.d_model, cfg.d_model
    scale = math.sqrt(D / D2)
    done: dict[str, Tensor] = {}
    plan: dict[str, tuple[str, list]] = {}  # grown tensors: key → (old key, index maps), for optimizer states
    generic = []
    for item in _rules(model, new, inv):
        if item[0] == "generic":
            generic.append(item[1:])
            continue
        key, okey, maps, fill = item
        done[key] = _remap_named(key, old_sd[okey], new_sd[key], maps, fill, scale)
        plan[key] = (okey, maps)
    for key, okey, maps, fill in generic:
        if key not in done:
            done[key] = _remap_named(key, old_sd[okey], new_sd[key], maps, fill, scale)
            plan[key] = (okey, maps)
    inv_names = _old_names(new_sd, inv)
    out = {}
    for key, value in new_sd.items():
        if key in done:
            out[key] = done[key]
            continue
        okey = inv_names.get(key)
        if okey is None or okey not in old_sd:  # a new layer / CMS level: fresh, with its residual writers zeroed
            owner = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
            out[key] = torch.zeros_like(value) if owner in RESIDUAL_OUT else value
            continue
        if old_sd[okey].shape != value.shape:
            raise UserError(f"{key}: shape {tuple(old_sd[okey].shape)} → {tuple(value.shape)} has no growth rule "
                            f"(layer kind without width growth?)")
        out[key] = old_sd[okey].to(value.dtype).clone()
        plan[key] = (okey, [None] * value.ndim)
    new.load_state_dict(out)
    new.growth_plan = plan  # read by carry_optimizer_state
    new.train(model.training)
    if verify:
        err = growth_error(model, new)
        if err > VERIFY_TOL:
            raise UserError(f"growth changed the model's outputs (relative error {err:.2e} > {VERIFY_TOL:g}): a layer "
                            f"in this stack has no function-preserving growth for this change")
    return new


def _old_names(new_sd: dict, inv: dict[int, int]) -> dict[str, str]:
    out = {}
    for key in new_sd:
        parts = key.split(".")
        if parts[0] == "blocks":
            j = int(parts[1])
            if j not in inv:
                continue
            parts[1] = str(inv[j])
        out[key] = ".".join(parts)
    return out


@torch.no_grad()
def growth_error(old: MemoryLM, new: MemoryLM, *, T: int = 48, seed: int = 0) -> float:
    """Relative error between the logits of ``old`` and ``new`` (fp32, eval mode) on random ids [2, T]."""
    g = torch.Generator().manual_seed(seed)
    dev = next(old.parameters()).device
    ids = torch.randint(0, min(old.config.vocab_size, 256), (2, T), generator=g).to(dev)
    modes = old.training, new.training
    old.eval(), new.eval()
    try:
        a, b = old(ids)[0], new(ids)[0]
    finally:
        old.train(modes[0]), new.train(modes[1])
    return rel_err(b.float(), a.float())


# ------------------------------------------------------------------------------------------------ checkpoints

def _inner_optimizers(opt) -> list:
    return list(getattr(opt, "optimizers", [opt]))


def carry_optimizer_state(old_opt, old_model: MemoryLM, new_opt, new_model: MemoryLM, *,
                          mode: str = "remap") -> dict[str, int]:
    """Give ``new_opt`` (built over the grown ``new_model``) the optimizer state of ``old_opt``.

    Parameters whose shape is unchanged keep their state as it was (moments, step counters). Grown parameters:
    mode "remap" (default) scatters every state tensor shaped like the old parameter through the same index maps as
    the weights (new entries 0) and keeps step counters — old entries continue exactly, new entries start with zero
    moments, which under Adam's bias correction makes their first steps ≈ 0.45·η instead of η (no loss spike);
    mode "reset" gives them a fresh state. Parameters of new layers / levels always start fresh. Needs
    ``new_model.growth_plan`` (set by ``grow_model``). Returns counts {"kept", "remapped", "fresh"}.
    """
    if mode not in ("remap", "reset"):
        raise ValueError(f"optimizer state mode {mode!r}: use 'remap' or 'reset'")
    plan = getattr(new_model, "growth_plan", None)
    if plan is None:
        raise ValueError("new_model has no growth_plan: build it with grow_model")
    old_params = dict(old_model.named_parameters())
    old_state = {}
    for o in _inner_optimizers(old_opt):
        old_state.update(o.state)
    by_id = {id(p): n for n, p in new_model.named_parameters()}
    counts = {"kept": 0, "remapped": 0, "fresh": 0}
    for o in _inner_optimizers(new_opt):
        for group in o.param_groups:
            for p in group["params"]:
                okey, maps = plan.get(by_id[id(p)], (None, None))
                po = old_params.get(okey) if okey else None
                st = old_state.get(po) if po is not None else None
                if not st or (po.shape != p.shape and mode == "reset"):
                    counts["fresh"] += 1
                    continue
                same = po.shape == p.shape
                new_st = {}
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.shape == po.shape and not same:
                        v = _remap(v.detach(), torch.zeros_like(p, dtype=v.dtype), maps, 0.0, 1.0)
                    elif isinstance(v, Tensor):
                        v = v.detach().clone()
                    new_st[k] = v.to(p.device) if isinstance(v, Tensor) else v
                o.state[p] = new_st
                counts["kept" if same else "remapped"] += 1
    return counts


class _CopyFiles:
    """Quacks like a tokenizer for ``save_checkpoint``: copies the source checkpoint's tokenizer files."""

    def __init__(self, files: list) -> None:
        self.files = files

    def save(self, directory) -> None:
        import shutil

        for f in self.files:
            shutil.copy2(f, directory)


def parse_target(to: Sequence[str], src_model: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """``--to`` words → (target model config, train overrides): one optional preset name (its model section is the
    target; default: the source model) and KEY=VALUE overrides (``model.d_ff=512``, bare ``d_ff=512`` means model.*;
    ``n_layers=N`` appends copies of the last layer's config; ``train.*`` keys are returned for the run config)."""
    from memlm.config.base import apply_overrides
    from memlm.config.presets import preset

    names = [w for w in to if "=" not in w]
    if len(names) > 1:
        raise UserError(f"--to: at most one preset name, got {names}")
    base = preset(names[0]).model if names else ModelConfig.from_dict(src_model.to_dict())
    if not names:  # a changed model must not keep passing for the preset it came from
        base.name = f"{src_model.name}-grown" if src_model.name and not src_model.name.endswith("-grown") \
            else src_model.name
    model_sets, train_sets, n_layers = [], [], None
    for w in to:
        if "=" not in w:
            continue
        key, value = w.split("=", 1)
        if key.startswith("train."):
            train_sets.append(w)
        elif key.removeprefix("model.") == "n_layers":  # shorthand: append copies of the last layer's config
            try:
                n_layers = int(value)
            except ValueError:
                raise UserError(f"--to {w}: n_layers must be an integer") from None
        else:
            model_sets.append(w.removeprefix("model."))
    cfg = apply_overrides(base, model_sets)
    if n_layers is not None:
        if n_layers < cfg.n_layers:
            raise UserError(f"--to n_layers={n_layers}: the model already has {cfg.n_layers} layers")
        extra = [type(cfg.layers[-1]).from_dict(cfg.layers[-1].to_dict()) for _ in range(n_layers - cfg.n_layers)]
        cfg = cfg.replace(layers=[*cfg.layers, *extra])
    return cfg, train_sets


def _opt_kwargs(t) -> dict:
    """build_optimizer arguments from a TrainConfig, exactly as the Trainer builds its optimizer."""
    return {"name": t.optimizer, "lr": t.lr, "weight_decay": t.weight_decay, "betas": tuple(t.betas), "eps": t.eps,
            "lr_scales": t.lr_scales}


def grow_checkpoint(src: str, to: Sequence[str], out: str, *, layer_map: Sequence[int] | None = None,
                    seed: int = 0, optimizer_state: str = "remap", log=print) -> dict:
    """Grow the model of ``src`` (a run, checkpoint or model folder) to ``to`` (see ``parse_target``) and write
    ``out``: for a training checkpoint a resumable run folder (``out/checkpoints/step_N``: grown weights, the
    optimizer state carried where shapes are unchanged, the same step, data cursor and RNG), else a model folder.
    Returns a summary (parameter counts, relative logit error, the written path)."""
    import json
    from pathlib import Path

    from memlm.config.base import apply_overrides
    from memlm.config.train import RunConfig
    from memlm.models.lm import load_model
    from memlm.train import checkpoint as ckpt
    from memlm.train.optim import build_optimizer

    out_p, src_p = Path(out), Path(src)
    if not src_p.exists():
        raise UserError(f"{src}: no such run, checkpoint or model folder")
    try:
        path = ckpt.find_checkpoint(src_p)
    except UserError:
        path = src_p
    data = ckpt.read_config(path)
    old = load_model(path)
    target, train_sets = parse_target(to, old.config)
    new = grow_model(old, target, layer_map=layer_map, seed=seed)
    err = growth_error(old, new)
    summary = {"from": str(path), "params_before": old.num_params(), "params_after": new.num_params(),
               "non_embedding_before": old.num_params(non_embedding=True),
               "non_embedding_after": new.num_params(non_embedding=True), "logit_rel_err": err,
               "norm_eps": new.config.norm_eps}
    tok_files = [f for f in path.iterdir() if f.name in ("tokenizer.json", "memlm_tokenizer.json")]
    if not (path / ckpt.TRAINER_STATE).is_file() or "train" not in data:
        if train_sets:
            raise UserError(f"{path} is a model folder (no training state): train.* overrides do not apply")
        new.save_pretrained(out_p)
        _CopyFiles(tok_files).save(out_p)
        return summary | {"out": str(out_p), "resumable": False}
    if ckpt.list_checkpoints(out_p / ckpt.CKPT_DIR):
        raise UserError(f"{out_p} already holds checkpoints; choose an empty --out")
    run = RunConfig.from_dict({"model": new.config.to_dict(), "train": data["train"]})
    run = apply_overrides(run, train_sets)
    run.train.out_dir = str(out_p)
    t_old = RunConfig.from_dict({"model": old.config.to_dict(), "train": data["train"]}).train
    old_opt = build_optimizer(old, **_opt_kwargs(t_old))
    if (path / ckpt.OPTIMIZER).is_file():
        old_opt.load_state_dict(torch.load(path / ckpt.OPTIMIZER, map_location="cpu", weights_only=True))
    new_opt = build_optimizer(new, **_opt_kwargs(run.train))
    counts = {"kept": 0, "remapped": 0, "fresh": sum(1 for p in new.parameters() if p.requires_grad)}
    if run.train.optimizer == t_old.optimizer:
        counts = carry_optimizer_state(old_opt, old, new_opt, new, mode=optimizer_state)
    st = json.loads((path / ckpt.TRAINER_STATE).read_text())
    st = {k: v for k, v in st.items() if k != "saved_at"} | {"grown_from": str(path)}
    rng = torch.load(path / ckpt.RNG, weights_only=True) if (path / ckpt.RNG).is_file() else None
    written = ckpt.save_checkpoint(out_p / ckpt.CKPT_DIR, int(st["step"]), model=new, optimizer=new_opt,
                                   config={"memlm_version": 1, "model": new.config.to_dict(),
                                           "train": run.train.to_dict()},
                                   trainer_state=st, rng=rng, keep_last=run.train.keep_last,
                                   tokenizer=_CopyFiles(tok_files))
    log(f"optimizer state: kept for {counts['kept']} parameters, remapped for {counts['remapped']}, "
        f"fresh for {counts['fresh']}")
    return summary | {"out": str(written), "resumable": True, "step": int(st["step"]),
                      **{f"optimizer_state_{k}": v for k, v in counts.items()},
                      "resume": f"memlm train --config {written / ckpt.CONFIG} --out {out_p} --resume"}
