"""Static decoding (memlm.inference.static) and CUDA-graph steps (memlm.inference.cuda_graph) equal the dynamic path.

Notation: B batch rows, T prompt tokens, N decoded tokens, V vocabulary.

The static path runs here on CPU without graphs, under ``forbid_host_sync`` (what a CUDA graph capture refuses), and
must give the dynamic path's logits to 1e-5 (fp32) at every step, with its buffers updated in place. The GPU test
(marker gpu) replays captured graphs.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import memlm
from memlm.inference.cuda_graph import GraphDecoder, Sampler
from memlm.inference.engine import Engine
from memlm.inference.sampling import SamplingConfig
from memlm.inference.static import HostSyncError, compact, forbid_host_sync, static_unsupported, to_static
from memlm.ops.testing import assert_close

GREEDY = SamplingConfig(temperature=0)
PRESETS = ["transformer-debug", "transformer-swa-debug", "gated-deltanet-debug", "deltanet-debug", "mamba2-debug",
           "hope-debug", "onyx-debug", "atlas-mag-debug", "titans-mag-debug", "infini-pythia-70m-debug"]


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict[str, memlm.MemoryLM] = {}


def model_for(name: str) -> memlm.MemoryLM:
    """Weights with a larger gain, so that greedy outputs vary (a broken cache cannot hide in a repeated token)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        m = memlm.build_model(name)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 2.0 / math.sqrt(p.shape[-1]))
        _MODELS[name] = m
    return _MODELS[name]


def ragged_prompt(T: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; row 1 is left-padded by ``pad`` (its document starts there: a different chunk alignment)."""
    ids = torch.randint(0, 250, (2, T), generator=torch.Generator().manual_seed(seed))
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[1, pad] = True
    return ids, reset


@pytest.mark.parametrize("name", PRESETS)
def test_static_steps_equal_dynamic(name):
    """Prompt 30 then 40 greedy steps (crosses chunks of 16, windows of 32 and 64): logits to 1e-5 at every step,
    the same tokens, no host sync, buffers written in place, and the compacted state equals the dynamic one."""
    model = model_for(name)
    assert static_unsupported(model) is None
    eng = Engine(model, prefill_chunk=8)
    ids, reset = ragged_prompt(30, 5, seed=1)
    logits, dyn = eng.prefill(ids, reset=reset)
    with torch.inference_mode():
        st = to_static(model, dyn, 80)
    ptrs = {k: t.data_ptr() for k, t in st.state_dict().items()}
    tok = logits.argmax(-1)
    for i in range(40):
        ld, dyn = eng.step(tok, dyn)
        with forbid_host_sync():
            ls, st = eng.step_static(tok, st)
        assert_close(ls, ld, tol=1e-5, name=f"{name} step {i}")
        tok = ld.argmax(-1)
        assert torch.equal(ls.argmax(-1), tok)
    assert {k: t.data_ptr() for k, t in st.state_dict().items()} == ptrs, "static buffers were reallocated"
    got, want = compact(model, st).state_dict(), dyn.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert_close(got[k].float(), want[k].float(), tol=1e-5, name=f"{name} state {k}")


@pytest.mark.parametrize("name", ["gated-deltanet-debug", "mamba2-debug", "hope-debug", "onyx-debug",
                                  "atlas-mag-debug", "infini-pythia-70m-debug"])
def test_chunked_prefill_equals_one_shot(name):
    """Prefill in chunks of N tokens (memory presets; attention is covered in test_engine) equals one call."""
    model = model_for(name)
    ids, reset = ragged_prompt(45, 3, seed=2)
    with torch.no_grad():
        full, s_full = model(ids, reset=reset)
    for chunk in (7, 16, 45):
        last, state = Engine(model, prefill_chunk=chunk).prefill(ids, reset=reset)
        assert_close(last, full[:, -1], tol=1e-5, name=f"{name} prefill chunk {chunk}")
        a, b = state.state_dict(), s_full.state_dict()
        for k in b:
            assert_close(a[k].float(), b[k].float(), tol=1e-5, name=f"{name} chunk {chunk} state {k}")


@pytest.mark.parametrize("name", ["transformer-debug", "atlas-mag-debug"])
def test_engine_static_generation_equals_dynamic(name):
    """Ragged batch whose rows finish at different steps (the batch shrinks): same tokens, reasons and final states."""
    model = model_for(name)
    prompts = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 19, 12)]
    dyn = Engine(model, prefill_chunk=8).generate_ids(prompts, 30, GREEDY, ignore_eos=True, return_state=True).run()
    stop = {dyn.rows[0].token_ids[9], dyn.rows[2].token_ids[20]}
    runs = {}
    for mode in ("dynamic", "static"):
        eng = Engine(model, prefill_chunk=8, static_cache=mode == "static")
        runs[mode] = eng.generate_ids(prompts, 30, GREEDY, stop_ids=stop, ignore_eos=True, return_state=True).run()
        assert eng.decode_mode == mode and not eng.notes
    a, b = runs["dynamic"].rows, runs["static"].rows
    assert len({len(r.token_ids) for r in a}) > 1, "rows should finish at different steps"
    for ra, rb in zip(a, b):
        assert ra.token_ids == rb.token_ids and ra.finish_reason == rb.finish_reason
        sa, sb = ra.state.state_dict(), rb.state.state_dict()
        for k in sa:
            assert sa[k].shape == sb[k].shape, k
            assert_close(sb[k].float(), sa[k].float(), tol=1e-5, name=f"{name} final state {k}")


def test_unsupported_layer_falls_back_with_reason():
    model = model_for("transformer-retrieval-debug")
    why = static_unsupported(model)
    assert why is not None and "retrieval" in why
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = Engine(model).generate_ids(prompt, 12, GREEDY, ignore_eos=True).run().rows[0].token_ids
    eng = Engine(model, static_cache=True)
    got = eng.generate_ids(prompt, 12, GREEDY, ignore_eos=True).run().rows[0].token_ids
    assert got == want and eng.decode_mode == "dynamic"
    assert any("retrieval" in n and "dynamically" in n for n in eng.notes)
    with pytest.raises(ValueError, match="static decoding is not available"):
        to_static(model, model.init_state(1), 16)


def test_cuda_graph_on_cpu_is_ignored_with_a_note():
    eng = Engine(model_for("transformer-debug"), cuda_graph=True)
    assert eng.static_cache and not eng.cuda_graph
    assert any("cuda_graph ignored on cpu" in n for n in eng.notes)
    eng.generate_ids([[1, 2, 3]], 4, GREEDY, ignore_eos=True).run()
    assert eng.decode_mode == "static"


def test_max_len_too_small_decodes_dynamically():
    eng = Engine(model_for("transformer-debug"), static_cache=True, max_len=16)
    eng.generate_ids([list(range(10))], 20, GREEDY, ignore_eos=True).run()
    assert eng.decode_mode == "dynamic" and any("max_len=16" in n for n in eng.notes)


def test_host_sync_guard_catches_item_and_nonzero():
    x = torch.arange(4)
    with pytest.raises(HostSyncError), forbid_host_sync():
        bool(x.any())
    with pytest.raises(HostSyncError), forbid_host_sync():
        x[x > 1]
    with forbid_host_sync():
        (x * 2).repeat_interleave(2, dim=0)


def test_graph_decoder_buffer_logic_without_capture():
    """The decoder's buffer handling (copy-in of a foreign state, reuse of the one it returned, one graph per batch
    size, refusal of a state whose buffers another generation took) run eagerly on CPU."""
    model = model_for("gated-deltanet-debug")
    eng = Engine(model)
    dec = GraphDecoder(model, capture=False)
    ids, reset = ragged_prompt(12, 2, seed=3)
    logits, dyn = eng.prefill(ids, reset=reset)
    with torch.inference_mode():
        st = to_static(model, dyn, 32)
        tok = logits.argmax(-1)
        for _ in range(5):
            ld, dyn = eng.step(tok, dyn)
            ls, st = dec.step(tok, st)
            assert_close(ls, ld, tol=1e-5, name="graph decoder step")
            tok = ld.argmax(-1)
        one, dyn1 = st.select([1]), dyn.select([1])          # a row finished: batch 1 gets its own buffers
        ls, one = dec.step(tok[1:], one)
        ld, dyn1 = eng.step(tok[1:], dyn1)
        assert_close(ls, ld, tol=1e-5, name="after the batch shrank")
        assert len(dec.graphs) == 2
        stale = one
        dec.step(tok[1:], to_static(model, dyn1, 32))       # another generation takes the batch-1 buffers
        with pytest.raises(RuntimeError, match="taken over"):
            dec.step(tok[1:], stale)
        # a sampling graph (greedy) for the same layout is a graph of its own; its packed token is the argmax of
        # its own logits
        lg, _, packed = dec.step_sampled(tok[1:], to_static(model, dyn1, 32), Sampler(GREEDY, model.config.vocab_size))
        ld, dyn1 = eng.step(tok[1:], dyn1)
        assert_close(lg, ld, tol=1e-5, name="sampling graph step")
        assert packed.shape == (3, 1) and int(packed[0, 0]) == int(ld.argmax(-1)[0])
        assert len(dec.graphs) == 3


def _graph_engine_on_cpu(model) -> tuple[Engine, list[int]]:
    """An engine whose CUDA-graph decoding runs the decoder's buffer logic eagerly (capture=False), so the
    generation loop of cuda_graph mode (sampling in the graph, the next step launched before the host read) runs on
    CPU; returns it and a list that counts the steps."""
    eng = Engine(model, static_cache=True)
    eng.cuda_graph, eng._graphs = True, GraphDecoder(model, capture=False)
    calls: list[int] = []
    inner = eng._graphs.step_sampled

    def counted(tokens, state, sampler, generator=None):
        calls.append(int(tokens.numel()))
        return inner(tokens, state, sampler, generator)
    eng._graphs.step_sampled = counted
    return eng, calls


@pytest.mark.parametrize("name,sampler", [("transformer-debug", "torch"), ("gated-deltanet-debug", "torch"),
                                          ("transformer-debug", "triton")])
def test_pipelined_graph_loop_equals_dynamic(name, sampler, monkeypatch):
    """cuda_graph mode's loop launches step t+1 before reading step t's tokens, so a row that stops has already been
    stepped past its last token. Its results must still equal the dynamic path's: tokens, log-probs and entropies
    of rows that stop at different steps, and states that continue exactly like the dynamic ones; all rows ending
    by length take no extra step. sampler "triton": the Triton sampler (interpreted) writes each step's sample into
    the host ring's next slot and the ids into the graph's input, as on CUDA."""
    if sampler == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("MEMLM_BACKEND_PACKED_SAMPLE", "triton")
    model = model_for(name)
    prompts = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 19, 12)]
    dyn = Engine(model).generate_ids(prompts, 16, GREEDY, ignore_eos=True).run()
    stop = {dyn.rows[0].token_ids[4], dyn.rows[2].token_ids[9]}
    runs = {}
    for mode in ("dynamic", "graph"):
        eng, calls = _graph_engine_on_cpu(model) if mode == "graph" else (Engine(model), [])
        runs[mode] = eng.generate_ids(prompts, 16, GREEDY, stop_ids=stop, ignore_eos=True, return_state=True).run()
    assert eng.decode_mode == "cuda_graph" and not eng.notes, eng.notes
    a, b = runs["dynamic"].rows, runs["graph"].rows
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert len({len(r.token_ids) for r in a}) > 1, "the rows should stop at different steps"
    nxt = torch.tensor([[5]])
    for r in range(3):
        assert a[r].token_ids == b[r].token_ids
        assert_close(torch.tensor(b[r].logprobs), torch.tensor(a[r].logprobs), tol=1e-5, name="log-probs")
        assert_close(torch.tensor(b[r].entropy), torch.tensor(a[r].entropy), tol=1e-5, name="entropies")
        la, _ = Engine(model).prefill(nxt, a[r].state)
        lb, _ = Engine(model).prefill(nxt, b[r].state)
        assert_close(lb, la, tol=1e-5, name=f"row {r} continues from its state")
    # one step per new token of the longest row, less the last one when that row ends by length (a stop still
    # gets its launched step: it hands the stopped rows their states); 3 rows per step, then fewer
    longest = max(len(r.token_ids) for r in a)
    by_length = all(r.finish_reason == "length" for r in a if len(r.token_ids) == longest)
    assert len(calls) == longest - by_length and calls[0] == 3 and calls[-1] < 3
    # every row ends by length: 6 tokens need 5 steps after the prompt, none launched past the end
    eng, calls = _graph_engine_on_cpu(model)
    out = eng.generate_ids(prompts, 6, GREEDY, ignore_eos=True, return_state=True).run()
    assert len(calls) == 5 and all(r.finish_reason == "length" and len(r.token_ids) == 6 for r in out.rows)
    assert all(g.fused == (sampler == "triton") for g in eng._graphs.graphs.values())
    ref = Engine(model).generate_ids(prompts, 6, GREEDY, ignore_eos=True, return_state=True).run()
    for r in range(3):
        assert out.rows[r].token_ids == ref.rows[r].token_ids
        assert_close(Engine(model).prefill(nxt, out.rows[r].state)[0], Engine(model).prefill(nxt, ref.rows[r].state)[0],
                     tol=1e-5, name="state after the last token (pending step)")


def test_finished_state_survives_a_break_and_a_later_generation():
    """A finished row's state is compacted out of the graph's buffers right after its last step is yielded (the
    token first). A caller that stops iterating at that step, then runs another generation on the same engine (which
    reuses those buffers), must still get the state after the first generation's tokens."""
    model = model_for("transformer-debug")
    prompt = torch.randint(0, 250, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = Engine(model).generate_ids([prompt], 5, GREEDY, ignore_eos=True, return_state=True).run().rows[0]
    eng, _ = _graph_engine_on_cpu(model)
    gen = eng.generate_ids([prompt], 5, GREEDY, ignore_eos=True)
    for step in gen:
        if step.finished:
            break
    eng.generate_ids([prompt[::-1]], 7, GREEDY, ignore_eos=True).run()     # same layout: the same buffers
    row = gen.rows[0]
    assert row.token_ids == ref.token_ids
    nxt = torch.tensor([[5]])
    assert_close(Engine(model).prefill(nxt, row.state)[0], Engine(model).prefill(nxt, ref.state)[0], tol=1e-5,
                 name="state after a break")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["transformer-debug", "gated-deltanet-debug"])
def test_cuda_graph_equals_eager_on_gpu(name):
    """Captured graphs replay what eager static steps compute (logits to 1e-5 fp32) and the dynamic path's tokens,
    for a ragged batch of 3 whose rows finish at different steps (graphs for batch 3, 2 and 1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = copy.deepcopy(model_for(name)).to("cuda")   # the cached CPU model stays on the CPU
    prompts = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 19, 12)]
    dyn = Engine(model).generate_ids(prompts, 40, GREEDY, ignore_eos=True).run()
    stop = {dyn.rows[0].token_ids[9], dyn.rows[2].token_ids[25]}
    runs = {}
    for mode in ("dynamic", "static", "cuda_graph", "cuda_graph_compiled"):   # compiled: step and sampler
        eng = Engine(model, static_cache=mode == "static", cuda_graph=mode.startswith("cuda_graph"),
                     compile_step=mode == "cuda_graph_compiled")
        runs[mode] = eng.generate_ids(prompts, 40, GREEDY, stop_ids=stop, ignore_eos=True, return_state=True).run()
        assert eng.decode_mode == mode.removesuffix("_compiled") and not eng.notes, eng.notes
    nxt = torch.tensor([[5]], device="cuda")
    for r in range(3):
        toks = [runs[m].rows[r].token_ids for m in runs]
        assert all(t == toks[0] for t in toks)
        for m in ("cuda_graph", "cuda_graph_compiled"):
            # a stopped row's state (the pipelined graph loop had already stepped past its last token) continues alike
            assert_close(Engine(model).prefill(nxt, runs[m].rows[r].state)[0],
                         Engine(model).prefill(nxt, runs["dynamic"].rows[r].state)[0], tol=1e-4, name=f"{name} state")
            # the graph sampled in place (one host read per step): the model's log-probs and entropies, as outside
            for key in ("logprobs", "entropy"):
                assert_close(torch.tensor(getattr(runs[m].rows[r], key)),
                             torch.tensor(getattr(runs["dynamic"].rows[r], key)), tol=1e-4, name=f"{name} {m} {key}")
    # random sampling inside the graph: reproducible with a seed, every token from the top-p set
    cfg = SamplingConfig(temperature=0.9, top_p=0.8, seed=5)
    outs = [Engine(model, cuda_graph=True).generate_ids(prompts, 24, cfg, ignore_eos=True).run() for _ in range(2)]
    assert [r.token_ids for r in outs[0].rows] == [r.token_ids for r in outs[1].rows]
    assert all(len(r.token_ids) == 24 and min(r.token_ids) >= 0 for r in outs[0].rows)
    # temperature only: the Triton sampler writes into the host ring (two graphs alternating), also reproducible
    cfg = SamplingConfig(temperature=0.8, seed=3)
    engs = [Engine(model, cuda_graph=True) for _ in range(2)]
    outs = [e.generate_ids(prompts, 24, cfg, ignore_eos=True).run() for e in engs]
    assert [r.token_ids for r in outs[0].rows] == [r.token_ids for r in outs[1].rows]
    assert all(g.fused and len(g.graphs) == 2 for g in engs[0]._graphs.graphs.values())
    # logits step by step: graph replay vs eager static, batch 1
    eng = Engine(model, cuda_graph=True)
    logits, state = eng.prefill(torch.tensor([prompts[1]], device="cuda"))
    st_graph, step, _ = eng.decode_plan(state, 32)
    st_eager, _, _ = Engine(model, static_cache=True).decode_plan(state, 32)
    tok = logits.argmax(-1)
    for i in range(30):
        lg, st_graph = step(tok, st_graph)
        lg = lg.clone()
        le, st_eager = eng.step_static(tok, st_eager)
        assert_close(lg, le, tol=1e-5, name=f"{name} graph step {i}")
        tok = le.argmax(-1)
    assert eng.decode_mode == "cuda_graph" and not eng.notes, eng.notes


def test_cli_generate_flags(capsys, caplog):
    """--cuda-graph on CPU decodes statically with a note and prints what the default path prints; a bad
    --prefill-chunk is a one-line error."""
    from memlm.cli.main import main

    argv = ["generate", "transformer-debug", "--prompt", "Hi there", "--max-new-tokens", "8", "--temperature", "0"]
    torch.manual_seed(0)
    assert main(argv) == 0
    plain = capsys.readouterr().out
    torch.manual_seed(0)
    assert main(argv + ["--cuda-graph", "--prefill-chunk", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert "cuda_graph ignored on cpu" in caplog.text
    torch.manual_seed(0)
    assert main(argv + ["--compile-step"]) == 0     # the static step through torch.compile: the same text
    assert capsys.readouterr().out == plain
    assert main(argv + ["--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk 0" in capsys.readouterr().err
