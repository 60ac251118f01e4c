"""The DiffusionGemma text model: one stack of layers used twice.

- `encode` runs the stack *causally* over new tokens (prompt, or a committed canvas) and writes their
  keys/values into the KV cache. Its logits are a plain autoregressive LM over the same weights.
- `denoise` runs the same stack *bidirectionally* over a canvas whose queries see `[cache ; canvas]`;
  it reads the cache and never writes it. Canvas positions continue after each row's cache.
- `commit_and_denoise` is an `encode` of a committed canvas and the next canvas's first `denoise` in one pass,
  with the numbers of the two (what eager generation runs between canvases).

The only link between the two passes is the cache. Self-conditioning (decoder only) turns the previous
step's scaled logits into soft embeddings that are mixed into the canvas embeddings.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import FULL, SLIDING, DiffusionGemmaConfig
from .kv_cache import KVCache, write_layer
from .layers import Block, GatedMLP, RMSNorm, rope_cos_sin, rope_inv_freq
from .traced import TracedPasses
from .vision import EncoderMedia, VisionEmbedder, VisionTower, soft_token_counts
from .vocab import VocabMatmuls


class SelfConditioning(nn.Module):
    """post_norm(canvas_embeddings + MLP(pre_norm(soft_embeddings)))."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(hidden, eps)
        self.post_norm = RMSNorm(hidden, eps, with_scale=False)
        self.mlp = GatedMLP(hidden, intermediate)

    def forward(self, embeddings: torch.Tensor, soft_embeddings: torch.Tensor | None) -> torch.Tensor:
        if soft_embeddings is None:  # first step: the MLP of zeros is exactly zero
            return self.post_norm(embeddings)
        return self.post_norm(embeddings + self.mlp(self.pre_norm(soft_embeddings)))


class DiffusionGemmaModel(nn.Module):
    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__()
        self.config = config
        t = self.text = config.text_config
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, padding_idx=t.pad_token_id)
        self.layers = nn.ModuleList(Block(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_conditioning = SelfConditioning(t.hidden_size, t.intermediate_size, t.rms_norm_eps)
        self.init_rope()
        vision = config.vision_config  # the checkpoint's `model.encoder.vision_tower` / `embed_vision`
        self.vision_tower = VisionTower(vision) if vision is not None else None
        self.embed_vision = VisionEmbedder(vision, t.hidden_size) if vision is not None else None
        self.vision_mask = "gemma4"  # how image tokens attend in the encoder: `VISION_MASKS` (dgemma.config)
        self._fusable: dict[tuple, bool] = {}  # commit_fusable's answers
        self._vocab_rows: dict[tuple, bool] = {}  # vocab_rows_exact's answers
        self._passes = TracedPasses(self)
        self._vocab = VocabMatmuls()  # the LM head and the expected embedding on a transposed copy (CPU)
        # training: keep only each layer's input and recompute the rest in the backward pass (less activation
        # memory for about a third more compute; the same gradients)
        self.gradient_checkpointing = False

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables; needed after building the model on the meta device."""
        t = self.text
        device = self.embed_tokens.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        for kind in (SLIDING, FULL):
            if kind in t.layer_types:
                head_dim = t.layer_head_dim(t.layer_types.index(kind))
                with torch.device(device):
                    self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(t, kind, head_dim), persistent=False)

    @property
    def trace_passes(self) -> bool:
        """Whether CPU passes are replayed from TorchScript traces (`dgemma.model.traced`; same results, less
        Python per pass). On by default."""
        return self._passes.enabled

    @trace_passes.setter
    def trace_passes(self, on: bool) -> None:
        self._passes.enabled = bool(on)

    def vocab_session(self):
        """Context in which the LM head and the expected embedding may run on a transposed copy of the embedding
        matrix (CPU, fp32, inference; same bits, `dgemma.model.vocab`), made on first use and dropped on exit.
        Generation opens one around its loop; the weights must not change inside it."""
        return self._vocab.session()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # -- pieces ----------------------------------------------------------------------------------
    def embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # the reference rounds sqrt(hidden) to the weight dtype (55.4 -> 55.5 in bf16)
        return torch.tensor(self.text.hidden_size ** 0.5, dtype=torch.float32).to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head, fp32, soft-capped."""
        logits = self._vocab.head(hidden, self.embed_tokens.weight).float()
        cap = self.text.final_logit_softcapping
        if cap is None:
            return logits
        if torch.is_grad_enabled() and logits.requires_grad:
            return torch.tanh(logits / cap) * cap
        # the same ops in place, on the CPU a block of positions at a time so that each block stays in cache
        for block in (logits.view(-1, logits.shape[-1]).split(64) if not logits.is_cuda else (logits,)):
            block.div_(cap).tanh_().mul_(cap)
        return logits

    def soft_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ E * sqrt(hidden): the expected embedding under the previous prediction."""
        return self.embed_probs(logits.softmax(dim=-1, dtype=torch.float32))

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """probs @ E * sqrt(hidden) for probabilities [..., V] (fp32 `softmax(logits)`; the sampler already has them)."""
        w = self.embed_tokens.weight
        return self._vocab.expected(probs.to(w.dtype), w) * self.embed_scale(w.dtype)

    def _stack(self, x: torch.Tensor, positions: torch.Tensor, attend, decoder: bool | torch.Tensor,
               split: int | None = None) -> torch.Tensor:
        """Run every layer; `attend(layer_index, kind, proj, h, cos, sin)` is the pass's attention."""
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions, x.dtype)
                for kind in set(self.text.layer_types)}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kind = self.text.layer_types[i]
            layer_attend = partial(attend, i, kind, cos=rope[kind][0], sin=rope[kind][1])
            if recompute:
                x = checkpoint(layer, x, layer_attend, decoder=decoder, split=split, use_reentrant=False)
            else:
                x = layer(x, layer_attend, decoder=decoder, split=split)
        return self.norm(x)

    def image_features(self, pixels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """The vision tower and `embed_vision` over images [N, P, 3 * patch**2] with patch positions [N, P, 2]:
        each image's soft tokens [tokens, text hidden] (transformers' `get_image_features(...).pooler_output`)."""
        if self.vision_tower is None:
            raise ValueError("this checkpoint has no vision tower (no vision_config): it reads text only")
        features = self.embed_vision(self.vision_tower(pixels.to(self.device), positions.to(self.device)))
        return list(features.split(soft_token_counts(positions, self.vision_tower.config.pooling_kernel_size)))

    # -- passes ----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                denoise: bool | torch.Tensor = False, self_cond: torch.Tensor | None = None,
                traced: bool = True, media: EncoderMedia | None = None) -> torch.Tensor:
        """One pass over new tokens [B, T] placed after each row's cache; returns the final normed hidden states.

        Rows with `denoise` False are encoder rows: causal (sliding window on sliding layers), their valid
        tokens are written to the cache. Rows with `denoise` True are canvases: bidirectional over
        `[cache ; canvas]`, self-conditioned on `self_cond` (soft embeddings [B, T, H] from `soft_embeddings`,
        zero for rows without; None on a first pass), nothing written. One batch may mix both (continuous
        batching). Token t of row b sits at position `cache.lengths[b] + t`; `valid` False marks right padding.
        `traced=False` always runs the Python pass (no TorchScript trace is recorded or replayed for it).
        `media`: image soft tokens to put in place of some encoder rows' token embeddings, and the blocks that
        attend to each other both ways (`EncoderMedia`; always the Python pass).
        """
        b, t = tokens.shape
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        # a batch of canvases only (every denoising step) reads the cache and writes nothing: no write plans, no
        # causal masks, no per-row choices, and the cache is left untouched
        canvases_only = denoise is True
        rows = torch.as_tensor(denoise, device=tokens.device).expand(b)
        writes = None if canvases_only else valid & ~rows[:, None]
        if writes is not None:
            cache.check_room(writes.sum(dim=1))
        positions = cache.lengths[:, None] + torch.arange(t, device=tokens.device)
        blocks = None if media is None else media.blocks
        used, masks, plans = _attention_plan(cache, positions, valid, rows, writes, blocks, self.vision_mask)
        if canvases_only:
            run = self._passes.run_canvas if traced else self.canvas_pass
            return run(tokens, positions, self_cond, cache.views(used), {kind: m[0] for kind, m in masks.items()})
        kv = [(*cached, k, v) for cached, k, v in zip(cache.views(used), cache.k, cache.v)]
        run = self._passes.run_encoder if traced and media is None else partial(self.encoder_pass, media=media)
        hidden = run(tokens, positions, rows, self_cond if bool(rows.any()) else False, kv, masks, plans)
        cache.commit(plans, positions, writes)
        return hidden

    def encoder_pass(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                     self_cond: torch.Tensor | None | bool, kv: list[tuple[torch.Tensor, ...]],
                     masks: dict[str, tuple[torch.Tensor | None, bool]], plans: dict[str, torch.Tensor],
                     media: EncoderMedia | None = None) -> torch.Tensor:
        """`forward` of a batch with encoder rows, as a function of its arguments: new tokens [B, T] at
        `positions`, `rows` [B] the canvas rows among them (their self-conditioning input `self_cond`, False when
        there are none), per layer `kv` = (cached keys, cached values: the used slots; the whole key and value
        buffers, written here), per attention kind the SDPA (mask, is_causal) and the write plan, and the image
        soft tokens that replace some token embeddings (`media`). Returns the final normed hidden states; the
        caller commits the positions (`KVCache.commit`)."""
        b, t = tokens.shape
        x = self.embed(tokens)
        if media is not None:  # as the reference: the token embeddings there replaced, no embedding scale on them
            x = x.masked_scatter(media.slots[..., None], media.embeds.to(x.dtype))
        if self_cond is not False:
            x = torch.where(rows[:, None, None], self.self_conditioning(x, self_cond), x)

        def attend(i, kind, proj, h, cos, sin):
            q, k, v = proj.qkv(h, cos, sin)
            out, keys, values = _attend(q, k, v, kv[i][0], kv[i][1], *masks[kind])
            write_layer(kind, kv[i][2], kv[i][3], plans[kind], k, v, keys, values)
            return proj.o_proj(out.transpose(1, 2).reshape(b, t, -1))

        return self._stack(x, positions, attend, decoder=rows)

    def canvas_pass(self, tokens: torch.Tensor, positions: torch.Tensor, self_cond: torch.Tensor | None,
                    kv: list[tuple[torch.Tensor, torch.Tensor]], masks: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The decoder pass of canvases [B, T] at `positions` over cached keys/values `kv` (per layer, the used
        slots), a function of its tensor arguments only: final normed hidden states. `masks` per attention kind:
        which keys each row sees ([B, 1, T, keys]), None where all of them. What `forward` runs, directly or as
        a trace (`TracedPasses`)."""
        b, t = tokens.shape
        x = self.self_conditioning(self.embed(tokens), self_cond)

        def attend(i, kind, proj, h, cos, sin):
            q, k, v = proj.qkv(h, cos, sin)
            out = _attend(q, k, v, kv[i][0], kv[i][1], masks[kind])[0]
            return proj.o_proj(out.transpose(1, 2).reshape(b, t, -1))

        return self._stack(x, positions, attend, decoder=True)

    def encode(self, tokens: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
               media: EncoderMedia | None = None) -> torch.Tensor:
        """Causal pass over `tokens` [B, T] (right-padded where `valid` is False); writes the cache. `media`: the
        images in it (see `forward`)."""
        return self.forward(tokens, cache, valid, denoise=False, media=media)

    def commit_and_denoise(self, committed: torch.Tensor, canvas: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`encode(committed, cache)` followed by a canvas's first `denoise(canvas, cache)` (no self-conditioning
        yet), as one pass over `[committed ; canvas]` per row: returns the canvas logits [B, C, V].

        The numbers are those of the two passes: the committed tokens' keys/values are written to the cache
        layer by layer before the canvas attends to it, attention and the experts run for the two parts
        separately (an expert's group of tokens is what it would be in its own pass, and so is its rounding),
        and everything else works position by position. What is saved is the per-op cost of a whole pass, and
        the matmuls run on twice the rows (`commit_fusable` says whether they round each row as before on this
        machine). `committed` [B, T] must be all valid tokens (a committed canvas)."""
        b, t = committed.shape
        c = canvas.shape[1]
        dev = committed.device
        valid = torch.ones_like(committed, dtype=torch.bool)
        cache.check_room(valid.sum(dim=1))
        enc_pos = cache.lengths[:, None] + torch.arange(t, device=dev)
        enc_rows = torch.zeros(b, dtype=torch.bool, device=dev)
        used_e, masks_e, plans = _attention_plan(cache, enc_pos, valid, enc_rows, valid)
        cache.commit(plans, enc_pos, valid)  # the positions now; the keys and values layer by layer below
        dec_pos = cache.lengths[:, None] + torch.arange(c, device=dev)
        used_d, masks_d, _ = _attention_plan(cache, dec_pos, torch.ones_like(canvas, dtype=torch.bool),
                                             ~enc_rows, None)
        kv = [(*before, k, v, *after) for before, k, v, after in zip(cache.views(used_e), cache.k, cache.v,
                                                                       cache.views(used_d))]
        hidden = self._passes.run_commit(committed, canvas, enc_pos, dec_pos, kv, masks_e, masks_d, plans)
        return self.logits(hidden[:, t:].contiguous())  # one matmul over the canvas rows, as a pass of their own

    def commit_canvas_pass(self, committed: torch.Tensor, canvas: torch.Tensor, enc_pos: torch.Tensor,
                           dec_pos: torch.Tensor, kv: list[tuple[torch.Tensor, ...]],
                           masks_e: dict[str, tuple[torch.Tensor | None, bool]],
                           masks_d: dict[str, tuple[torch.Tensor | None, bool]],
                           plans: dict[str, torch.Tensor]) -> torch.Tensor:
        """`commit_and_denoise`'s pass as a function of its arguments: per layer `kv` = (the committed tokens'
        view of the cache keys and values, the whole buffers they are written to, the canvas's view of them,
        which includes what this pass writes); returns the final hidden states of `[committed ; canvas]`."""
        b, t = committed.shape
        c = canvas.shape[1]
        x = torch.cat([self.embed(committed), self.self_conditioning(self.embed(canvas), None)], dim=1)

        def attend(i, kind, proj, h, cos, sin):
            q, k, v = proj.qkv(h, cos, sin)
            (q_e, q_d), (k_e, k_d), (v_e, v_d) = (z.split((t, c), dim=2) for z in (q, k, v))
            out_e, keys, values = _attend(q_e, k_e, v_e, kv[i][0], kv[i][1], *masks_e[kind])
            write_layer(kind, kv[i][2], kv[i][3], plans[kind], k_e, v_e, keys, values)
            out_d = _attend(q_d, k_d, v_d, kv[i][4], kv[i][5], *masks_d[kind])[0]  # sees what was just written
            return proj.o_proj(torch.cat([out_e, out_d], dim=2).transpose(1, 2).reshape(b, t + c, -1))

        decoder = (torch.arange(t + c, device=x.device) >= t).expand(b, t + c)  # which scalar: per position
        return self._stack(x, torch.cat([enc_pos, dec_pos], dim=1), attend, decoder=decoder, split=t)

    def commit_fusable(self, batch: int, committed: int, canvas: int) -> bool:
        """Whether `commit_and_denoise` gives the two passes' bits on this machine for `batch` rows: its matmuls run
        on `committed + canvas` positions per row at once, and each row must round as it does in a product over
        one part alone. That holds for MKL on the CPUs tried; it is a property of the BLAS library, not a contract,
        so it is checked (once per shape, thread count, device and dtype) on every linear layer shape of the
        stack with random inputs. Where it does not hold, generation encodes and denoises in separate passes."""
        key = (batch, committed, canvas, torch.get_num_threads(), self.device, self.dtype)
        if key not in self._fusable:
            self._fusable[key] = _rows_round_alike(self, batch, committed, canvas)
        return self._fusable[key]

    def vocab_rows_exact(self, rows: int, of: int) -> bool:
        """Whether the LM head and the expected embedding over `rows` of a pass's `of` positions round each of them
        as over all `of` (so that rows that stopped early can be left out of them: `denoise(rows=...)`, and the
        generation loop's self-conditioning input). MKL does for products of 12 rows or more on the CPUs tried, not
        for fewer: a property of the BLAS library, so it is checked once per pair of sizes, thread count, device,
        dtype and operand layout (`VocabMatmuls.rows_alike`)."""
        w = self.embed_tokens.weight
        layout = tuple(self._vocab.uses_copy(which, w, n, w.dtype)
                       for which in ("head", "expected") for n in (rows, of))
        key = (rows, of, torch.get_num_threads(), self.device, self.dtype, layout)
        if key not in self._vocab_rows:
            self._vocab_rows[key] = self._vocab.rows_alike(w, rows, of)
        return self._vocab_rows[key]

    def denoise(self, canvas: torch.Tensor, context: "KVCache | SequenceKV", self_cond_logits: torch.Tensor | None = None,
                self_cond_mask: torch.Tensor | None = None, self_cond_probs: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, self_cond_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over `canvas` [B, C] reading `context` (the KV cache at inference, the encoder's
        keys/values of whole sequences in training); returns fp32 logits [B, C, V].

        `self_cond_logits` are the previous step's (temperature-scaled) logits, or None on the first step;
        `self_cond_probs` may be given instead: their fp32 softmax, which the sampler has computed already, or
        `self_cond_embeddings`: `embed_probs` of those.
        `self_cond_mask` [B] zeroes the signal for some rows (training). `rows` [A] (KV cache only): the logits
        of these batch rows only, [A, C, V] — the rest of the pass is the same, only the LM head and the soft-cap
        skip the other rows (see `vocab_rows_exact`).
        """
        soft = self_cond_embeddings
        if self_cond_logits is not None:
            soft = self.soft_embeddings(self_cond_logits)
        elif self_cond_probs is not None:
            soft = self.embed_probs(self_cond_probs)
        if soft is not None and self_cond_mask is not None:
            soft = soft * self_cond_mask.to(soft.dtype)[:, None, None]
        if isinstance(context, KVCache):
            hidden = self.forward(canvas, context, None, True, soft)
            return self.logits(hidden if rows is None else hidden.index_select(0, rows))
        if rows is not None:
            raise ValueError("denoise(rows=...) needs a KVCache context")
        b, c = canvas.shape
        x = self.self_conditioning(self.embed(canvas), soft)
        masks = {kind: context.decoder_mask(kind, c) for kind in set(self.text.layer_types)}

        def attend(i, kind, proj, h, cos, sin):
            q, k, v = proj.qkv(h, cos, sin)
            out = _attend(q, k, v, *context.kv[i], masks[kind])[0]
            return proj.o_proj(out.transpose(1, 2).reshape(b, c, -1))

        return self.logits(self._stack(x, context.canvas_positions(c), attend, decoder=True))

    def encode_sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, "SequenceKV"]:
        """Causal pass over whole sequences [B, L] without a cache (training): the final hidden states and every
        layer's keys/values, from which the decoder can denoise a canvas placed anywhere in the sequence."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        q_pos, k_pos = positions[0][:, None], positions[0][None, :]
        causal = k_pos <= q_pos
        masks = {FULL: causal, SLIDING: causal & (k_pos > q_pos - self.text.sliding_window)}
        kv: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(self.layers)  # type: ignore[list-item]

        def attend(i, kind, proj, h, cos, sin):
            q, k, v = proj.qkv(h, cos, sin)
            kv[i] = (k, v)  # (by index: a checkpointed layer runs again in the backward pass)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[kind], scale=1.0, enable_gqa=True)
            return proj.o_proj(out.transpose(1, 2).reshape(b, t, -1))

        hidden = self._stack(self.embed(tokens), positions, attend, decoder=False)
        return hidden, SequenceKV(kv, self.text.layer_types, self.text.sliding_window)


def _sdpa_mask(mask: torch.Tensor, decoder_rows: torch.Tensor, fresh: bool) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA. Where the mask is plain causal or all-visible, leave it out as the
    reference does: the kernel then blocks its sums differently, and matching it keeps results bit-identical."""
    if fresh and not bool(decoder_rows.any()):
        return None, True  # nothing cached and no window cut: plain causal (right padding is never attended)
    if bool(decoder_rows.all()) and bool(mask.all()):
        return None, False
    return mask, False


@torch.no_grad()
def _rows_round_alike(model: DiffusionGemmaModel, batch: int, first: int, second: int) -> bool:
    """Every distinct linear layer shape: is `linear(x)` for x [batch, first + second, in] row for row equal to
    `linear` of each part of x on its own?"""
    g = torch.Generator(device=model.device).manual_seed(0)
    seen = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.shape in seen:
            continue
        seen.add(module.weight.shape)
        w = module.weight
        x = torch.randn(batch, first + second, w.shape[1], generator=g, device=w.device).to(w.dtype)
        whole = F.linear(x, w)
        if not (torch.equal(whole[:, :first], F.linear(x[:, :first].contiguous(), w))
                and torch.equal(whole[:, first:], F.linear(x[:, first:].contiguous(), w))):
            return False
    return True


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor,
            mask: torch.Tensor | None = None, is_causal: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA of queries q over `[cached ; new]` keys and values; returns (output, keys, values)."""
    keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=1.0,
                                         enable_gqa=True)
    return out, keys, values


def _attention_plan(cache: KVCache, positions: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor,
                    writes: torch.Tensor | None, blocks: torch.Tensor | None = None,
                    vision_mask: str = "gemma4") -> tuple[dict, dict, dict]:
    """Per attention kind: the cache slots in use, the write plan (encoder rows) and the SDPA (mask, is_causal)
    for new tokens at `positions` [B, T]; `rows` [B] marks canvas rows. `writes` None: every row is a canvas,
    nothing is written (no plans, no causal masks). `blocks` [B, T]: the image (or video frame) each new token
    belongs to (-1: none), whose tokens see each other both ways as `vision_mask` says (`_vision_overlay`)."""
    b, t = positions.shape
    used, masks, plans = {}, {}, {}
    for kind in cache.slot_pos:
        used[kind] = cache.used(kind)
        both_ways = torch.cat([cache.slot_pos[kind][:, :used[kind]] >= 0, valid], dim=1)[:, None, :]
        if writes is None:
            masks[kind] = _sdpa_mask(both_ways.expand(b, t, -1)[:, None], rows, fresh=False)
            continue
        plans[kind] = cache.plan_write(kind, positions, writes, used[kind])
        # padding tokens of encoder rows keep their (unused) positions: being causal, real queries never see them
        kpos = torch.cat([cache.slot_pos[kind][:, :used[kind]], positions], dim=1)[:, None, :]
        causal = (kpos >= 0) & (kpos <= positions[:, :, None])
        if kind == SLIDING:
            causal &= kpos > positions[:, :, None] - cache.window
        if blocks is not None:
            causal = _vision_overlay(causal, kind, blocks, used[kind], kpos > positions[:, :, None] - cache.window,
                                     vision_mask)
        masks[kind] = _sdpa_mask(torch.where(rows[:, None, None], both_ways, causal)[:, None], rows,
                                 fresh=blocks is None and used[kind] == 0 and (kind == FULL or t < cache.window))
    return used, masks, plans


def _vision_overlay(causal: torch.Tensor, kind: str, blocks: torch.Tensor, cached: int, in_window: torch.Tensor,
                    vision_mask: str) -> torch.Tensor:
    """The encoder mask [B, T, cached + T] with the tokens of each image block seeing each other both ways.
    `gemma4` (as the model was trained: Google's JAX model, transformers' Gemma 4): on sliding-window layers only,
    and within the window; full-attention layers stay causal. `transformers` (transformers 5.23 DiffusionGemma's
    `generate`): on every layer, past the window."""
    if kind == FULL and vision_mask == "gemma4":
        return causal
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    same = torch.cat([same.new_zeros(*same.shape[:2], cached), same], dim=2)
    if kind == SLIDING and vision_mask == "gemma4":
        return (causal | same) & in_window
    return causal | same


class SequenceKV:
    """The encoder's keys/values of whole sequences, seen by a decoder pass as the cache would be: a canvas
    starting at `canvas_start[b]` sees the positions before it (sliding layers: the last `window - 1`)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], kinds: list[str], window: int):
        self.kv, self.kinds, self.window = kv, kinds, window
        self.canvas_start: torch.Tensor | None = None

    def at(self, canvas_start: torch.Tensor) -> "SequenceKV":
        """The same keys/values, for canvases starting at `canvas_start` [B]."""
        view = SequenceKV(self.kv, self.kinds, self.window)
        view.canvas_start = canvas_start
        return view

    def canvas_positions(self, c: int) -> torch.Tensor:
        return self.canvas_start[:, None] + torch.arange(c, device=self.canvas_start.device)

    def decoder_mask(self, kind: str, c: int) -> torch.Tensor:
        length = self.kv[0][0].shape[2]
        k_pos = torch.arange(length, device=self.canvas_start.device)[None, :]
        start = self.canvas_start[:, None]
        keep = k_pos < start
        if kind == SLIDING:
            keep &= k_pos >= start - (self.window - 1)
        keep = torch.cat([keep, torch.ones(keep.shape[0], c, dtype=torch.bool, device=keep.device)], dim=1)
        return keep[:, None, None, :]

