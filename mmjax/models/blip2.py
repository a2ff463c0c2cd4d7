"""BLIP-2 (Li et al. 2023) as transformers implements it: a frozen image encoder, the Q-Former
(mmjax.models.qformer) and the projections around it.

    Blip2Vision     EVA-CLIP ViT-g/14 as BLIP-2 uses it (transformers' Blip2VisionModel): mmjax's
                    ViT with other defaults: width 1408, 39 of EVA's 40 layers (the checkpoints hold
                    39), 16 heads, mlp 6144, patch 14, pre-LN (eps 1e-6), exact GELU, class token,
                    learned positions, the final norm on every token, and q and v biases but no k
                    bias (a key bias adds the same number to every logit of a query: softmax
                    cancels it, so EVA leaves it out)
    Blip2Bridge     vision -> 32 learned queries through the Q-Former -> `language_projection`:
                    transformers' Blip2Model.get_qformer_features and the soft prompt that
                    Blip2ForConditionalGeneration feeds its language model, without the LM
                    (`prompt_embeds` is where a decoder LM plugs in; Blip2LM holds one)
    Blip2LM         Blip2ForConditionalGeneration with a decoder LM (OPT; LLaMA-family the same way,
                    as MiniGPT-4): the projected queries are a soft prompt before the text
                    embeddings of mmjax.models.decoder_lm.DecoderLM; `text_lm_loss` scores the
                    text tokens only, `generate_text` captions or answers a prompt after the image
    Blip2Retrieval  Blip2ForImageTextRetrieval: ITM (queries + text through the Q-Former, the ITM
                    head averaged over the query outputs) and ITC (projected, normalised query
                    outputs against the text [CLS], the best query's similarity)
    Blip2Pretrain   stage 1 as LAVIS's Blip2Qformer: Blip2Retrieval + the learned temperature + the
                    ITG head (BERT's LM head, decoder tied to the word embeddings) under the
                    multimodal causal mask; `stage1_train_flops` / `stage2_train_flops` count
                    training FLOPs with frozen towers forward only

Outputs: "tokens" (B, Q, width) Q-Former query outputs (Blip2LM: the LM's final states on the
text); "prompt_embeds" (B, Q, lm_width); "logits" (B, T, vocab) on the text; "itm_logits" (B, 2);
"image_embeds" (B, Q, E) one normalised embedding per query (not (B, E) as CLIP's), "text_embeds"
(B, E); `itc_scores(image_embeds, text_embeds)` (images, texts).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, generate, layers
from mmjax.losses import language
from mmjax.models import decoder_lm, vit
from mmjax.models import qformer as qformer_lib

# Salesforce/blip2-*: the Q-Former is BERT-base with 32 queries, cross-attending every 2nd layer.
QFORMER_DEFAULTS = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, num_queries=32, cross_attention_frequency=2,
                        ln_eps=1e-12, act="gelu", dropout=0.0)
_NORMAL = nn.initializers.normal(0.02)


class Blip2Vision(vit.ViT):
    """EVA-CLIP ViT-g/14 with BLIP-2's 39 layers (see the module docstring). `qkv_bias` switches
    the q and v biases (transformers' qkv_bias); the key never has one, the output always."""

    variant: str | None = "g/14"
    depth: int | None = 39
    pool: str = "none"
    class_token: bool | None = True
    ln_eps: float = 1e-6

    def block_config(self) -> layers.BlockConfig:
        return super().block_config().replace(k_bias=False, out_bias=True)


def _dense(features: int, dtype: layers.Dtype, name: str, axes: tuple = ("embed", "mlp")) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name, kernel_init=layers.dense_init(axes, _NORMAL),
                    bias_init=layers.dense_init(axes[1:], nn.initializers.zeros))


def _normalize(x: jax.Array) -> jax.Array:
    """L2 normalisation as torch's F.normalize (eps 1e-12 on the norm)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def itc_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """(images, texts) ITC similarities: each image's best query against each text's [CLS]
    (BLIP-2's max over queries; transformers' logits_per_image, no temperature)."""
    return jnp.einsum("iqe,te->itq", image_embeds, text_embeds).max(axis=-1)


class _QueryTower(nn.Module):
    """What the BLIP-2 models share: the vision tower, the learned queries and the Q-Former."""

    vision: dict | None = None        # Blip2Vision fields over its defaults
    qformer_fields: dict | None = None   # QFormer fields over QFORMER_DEFAULTS
    dtype: layers.Dtype = jnp.float32

    def qformer_arch(self) -> dict:
        return {**QFORMER_DEFAULTS, **(self.qformer_fields or {})}

    def setup_towers(self, text_ffn: bool) -> None:
        fields = {**self.qformer_arch(), "text_ffn": text_ffn}
        self.vision_model = Blip2Vision(**(self.vision or {}), dtype=self.dtype)
        self.query_tokens = self.param("query_tokens", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, None, "embed")), (1, fields["num_queries"], fields["width"]))
        self.qformer = qformer_lib.QFormer(**fields, dtype=self.dtype)

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, 1 + patches, vision width): the vision tower's normed tokens (Blip2Model's
        get_image_features last_hidden_state)."""
        return self.vision_model(images, train=train)["tokens"]

    def expand_queries(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.query_tokens, (batch, *self.query_tokens.shape[1:]))

    def query_states(self, image_tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, Q, width): the queries through the Q-Former, cross-attending to every image token."""
        return self.qformer(self.expand_queries(image_tokens.shape[0]), context=image_tokens, train=train)["tokens"]


class Blip2Bridge(_QueryTower):
    """Images -> Q-Former query features -> the LM's input width (see the module docstring).

    `__call__(images)` returns "tokens" (B, Q, width), Blip2Model.get_qformer_features, and, with
    `lm_width`, "prompt_embeds" (B, Q, lm_width): the soft prompt that precedes the text
    embeddings of a frozen decoder LM (OPT, LLaMA) or the encoder input of Flan-T5.
    """

    lm_width: int | None = None       # the language model's hidden size; None: no projection

    def setup(self):
        self.setup_towers(text_ffn=False)
        if self.lm_width is not None:
            self.language_projection = _dense(self.lm_width, self.dtype, "language_projection")

    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        states = self.query_states(self.encode_image(images, train=train), train=train)
        out = {"tokens": states}
        if self.lm_width is not None:
            out["prompt_embeds"] = self.project(states)
        return out

    def project(self, query_states: jax.Array) -> jax.Array:
        """(B, Q, lm_width) float32: the queries as LM input embeddings."""
        return self.language_projection(query_states.astype(self.dtype)).astype(jnp.float32)


class Blip2LM(_QueryTower):
    """BLIP-2 stage 2 with a decoder LM, as transformers' Blip2ForConditionalGeneration.

    `__call__(images, tokens, mask)`: the image's Q queries, projected to the LM width, take the
    first Q positions (transformers' image placeholders in input_ids, LAVIS's `inputs_opt`), the
    text tokens follow (mask True at real tokens; right padding for training). Returns "logits"
    and "tokens" (the LM's final states) at the text positions only, and "prompt_embeds" (B, Q,
    lm width). The LM's positions count the queries, as transformers' cumsum of the attention mask.
    Whether a tower is frozen is the task's business: this module only composes.
    """

    lm: dict | None = None            # DecoderLM fields, e.g. {"variant": "opt-2.7b"}

    @property
    def lm_fields(self) -> dict:
        """The DecoderLM fields (a subclass may default them)."""
        return self.lm or {}

    @nn.nowrap
    def language_arch(self) -> dict:
        return decoder_lm.DecoderLM(**self.lm_fields).arch()

    def setup(self):
        self.setup_towers(text_ffn=False)
        self.language_projection = _dense(self.language_arch()["embed_dim"], self.dtype, "language_projection")
        self.language_model = decoder_lm.DecoderLM(**self.lm_fields, dtype=self.dtype)

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        prompt = self.image_prompt(images, train=train)
        prompt_mask = jnp.ones(prompt.shape[:2], bool)
        out = self.language_model.after_prefix(tokens, prefix_mask=prompt_mask, prefix_embeds=prompt, mask=mask,
                                               train=train)
        return {**out, "prompt_embeds": prompt}

    def image_prompt(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, Q, lm width) float32: the soft prompt (Blip2ForConditionalGeneration.get_image_features)."""
        states = self.query_states(self.encode_image(images, train=train), train=train)
        return self.language_projection(states.astype(self.dtype)).astype(jnp.float32)


def text_lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array, prompt_length: int = 1
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on the text of Blip2LM's output: padding and the first
    `prompt_length` tokens are not scored (1: OPT's BOS, as LAVIS, whose targets also mask the
    prompt "Question: ... Answer:"; pass its length with the BOS). The queries are never scored,
    as transformers' labels with -100 on the placeholders."""
    labels = language.labels_from_tokens(tokens, mask, prefix_length=prompt_length)
    return language.token_cross_entropy(logits, language.causal_lm_labels(labels))


def generate_text(model: nn.Module, variables: dict, images: jax.Array, prompt: jax.Array,
                  config: generate.GenerationConfig, *, prompt_mask: jax.Array | None = None,
                  generator: generate.Generator | None = None) -> generate.GenerationOutput:
    """Tokens after the image and `prompt` (captioning: the BOS alone; VQA: BOS + "Question: ...
    Answer:"), as transformers' Blip2ForConditionalGeneration.generate: the soft prompt is computed
    once, then the LM alone decodes with its KV cache. Pass a `generator` (built with
    `language_generator`) to reuse its compiled program across calls. `model`: a Blip2LM, or any
    bridge with its `image_prompt` and `lm_fields` (MiniGPT4, resampler_lm.ResamplerLM)."""
    image_prompt = jax.jit(lambda v, x: model.apply(v, x, method="image_prompt"))(variables, images)
    if generator is None:
        generator = language_generator(model, config.total_length(prompt.shape[1]))
    inputs = {"prefix_embeds": image_prompt, "prefix_mask": jnp.ones(image_prompt.shape[:2], bool)}
    return generator(variables["params"]["language_model"], prompt, config, prompt_mask=prompt_mask, inputs=inputs)


def language_generator(model: Blip2LM, max_length: int, **kwargs) -> generate.Generator:
    """A Generator of `model`'s language model after the soft prompt (max_length counts the token
    prompt and the new tokens; kwargs: mesh, rules)."""
    lm = decoder_lm.DecoderLM(**model.lm_fields, dtype=model.dtype)
    return generate.Generator(decoder_lm.prefix_decoder(lm), max_length, **kwargs)


class Blip2Retrieval(_QueryTower):
    """BLIP-2's stage-1 heads as transformers' Blip2ForImageTextRetrieval (see the module docstring).

    `__call__(images, tokens, mask)` pairs images[i] with tokens[i] ([CLS] first; mask True at
    real tokens) and returns "itm_logits" (B, 2), "image_embeds" (B, Q, E) and "text_embeds"
    (B, E); `itc_scores(out["image_embeds"], out["text_embeds"])` is use_image_text_matching_head=False.
    """

    vocab_size: int = 30522
    max_len: int = 512
    embed_dim: int = 256              # image_text_hidden_size

    def setup(self):
        self.setup_towers(text_ffn=True)
        width = self.qformer_arch()["width"]
        self.embeddings = qformer_lib.TextEmbeddings(self.vocab_size, width, self.max_len)
        self.vision_projection = _dense(self.embed_dim, self.dtype, "vision_projection")
        self.text_projection = _dense(self.embed_dim, self.dtype, "text_projection")
        self.itm_head = _dense(2, self.dtype, "itm_head", ("embed", "classes"))

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        image_tokens = self.encode_image(images, train=train)
        return {"itm_logits": self.match(tokens, mask, image_tokens, train=train),
                "image_embeds": self.embed_image(image_tokens, train=train),
                "text_embeds": self.embed_text(tokens, mask, train=train)}

    def embed_image(self, image_tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, Q, embed_dim): each query's normalised ITC embedding."""
        return _normalize(self.vision_projection(self.query_states(image_tokens, train=train).astype(self.dtype)))

    def embed_text(self, tokens: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """(B, embed_dim): the normalised ITC embedding of the text [CLS] (text alone, no queries)."""
        states = self.qformer(self.embeddings(tokens), mask, num_queries=0, train=train)["tokens"]
        return _normalize(self.text_projection(states[:, 0].astype(self.dtype)))

    def match(self, tokens: jax.Array, mask: jax.Array | None, image_tokens: jax.Array, *,
              train: bool = False) -> jax.Array:
        """(B, 2) ITM logits of text i against image i: queries and text share self-attention
        (bidirectional), the queries cross-attend to the image, the head averages the queries."""
        batch, num_queries = tokens.shape[0], self.query_tokens.shape[1]
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((batch, num_queries), bool), mask.astype(bool)], axis=1)
        embeds = self.embeddings(tokens, self.expand_queries(batch))
        states = self.qformer(embeds, mask, image_tokens, num_queries=num_queries, train=train)["tokens"]
        return self.itm_head(states[:, :num_queries].astype(self.dtype)).astype(jnp.float32).mean(axis=1)


def multimodal_causal_mask(num_queries: int, mask: jax.Array) -> jax.Array:
    """(B, 1, Q + T, Q + T) bool, True = may attend: ITG's mask (BLIP-2 Fig. 2). Queries see the
    queries only, text sees every query and the text up to itself; `mask` (B, T) drops padding
    keys. LAVIS gets the same by feeding the text the queries' cached keys and values."""
    length = num_queries + mask.shape[1]
    rows, cols = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    pattern = (cols < num_queries) | ((rows >= num_queries) & (cols <= rows))
    keys = jnp.concatenate([jnp.ones((mask.shape[0], num_queries), bool), mask.astype(bool)], axis=1)
    return pattern[None, None] & keys[:, None, None, :]


class Blip2Pretrain(Blip2Retrieval):
    """BLIP-2 stage 1 (LAVIS blip2_qformer.Blip2Qformer): Blip2Retrieval's ITC and ITM heads, a
    learned temperature `temp` (0.07) and the ITG head, BERT's LM head on the Q-Former's text
    states (transform: dense, exact GELU, LayerNorm; decoder tied to the word embeddings, with
    its own bias). `generate_logits` is ITG: queries and text under the multimodal causal mask."""

    temperature_init: float = 0.07

    def setup(self):
        super().setup()
        width = self.qformer_arch()["width"]
        self.temp = self.param("temp", nn.with_logical_partitioning(
            nn.initializers.constant(self.temperature_init), ()), ())
        self.lm_transform = _dense(width, self.dtype, "lm_transform", ("embed", "mlp"))
        self.lm_norm = layers.LayerNorm(self.qformer_arch()["ln_eps"], name="lm_norm")
        self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                  (self.vocab_size,))

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        out = super().__call__(images, tokens, mask, train=train)
        image_tokens = self.encode_image(images, train=train)
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask
        return {**out, "logits": self.generate_logits(tokens, mask, image_tokens, train=train)}

    def generate_logits(self, tokens: jax.Array, mask: jax.Array, image_tokens: jax.Array, *,
                        train: bool = False) -> jax.Array:
        """(B, T, vocab) float32 ITG logits at the text positions (tokens start with [DEC])."""
        batch, num_queries = tokens.shape[0], self.query_tokens.shape[1]
        embeds = self.embeddings(tokens, self.expand_queries(batch))
        states = self.qformer(embeds, multimodal_causal_mask(num_queries, mask), image_tokens,
                              num_queries=num_queries, train=train)["tokens"][:, num_queries:]
        h = nn.gelu(self.lm_transform(states.astype(self.dtype)), approximate=False)
        h = self.lm_norm(h)
        return (self.embeddings.attend(h.astype(jnp.float32)) + self.lm_bias).astype(jnp.float32)

    def temperature(self) -> jax.Array:
        """The ITC temperature, clipped to [0.001, 0.5] as LAVIS clamps it before every step."""
        return jnp.clip(self.temp, 0.001, 0.5)


# --- analytic FLOPs (mmjax.flops): frozen towers count forward only (no weight gradient) -----------

def qformer_flops(arch: dict, num_queries: int, text_len: int, image_tokens: int, image_width: int) -> float:
    """Forward FLOPs of one Q-Former pass over `num_queries` queries and `text_len` text tokens."""
    w, m, length = arch["width"], arch["mlp_dim"], num_queries + text_len
    layer = 4 * flops.dense(length, w, w) + flops.attention(length, length, w) + 2 * flops.dense(length, w, m)
    cross = (2 * flops.dense(num_queries, w, w) + 2 * flops.dense(image_tokens, image_width, w)
             + flops.attention(num_queries, image_tokens, w))
    crossing = sum(1 for i in range(arch["depth"]) if i % arch["cross_attention_frequency"] == 0)
    return arch["depth"] * layer + (crossing * cross if num_queries else 0.0)


def decoder_lm_flops(lm: decoder_lm.DecoderLM, tokens: int) -> dict[str, float]:
    """Forward FLOPs of the decoder LM on `tokens` positions: "linear" (projections, MLP, head)
    and "attention" (scores and weighted values)."""
    a = lm.arch()
    heads = a["num_heads"]
    head_dim = lm.head_dim or a["width"] // heads
    kv_heads = lm.num_kv_heads or heads
    mlp = (2 if a["kind"] == "opt" else 3) * flops.dense(tokens, a["width"], a["mlp_dim"])
    layer = (2 * flops.dense(tokens, a["width"], heads * head_dim)
             + 2 * flops.dense(tokens, a["width"], kv_heads * head_dim) + mlp)
    linear = a["depth"] * layer + flops.dense(tokens, a["embed_dim"], a["vocab_size"])
    if a["embed_dim"] != a["width"]:
        linear += 2 * flops.dense(tokens, a["embed_dim"], a["width"])
    return {"linear": linear, "attention": a["depth"] * flops.attention(tokens, tokens, heads * head_dim)}


def _vision(model: _QueryTower, image_hw: tuple[int, int]) -> tuple[dict[str, float], int, int]:
    tower = Blip2Vision(**(model.vision or {}))
    return vit.forward_flops(tower, image_hw), vit.tokens_seen(tower, image_hw), tower.arch()["width"]


def stage1_train_flops(model: Blip2Pretrain, image_hw: tuple[int, int], length: int,
                       vision_frozen: bool = True) -> dict[str, float]:
    """Training FLOPs of one stage-1 example by part: the (frozen: forward only) image encoder;
    the Q-Former's queries (ITC), text alone (ITC), 3 ITM pairs and ITG, and the heads, x3."""
    vision, image_tokens, image_width = _vision(model, image_hw)
    arch, q = model.qformer_arch(), model.qformer_arch()["num_queries"]
    w = arch["width"]
    passes = (qformer_flops(arch, q, 0, image_tokens, image_width) + qformer_flops(arch, 0, length, 0, image_width)
              + 4 * qformer_flops(arch, q, length, image_tokens, image_width))
    heads = (flops.dense(q, w, model.embed_dim) + flops.dense(1, w, model.embed_dim) + 3 * flops.dense(q, w, 2)
             + flops.dense(length, w, w) + flops.dense(length, w, model.vocab_size))
    factor = 1.0 if vision_frozen else flops.TRAIN_FACTOR
    return {**{f"vision_{k}": factor * v for k, v in vision.items()},
            "qformer": flops.TRAIN_FACTOR * passes, "heads": flops.TRAIN_FACTOR * heads}


def stage2_train_flops(model: Blip2LM, image_hw: tuple[int, int], length: int, vision_frozen: bool = True,
                       lm_frozen: bool = True, qformer_frozen: bool = False) -> dict[str, float]:
    """Training FLOPs of one stage-2 example by part: the image encoder (frozen: forward only),
    the Q-Former (x3; frozen, as MiniGPT-4's: forward only) and projection (x3; x2 after a frozen
    Q-Former, no input gradient), and the LM on queries + `length` other tokens: frozen, its weight
    gradients are skipped but the activation gradients flow back to the soft prompt (2x its matmuls
    with weights, 3x its attention)."""
    vision, image_tokens, image_width = _vision(model, image_hw)
    arch, q = model.qformer_arch(), model.qformer_arch()["num_queries"]
    lm = decoder_lm.DecoderLM(**model.lm_fields)
    qformer = qformer_flops(arch, q, 0, image_tokens, image_width)
    projection = flops.dense(q, arch["width"], model.language_arch()["embed_dim"])
    language = decoder_lm_flops(lm, q + length)
    return {**{f"vision_{k}": (1.0 if vision_frozen else flops.TRAIN_FACTOR) * v for k, v in vision.items()},
            "qformer": (1.0 if qformer_frozen else flops.TRAIN_FACTOR) * qformer,
            "projection": (2.0 if qformer_frozen else flops.TRAIN_FACTOR) * projection,
            "lm_linear": (2.0 if lm_frozen else flops.TRAIN_FACTOR) * language["linear"],
            "lm_attention": flops.TRAIN_FACTOR * language["attention"]}
