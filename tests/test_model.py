"""The model's training view equals its inference view."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.config import preset
from dgemma.model.kv_cache import KVCache


def test_sequence_context_matches_the_cache_at_any_canvas_start():
    """encode_sequence + denoise(at start s) is what prefill of tokens[:s] + denoise gives, for every row's s."""
    m = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=1).model
    tokens = torch.randint(3, 512, (3, 60), generator=torch.Generator().manual_seed(0))
    starts = torch.tensor([5, 31, 44])  # before, around and beyond the 16-token sliding window
    canvas = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    self_cond = torch.randn(3, 32, 512)
    hidden, context = m.encode_sequence(tokens)
    got = m.denoise(canvas, context.at(starts), self_cond, self_cond_mask=torch.tensor([True, False, True]))
    for row, s in enumerate(starts.tolist()):
        cache = KVCache(m.text, 1, s, 32)
        prefix_hidden = m.encode(tokens[row:row + 1, :s], cache)
        assert torch.allclose(prefix_hidden[0], hidden[row, :s], atol=1e-5)
        sc = self_cond[row:row + 1] if row != 1 else None
        expected = m.denoise(canvas[row:row + 1], cache, sc)
        assert torch.allclose(got[row], expected[0], atol=1e-4), row


def test_training_pass_has_gradients_everywhere():
    m = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=1).model.train().requires_grad_(True)
    tokens = torch.randint(3, 512, (2, 40))
    hidden, context = m.encode_sequence(tokens)
    logits = m.denoise(torch.randint(0, 512, (2, 32)), context.at(torch.tensor([3, 8])), torch.randn(2, 32, 512))
    (logits.logsumexp(-1).mean() + m.logits(hidden).logsumexp(-1).mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_one_pass_mixing_encoder_and_decoder_rows_equals_separate_passes():
    """Continuous batching: a prefill row and a denoising row share one forward pass."""
    m = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=2).model
    g = torch.Generator().manual_seed(0)
    prompt_a, prompt_b = torch.randint(3, 512, (1, 20), generator=g), torch.randint(3, 512, (1, 9), generator=g)
    canvas, new = torch.randint(0, 512, (1, 32), generator=g), torch.randint(3, 512, (1, 25), generator=g)
    self_cond = torch.randn(1, 32, 512, generator=g)

    alone_a, alone_b = KVCache(m.text, 1, 80, 32), KVCache(m.text, 1, 80, 32)
    m.encode(prompt_a, alone_a)
    m.encode(prompt_b, alone_b)
    expected_logits = m.denoise(canvas, alone_a, self_cond)
    expected_hidden = m.encode(new, alone_b)

    both = KVCache(m.text, 2, 80, 32)
    tokens = torch.zeros(2, 20, dtype=torch.long)
    tokens[0], tokens[1, :9] = prompt_a[0], prompt_b[0]
    m.encode(tokens, both, torch.arange(20)[None, :] < torch.tensor([[20], [9]]))
    mixed = torch.zeros(2, 32, dtype=torch.long)
    mixed[0], mixed[1, :25] = canvas[0], new[0]
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, 25:] = False
    soft = torch.cat([m.soft_embeddings(self_cond), torch.zeros(1, 32, m.text.hidden_size)])
    hidden = m.forward(mixed, both, valid, denoise=torch.tensor([True, False]), self_cond=soft)
    assert torch.allclose(m.logits(hidden[:1]), expected_logits, atol=1e-4)
    assert torch.allclose(hidden[1, :25], expected_hidden[0], atol=1e-5)
    assert both.lengths.tolist() == [20, 34]  # the denoising row wrote nothing


@pytest.fixture
def threads(request):
    """Run the test with torch.set_num_threads(param), then restore the suite's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_commit_fused_into_the_first_canvas_pass_gives_the_same_bits(threads):
    """`commit_and_denoise` = encode(committed) then denoise(canvas): logits and cache bit for bit, for rows of
    different lengths, sliding windows already full or not (the matmuls run on twice the rows: their rounding
    per row must not change, with one thread or two)."""
    m = dgemma.DiffusionGemma.from_pretrained("models/dgemma-code-tiny").model
    g = torch.Generator().manual_seed(0)
    lengths = [5, 70, 140]  # window 128: not full, not full until the commit, full
    c = m.config.canvas_length
    prompts = torch.randint(3, 4096, (3, max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    committed, canvas = torch.randint(3, 4096, (3, c), generator=g), torch.randint(0, 4096, (3, c), generator=g)
    caches = [KVCache(m.text, 3, 240, c) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            m.encode(prompts, cache, valid)
        m.encode(committed, caches[0])
        want = m.denoise(canvas, caches[0])
        got = m.commit_and_denoise(committed, canvas, caches[1])
        assert torch.equal(got, want)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            assert torch.equal(a[:, :, :-c], b[:, :, :-c])  # the scratch tail past the slots is never read
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        assert all(torch.equal(caches[0].slot_pos[k], caches[1].slot_pos[k]) for k in caches[0].slot_pos)
        # and the next pass, which reads what the fused one wrote
        probs = want.softmax(-1)
        assert torch.equal(m.denoise(canvas, caches[1], self_cond_probs=probs),
                           m.denoise(canvas, caches[0], self_cond_probs=probs))


@pytest.mark.parametrize("fusable", [True, False])
def test_generation_folds_commits_only_where_the_matmuls_allow_it(monkeypatch, fusable):
    """Where `commit_fusable` says no, commits get their own pass; the tokens are the same either way."""
    dg = dgemma.DiffusionGemma.from_pretrained("models/dgemma-code-tiny")
    m = dg.model
    assert m.commit_fusable(2, 32, 32) in (True, False)  # computed once, then remembered
    assert (2, 32, 32, torch.get_num_threads(), m.device, m.dtype) in m._fusable
    ids = torch.randint(3, 4096, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    want = dg.generate(input_ids=ids, max_new_tokens=96, eos_token_id=[]).sequences
    calls = []
    monkeypatch.setattr(m, "commit_fusable", lambda *a: fusable)
    monkeypatch.setattr(m, "commit_and_denoise", lambda *a, f=m.commit_and_denoise: calls.append(1) or f(*a))
    torch.manual_seed(0)
    got = dg.generate(input_ids=ids, max_new_tokens=96, eos_token_id=[]).sequences
    assert torch.equal(got, want)
    assert len(calls) == (2 if fusable else 0)  # 3 canvases: 2 commits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rope_give_the_bits_of_the_plain_formulas(dtype):
    """The CPU rms_norm (sum / count with fp32 tensor constants) and apply_rope (roll, sign moved into sin) are
    rearrangements of the reference's formulas that must not change a bit."""
    from dgemma.model.layers import apply_rope, rms_norm, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 32, 256), (2, 7, 4, 64), (3, 5, 1, 128), (64, 384)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        for weight in (w, None):
            xf = x.float()
            plain = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
            plain = (plain if weight is None else plain * weight.float()).to(dtype)
            assert torch.equal(rms_norm(x, weight, 1e-6), plain)
    inv_freq = torch.cat([1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 64)), torch.zeros(24)])  # proportional
    positions = torch.randint(0, 5000, (2, 7), generator=g)
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    plain_sin = emb.sin().to(dtype)[:, :, None, :]
    assert torch.equal(cos, emb.cos().to(dtype)[:, :, None, :])
    x = torch.randn(2, 7, 4, 64, generator=g).to(dtype)
    rotated = torch.cat((-x[..., 32:], x[..., :32]), dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), x * cos + rotated * plain_sin)


def test_vocabulary_matmuls_on_the_transposed_copy_keep_the_bits_and_live_in_a_session(monkeypatch):
    import torch.nn.functional as F

    from dgemma.model import vocab

    vm = vocab.VocabMatmuls()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 256, generator=g)
    hidden = torch.randn(1, 32, 256, generator=g)
    with torch.inference_mode():
        vm.head(hidden, w)
        assert vm._copy is None  # outside a session: the plain product
        with vm.session():
            for rows in (1, 32, 64, 256):
                hidden = torch.randn(1, rows, 256, generator=g)
                probs = torch.randn(1, rows, 4096, generator=g).softmax(-1)
                assert torch.equal(vm.head(hidden, w), F.linear(hidden, w))
                assert torch.equal(vm.expected(probs, w), torch.matmul(probs, w))
            assert vm._copy is not None and vm._same[("head", 32, torch.get_num_threads(), (4096, 256))]
            w.mul_(2)  # updated in place: the copy is made again
            assert torch.equal(vm.head(hidden, w), F.linear(hidden, w))
            assert torch.equal(vm._copy, w.t())
        assert vm._copy is None  # dropped with the session: writes the version counter misses cannot go stale
        w.data.mul_(3)
        with vm.session():
            assert torch.equal(vm.head(hidden, w), F.linear(hidden, w))
    w2 = torch.randn(4096, 256, generator=g, requires_grad=True)
    with vm.session():
        out = vm.head(torch.randn(1, 32, 256, generator=g), w2)  # autograd: the plain product, with its gradient
        assert out.requires_grad and vm._copy is None
    monkeypatch.setattr(vocab, "_agree", lambda *a: False)  # where the two ways disagree, the plain product
    vm2 = vocab.VocabMatmuls()
    with torch.inference_mode(), vm2.session():
        assert torch.equal(vm2.head(hidden, w), F.linear(hidden, w)) and vm2._same
        assert not any(vm2._same.values())


def test_subset_check_of_the_vocabulary_matmuls_uses_their_layouts_and_sees_a_subset_rounding_apart(monkeypatch):
    """`rows_alike` compares each product on the operand layout `head`/`expected` would use for that row count,
    and says no where a product of fewer rows rounds them differently."""
    import torch.nn.functional as F

    from dgemma.model import vocab

    vm = vocab.VocabMatmuls()
    w = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), vm.session():
        assert vm.rows_alike(w, 64, 256)
        used = {(which, n) for which, n, *_ in vm._same}
        assert used == {("head", 64), ("head", 256), ("expected", 64), ("expected", 256)}  # the copy's checks ran
    real_linear, real_matmul = F.linear, torch.matmul

    def apart(real):  # products of fewer than 256 rows round one ulp up
        return lambda x, w_: (lambda out: out if x.shape[0] == 256 else torch.nextafter(out, out + 1))(real(x, w_))

    for layout in ("copy", "plain"):
        vm = vocab.VocabMatmuls()
        if layout == "plain":
            monkeypatch.setattr(vocab, "_agree", lambda *a: False)
        with torch.inference_mode(), vm.session():
            monkeypatch.setattr(F, "linear", apart(real_linear))
            monkeypatch.setattr(torch, "matmul", apart(real_matmul))
            assert not vm.rows_alike(w, 64, 256)
            monkeypatch.setattr(F, "linear", real_linear)
            monkeypatch.setattr(torch, "matmul", real_matmul)


def test_norms_of_one_input_share_their_normalisation_bit_for_bit():
    from dgemma.model.layers import RMSNorm, rms_norm, shared_norms

    g = torch.Generator().manual_seed(0)
    norms = [RMSNorm(256), RMSNorm(256, with_scale=False), RMSNorm(256)]
    for n in norms[::2]:
        n.weight.data = torch.randn(256, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 32, 256, generator=g).to(dtype)
        with torch.inference_mode():
            together = shared_norms(x, *(n.to(dtype) for n in norms))
        for got, n in zip(together, norms):
            assert got.dtype == dtype and torch.equal(got, rms_norm(x, n.weight, n.eps))
    norms = [n.float() for n in norms]
    assert shared_norms(x.float(), *norms) is None  # autograd on: the norms run as modules
    handle = norms[1].register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        assert shared_norms(x.float(), *norms) is None  # so does a hooked norm, for its hook to see it
    handle.remove()
    with torch.inference_mode():
        assert shared_norms(x.float(), *norms, RMSNorm(256, eps=1e-5)) is None


def test_norms_built_in_inference_mode_still_train():
    """rms_norm's cached constants must be plain tensors whatever mode the first norm was built in."""
    from dgemma.model import layers

    layers._CONSTANTS.pop((1e-5, 48), None)
    with torch.inference_mode():
        layers.RMSNorm(48, eps=1e-5)  # makes the (eps, dim) constants
    x, w = torch.randn(3, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    layers.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and w.grad is not None
