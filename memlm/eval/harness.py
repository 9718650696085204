"""lm-evaluation-harness adapter: any memlm model as an ``lm_eval.api.model.LM`` (loglikelihood,
loglikelihood_rolling, generate_until), so every lm-eval task — or a local JSONL task — runs on it.

Notation: T tokens, V vocabulary.

    from memlm.eval.harness import MemlmLM, run_lm_eval
    lm = MemlmLM(pretrained="runs/tiny")                    # or MemlmLM(model=model, tokenizer=tok)
    results = run_lm_eval(lm, ["hellaswag"], limit=100)     # or include_path=DIR for local task YAMLs

Semantics, for a model that remembers:

- ``loglikelihood(context, continuation)``: the context is fed from a fresh memory (an empty context becomes the
  EOS token, lm-eval's convention), then the continuation is scored; requests sharing a context reuse its state
  (they are grouped; the answer order is restored). Whitespace at the end of the context moves to the continuation,
  and the continuation's tokens are those of the encoded pair after the context's, as lm-eval's reference models do.
- ``loglikelihood_rolling(text)``: the whole text after an EOS prefix with the state carried through it (no window
  truncation: the memory is the context, however long the text).
- ``generate_until(context, {until, max_gen_toks, …})``: greedy decoding from a fresh memory, cut at the first stop
  string. Sampling options are ignored (lm-eval's generation tasks expect greedy output).

Every request starts from a fresh memory; nothing learned at test time leaks from one request to the next.
lm-eval is an optional dependency (``pip install lm-eval``); importing this module works without it, building
``MemlmLM`` then says what to install.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memlm.errors import UserError

try:  # optional dependency
    from lm_eval.api.model import LM as _LM

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised when lm-eval is absent
    _LM = object
    HAVE_LM_EVAL = False


class MemlmLM(_LM):  # type: ignore[misc, valid-type]
    """A memlm model for lm-evaluation-harness. Give ``model`` + ``tokenizer`` objects, or ``pretrained`` (a run,
    checkpoint or model folder, or a preset name — what ``memlm generate`` accepts)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, *, pretrained: str | None = None,
                 device: str | None = None, max_gen_toks: int = 256, prefill_chunk: int = 512,
                 batch_size: int | str | None = None, **_: Any) -> None:
        if not HAVE_LM_EVAL:
            raise UserError("lm-evaluation-harness is not installed: pip install lm-eval")
        super().__init__()
        from memlm.eval.runner import Scorer

        if model is None:
            if pretrained is None:
                raise UserError("MemlmLM needs a model (model=..., tokenizer=...) or pretrained=PATH_OR_PRESET")
            from memlm.cli.commands import load_for_inference

            model, tokenizer, _path = load_for_inference(str(pretrained), device,
                                                         tokenizer if isinstance(tokenizer, str) else None)
        elif tokenizer is None or isinstance(tokenizer, str):
            from memlm.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or "byte")
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.scorer = Scorer(model, tokenizer, device=device, prefill_chunk=prefill_chunk)
        self._device = self.scorer.device
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.eot_token_id], self.tok_encode(continuation)
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok_encode(continuation)

    # ---------------------------------------------------------------------------------------- requests
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])  # equal contexts side by side
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        key, last, state = None, None, None
        for i in order:
            ctx, cont = pairs[i]
            if tuple(ctx) != key:
                key = tuple(ctx)
                last, state = self.scorer.feed(ctx)
            lp, greedy = self.scorer.choice_logprobs(state, last, [cont])[0]
            out[i] = (lp, greedy)
            self.cache_hook.add_partial("loglikelihood", requests[i].args, (lp, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        res = []
        for r in requests:
            (text,) = r.args
            ids = [self.eot_token_id] + self.tok_encode(text)
            total = -float(self.scorer.nll_tokens(ids).double().sum()) if len(ids) > 1 else 0.0
            res.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return res

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        res = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            text, _ = self.scorer.generate(None, ids, max_new, stop=tuple(s for s in until if s))
            res.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return res


if HAVE_LM_EVAL:  # `lm_eval --model memlm` works once this module is imported (e.g. via run_lm_eval)
    try:
        from lm_eval.api.registry import register_model

        register_model("memlm")(MemlmLM)
    except (ValueError, AssertionError):  # already registered (module reloaded)
        pass


def run_lm_eval(lm: MemlmLM, tasks: list[str], *, include_path: str | None = None, include_defaults: bool | None = None,
                limit: float | None = None, num_fewshot: int | None = None, **kwargs: Any) -> dict:
    """Run lm-eval tasks on ``lm`` and return its results dict. ``include_path`` adds a folder of task YAMLs;
    with it, lm-eval's own task catalogue is only indexed when ``include_defaults`` (indexing it takes seconds)."""
    if not HAVE_LM_EVAL:
        raise UserError("lm-evaluation-harness is not installed: pip install lm-eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        include_defaults = include_path is None
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults)
    kwargs.setdefault("bootstrap_iters", 0)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                           **kwargs)


__all__ = ["HAVE_LM_EVAL", "MemlmLM", "run_lm_eval"]
