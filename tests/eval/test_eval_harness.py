"""lm-evaluation-harness adapter: the LM methods agree with direct computations, and lm-eval runs offline on local
JSONL tasks of all three request types (skipped when lm-eval is not installed)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval_oracle import InductionOracle
from lm_eval.api.instance import Instance

import memlm
from memlm.data.tokenizer import load_tokenizer
from memlm.eval.harness import MemlmLM, run_lm_eval


def _req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _full_logprobs(model, ids):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), -1)


def test_loglikelihood_and_rolling_match_one_full_forward():
    torch.manual_seed(0)
    model = memlm.build_model("transformer-debug").eval()
    tok = load_tokenizer("byte")
    lm = MemlmLM(model, tok)
    ctx, conts = "The cat sat on the", [" mat", " hat", " mat"]
    got = lm.loglikelihood([_req("loglikelihood", (ctx, c)) for c in conts])
    for c, (lp, greedy) in zip(conts, got):
        ids = tok.encode(ctx + c)
        lps = _full_logprobs(model, ids)
        n = len(tok.encode(ctx))
        want = sum(float(lps[t - 1, ids[t]]) for t in range(n, len(ids)))
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(lps[t - 1].argmax()) == ids[t] for t in range(n, len(ids)))
    assert got[0] == got[2]  # same request, same answer (the cached context state is not consumed)
    # trailing space of the context moves to the continuation
    (a,) = lm.loglikelihood([_req("loglikelihood", ("The cat sat on the ", "mat"))])
    assert a[0] == pytest.approx(got[0][0], abs=1e-4)
    # empty context: EOS stands in
    (e,) = lm.loglikelihood([_req("loglikelihood", ("", "mat"))])
    ids = [tok.eos_id] + tok.encode("mat")
    lps = _full_logprobs(model, ids)
    assert e[0] == pytest.approx(sum(float(lps[t - 1, ids[t]]) for t in range(1, len(ids))), abs=1e-4)
    # rolling: whole text after EOS, chunked prefill with the state carried equals one forward
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8
    lm_small = MemlmLM(model, tok, prefill_chunk=64)
    (r,) = lm_small.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = [tok.eos_id] + tok.encode(text)
    lps = _full_logprobs(model, ids)
    assert r == pytest.approx(sum(float(lps[t - 1, ids[t]]) for t in range(1, len(ids))), rel=1e-5)


def test_generate_until_stops_and_each_request_starts_fresh():
    lm = MemlmLM(InductionOracle(), load_tokenizer("byte"))
    out = lm.generate_until([_req("generate_until", ("The code is 4711. The code is", {"until": ["."]})),
                             _req("generate_until", ("Nothing here. The code is", {"until": ["."],
                                                                                   "max_gen_toks": 6}))])
    assert out[0] == " 4711"
    assert "4711" not in out[1]  # the first request's text is not in the second one's memory


def _write_tasks(tmp_path):
    mc = [{"question": f"The code is {a}. Again, the code is", "choices": [f" {a}", f" {b}"], "label": 0}
          for a, b in (("123", "456"), ("789", "321"), ("555", "777"))]
    mc += [{"question": "The code is 901. Again, the code is", "choices": [" 333", " 901"], "label": 1}]
    gen = [{"question": f"Key {k}. Once more: Key", "answer": f" {k}"} for k in ("alpha", "bravo", "delta")]
    roll = [{"text": "abc abc abc abc abc abc"}, {"text": "The lamps along the road were lit."}]
    files = {}
    for name, rows in (("mc", mc), ("gen", gen), ("roll", roll)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        files[name] = p
    (tmp_path / "mc.yaml").write_text(f"""task: memlm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['mc']}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tmp_path / "gen.yaml").write_text(f"""task: memlm_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['gen']}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (tmp_path / "roll.yaml").write_text(f"""task: memlm_local_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files['roll']}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")


def test_lm_eval_runs_offline_on_local_jsonl_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    _write_tasks(tmp_path)
    lm = MemlmLM(InductionOracle(), load_tokenizer("byte"))
    res = run_lm_eval(lm, ["memlm_local_mc", "memlm_local_gen", "memlm_local_roll"], include_path=str(tmp_path))
    r = res["results"]
    # the induction oracle copies from its context: every answer is in the prompt
    assert r["memlm_local_mc"]["acc,none"] == 1.0
    assert r["memlm_local_gen"]["exact_match,none"] == 1.0
    bpb = r["memlm_local_roll"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0
