"""CompiledModel.generate over the static KV cache: greedy equality with Hugging Face, quantized
weights and caches, padding, chunked prefill, sampling, stopping, limits and bad input."""

import shutil
import warnings

import pytest
import torch
from torch import nn

import qcompile
from qcompile.runtime.decoder import CachedDecoder, kv_cache_spec
from qcompile.runtime.generate import pack_prompts, prefill, sample
from tests.tiny_models import VOCAB, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT, NEW = 9, 10


def _compile(model, recipe="none", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(model, {"input_ids": torch.randint(0, VOCAB, (2, 8), device=DEV)}, recipe=recipe,
                                progress=False, **kw)


def _prompts(batch=3):
    """Left-padded prompts of lengths PROMPT, PROMPT - 1 and PROMPT - 4 (Hugging Face's convention)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    mask[2 % batch, :4] = 0 if batch > 2 else 1
    ids[mask == 0] = 0
    return ids.to(DEV), mask.to(DEV)


def _hf_greedy(model, ids, mask, new=NEW):
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def _more_families(name):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    configs = {"qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**common, head_dim=16)),
               "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**common, sliding_window=None)),
               "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**common, pad_token_id=0)),
               "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**common, head_dim=16))}
    cls, config = configs[name]
    return cls(config).eval()


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama").to(DEV)
    return model, _compile(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "qwen3", "mistral", "phi3", "gemma"])
def test_greedy_equals_hugging_face_without_quantization(family):
    model = (tiny_model(family) if family in ("llama", "qwen2", "gpt2", "opt") else _more_families(family)).to(DEV)
    cm = _compile(model)
    ids, mask = _prompts()
    ours = cm.generate(ids, NEW, attention_mask=mask)
    assert ours.shape == (3, PROMPT + NEW)
    assert torch.equal(ours, _hf_greedy(model, ids, mask))
    paths = cm._decoder.binding.paths
    assert paths["empty"] == model.config.num_hidden_layers       # the prompt: SDPA over the block
    assert paths.get("masked", 0) + paths.get("kernel", 0) > 0     # the steps: attention over the cache


def test_chunked_prefill_equals_one_forward(llama):
    model, cm = llama
    ids, mask = _prompts()
    one = cm.generate(ids, NEW, attention_mask=mask)
    for chunk in (1, 4):
        assert torch.equal(cm.generate(ids, NEW, attention_mask=mask, prefill_chunk_size=chunk), one)


def test_right_padding_gives_the_rows_own_continuations(llama):
    model, cm = llama
    ids, mask = _prompts()
    left = cm.generate(ids, NEW, attention_mask=mask)
    tokens, lengths = pack_prompts(ids, mask)
    right_mask = (torch.arange(PROMPT, device=DEV) < lengths[:, None]).long()
    right = cm.generate(tokens * right_mask, NEW, attention_mask=right_mask)
    assert torch.equal(right[:, PROMPT:], left[:, PROMPT:])


def _teacher_forced_logits(decoder, tokens):
    """The decoder's logits at every position of ``tokens`` [B, T]: prefill of the first half, then
    one step per token."""
    B, T = tokens.shape
    half = T // 2
    decoder.allocate(B, T)
    out = [prefill(decoder, tokens[:, :half], torch.full((B,), half, dtype=torch.int32, device=DEV))]
    for t in range(half, T - 1):
        out.append(decoder.decode_step(tokens[:, t], torch.full((B,), t, device=DEV)).clone())  # a static buffer
    return torch.stack(out, 1)                       # logits predicting positions half .. T-1


@pytest.mark.parametrize("recipe, kv, floor", [("w8a16", None, 0.999), ("none", "int8", 0.999),
                                               ("none", "fp8", 0.995), ("none", "int4", 0.99), ("none", "int2", 0.9)])
def test_quantized_logits_stay_close_to_float_at_every_step(llama, recipe, kv, floor):
    model, cm_float = llama
    cm = cm_float if recipe == "none" and kv is None else _compile(model, recipe)
    decoder = CachedDecoder(cm, kv)
    tokens = _hf_greedy(model, *_prompts(2), new=12)[:, -16:]          # the float model's own continuation
    with torch.no_grad():
        ref = model(tokens).logits[:, 7:15].float()
    got = _teacher_forced_logits(decoder, tokens).float()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() >= floor, (recipe, kv, cos.min().item())


def test_past_max_length_is_a_clear_error(llama):
    _, cm = llama
    ids, mask = _prompts()
    with pytest.raises(ValueError, match=r"needs a cache of 13 tokens per row, more than max_length=12"):
        cm.generate(ids, 5, attention_mask=mask, max_length=12)
    decoder = CachedDecoder(cm)
    decoder.allocate(3, 4)
    with pytest.raises(ValueError, match="append past max_seq_len"):
        decoder(ids[:, :5], torch.arange(5, device=DEV).expand(3, 5))
    assert decoder.cache.lengths.max() <= 4


def test_a_sliding_window_bounds_the_cache():
    import transformers as tf

    model = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   sliding_window=12)).eval().to(DEV)
    cm = _compile(model)
    ids = torch.randint(3, VOCAB, (2, 9), device=DEV)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(cm.generate(ids, 4), ref)                   # within the window: the same attention
    with pytest.raises(ValueError, match="sliding window of 12 tokens.*a cache of 16 tokens per row"):
        cm.generate(ids, 8)


def test_eos_stops_and_pads(llama):
    _, cm = llama
    ids, mask = _prompts()
    free = cm.generate(ids, NEW, attention_mask=mask)
    eos = int(free[0, PROMPT + 2])                    # row 0 produces it at step 3
    out = cm.generate(ids, NEW, attention_mask=mask, eos_token_id=eos, pad_token_id=7)
    row = out[0, PROMPT:]
    assert row[2] == eos and (row[3:] == 7).all()
    for r in range(3):
        gen = out[r, PROMPT:].tolist()
        if eos not in gen:
            assert gen == free[r, PROMPT:PROMPT + len(gen)].tolist()
    if all(eos in out[r, PROMPT:].tolist() for r in range(3)):
        assert out.shape[1] < PROMPT + NEW              # stopped early


def test_sampling_is_seeded_and_filters():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, do_sample=True, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, do_sample=True, top_p=1e-6), logits.argmax(-1))
    draws = [sample(logits, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    allowed = torch.topk(logits, 5, -1).indices
    for _ in range(20):
        tok = sample(logits, do_sample=True, top_k=5)
        assert (allowed == tok[:, None]).any(-1).all()
    for bad, match in ((dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=match):
            sample(logits, do_sample=True, **bad)


def test_streamer_sees_prompt_then_every_token(llama):
    _, cm = llama
    ids, mask = _prompts()

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t)

        def end(self):
            self.ended = True

    rec = Recorder()
    out = cm.generate(ids, 4, attention_mask=mask, streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], ids.cpu())
    assert torch.equal(torch.stack(rec.puts[1:], 1), out[:, PROMPT:].cpu())


def test_return_stats(llama):
    _, cm = llama
    ids, mask = _prompts()
    out, stats = cm.generate(ids, 4, attention_mask=mask, return_stats=True)
    assert stats.new_tokens == 3 * 3 and stats.prompt_tokens == int(mask.sum()) and stats.tokens_per_s > 0


def test_kv_cache_option_and_artifact(tmp_path):
    model = tiny_model("qwen2").to(DEV)
    cm = _compile(model, "w8a16", kv_cache="int4")
    assert cm.kv_cache == kv_cache_spec("int4")
    ids, mask = _prompts()
    out = cm.generate(ids, 6, attention_mask=mask)
    loaded = qcompile.load(cm.save(tmp_path / "a"))
    assert loaded.kv_cache == cm.kv_cache
    assert torch.equal(loaded.to(DEV).generate(ids, 6, attention_mask=mask), out)


def test_bad_input_names_the_problem(llama):
    _, cm = llama
    with pytest.raises(ValueError, match="kv_cache='int3' is not a KV-cache format; valid: None, bf16"):
        kv_cache_spec("int3")
    with pytest.raises(ValueError, match="pre_rope"):
        kv_cache_spec(qcompile.runtime.KVCacheSpec("int4", pre_rope=True))
    ids, mask = _prompts()
    holes = mask.clone()
    holes[0, 4] = 0
    with pytest.raises(ValueError, match="attention_mask row 0: the real tokens must be one contiguous run"):
        cm.generate(ids, 2, attention_mask=holes)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        cm.generate(ids, 0)


def test_a_model_without_sdpa_has_no_cache_to_give():
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

        def forward(self, input_ids, position_ids=None):
            return self.head(self.emb(input_ids))

    cm = _compile(NoAttention().to(DEV))
    with pytest.raises(ValueError, match="no scaled_dot_product_attention"):
        cm.generate(torch.randint(0, VOCAB, (1, 4), device=DEV), 2)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("gcc")) and DEV == "cpu",
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_step_gives_the_same_tokens(llama):
    _, cm = llama
    ids, mask = _prompts()
    batches = (3, 2, 1)             # batch 3, then one symbolic recompile for batch 2, then batch 1
    eager = [cm.generate(ids[-b:], 6, attention_mask=mask[-b:]) for b in batches]
    compiled = CachedDecoder(cm, compile_step=True)
    saved, cm._decoder = cm._decoder, compiled
    try:
        for b, tokens in zip(batches, eager, strict=True):
            assert torch.equal(cm.generate(ids[-b:], 6, attention_mask=mask[-b:]), tokens)
        assert compiled._step_fn is not None and compiled.compile_step
    finally:
        cm._decoder = saved


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_prefill_computes_the_lm_head_at_one_position_per_row(family):
    model = tiny_model(family).to(DEV)
    cm = _compile(model, "w8a16")
    decoder = CachedDecoder(cm)
    assert decoder.last_logits
    ids, _ = _prompts()
    positions = torch.arange(PROMPT, device=DEV).expand(3, PROMPT)
    rows = torch.tensor([PROMPT - 1, 3, 0], device=DEV)
    decoder.allocate(3, PROMPT)
    full = decoder(ids, positions)
    decoder.allocate(3, PROMPT)
    picked = decoder(ids, positions, logit_rows=rows)
    assert picked.shape == (3, VOCAB)
    torch.testing.assert_close(picked, full[torch.arange(3, device=DEV), rows], rtol=1e-5, atol=1e-5)
