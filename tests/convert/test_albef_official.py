"""Official ALBEF checkpoints <-> mmjax (mmjax/convert/albef.py).

There is no ALBEF package, so the reference is ALBEF's module layout assembled from the libraries
its code derives from: timm's VisionTransformer (DeiT-style, no head) as `visual_encoder`,
transformers' BertEmbeddings / BertLayer (cross-attention from the fusion layer on) / BertOnlyMLMHead
as `text_encoder.{bert,cls}`, and the projections, ITM head and temperature; its forward pass
follows model_pretrain.py. Its state dict carries the official key names (momentum copies and
queues added for the pretraining state). Checked: `mmjax-convert --source albef` (tiny, through a
.pth file) and the real size (ViT-B/16 at 256, BERT-base) give the reference's ITC embeddings, ITM
logits and MLM logits; the full pretraining state round-trips exactly; the export writes the
official keys; bad checkpoints raise errors that list the problems.
"""

import copy
import functools

import jax
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

import mmjax
from mmjax import pretrained
from mmjax.convert import albef as albef_convert
from mmjax.convert import api, engine
from mmjax.models import albef

TINY = dict(image=32, patch=8, v_width=128, v_depth=2, t_width=128, t_depth=4, fusion=2, mlp=256, vocab=99,
            max_len=24, embed_dim=16)
REAL = dict(image=256, patch=16, v_width=768, v_depth=12, t_width=768, t_depth=12, fusion=6, mlp=3072, vocab=30522,
            max_len=512, embed_dim=256)


class _Namespace(torch.nn.Module):
    pass


class OfficialLayoutAlbef(torch.nn.Module):
    """ALBEF's parameter layout and forward pass (model_pretrain.py) from timm and transformers parts."""

    def __init__(self, s: dict):
        super().__init__()
        self.fusion = s["fusion"]
        self.visual_encoder = VisionTransformer(
            img_size=s["image"], patch_size=s["patch"], embed_dim=s["v_width"], depth=s["v_depth"],
            num_heads=s["v_width"] // 64, mlp_ratio=s["mlp"] / s["v_width"], qkv_bias=True, num_classes=0,
            global_pool="", norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
        config = BertConfig(vocab_size=s["vocab"], hidden_size=s["t_width"], num_hidden_layers=s["t_depth"],
                            num_attention_heads=s["t_width"] // 64, intermediate_size=s["mlp"],
                            max_position_embeddings=s["max_len"], hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        config._attn_implementation = "eager"
        fusion_config = copy.deepcopy(config)
        fusion_config.is_decoder, fusion_config.add_cross_attention = True, True
        self.text_encoder = _Namespace()
        self.text_encoder.bert = _Namespace()
        self.text_encoder.bert.embeddings = BertEmbeddings(config)
        self.text_encoder.bert.encoder = _Namespace()
        self.text_encoder.bert.encoder.layer = torch.nn.ModuleList(
            [BertLayer(fusion_config if i >= s["fusion"] else config, layer_idx=i) for i in range(s["t_depth"])])
        for layer in self.text_encoder.bert.encoder.layer[s["fusion"]:]:
            layer.attention.self.is_causal = False             # ALBEF's fusion layers are bidirectional
        self.text_encoder.cls = BertOnlyMLMHead(config)
        head = self.text_encoder.cls.predictions
        head.decoder.weight = self.text_encoder.bert.embeddings.word_embeddings.weight    # tied, as xbert
        head.decoder.bias = head.bias
        self.vision_proj = torch.nn.Linear(s["v_width"], s["embed_dim"])
        self.text_proj = torch.nn.Linear(s["t_width"], s["embed_dim"])
        self.itm_head = torch.nn.Linear(s["t_width"], 2)
        self.temp = torch.nn.Parameter(torch.ones([]) * 0.07)

    def official_state_dict(self) -> dict[str, np.ndarray]:
        state = {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}
        positions = self.text_encoder.bert.embeddings.position_embeddings.num_embeddings
        state[albef_convert.POSITION_IDS] = np.arange(positions)[None]       # a buffer in ALBEF's xbert
        return state

    @torch.no_grad()
    def forward(self, images: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        image_embeds = self.visual_encoder.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        ids, valid = torch.from_numpy(tokens).long(), torch.from_numpy(mask)
        extended = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        layers = self.text_encoder.bert.encoder.layer
        x = self.text_encoder.bert.embeddings(input_ids=ids)
        for layer in layers[:self.fusion]:
            x = layer(x, attention_mask=extended)
        text_embeds = x
        for layer in layers[self.fusion:]:
            x = layer(x, attention_mask=extended, encoder_hidden_states=image_embeds)
        normalize = functools.partial(torch.nn.functional.normalize, dim=-1)
        return {"image_embeds": normalize(self.vision_proj(image_embeds[:, 0])).numpy(),
                "text_embeds": normalize(self.text_proj(text_embeds[:, 0])).numpy(),
                "itm_logits": self.itm_head(x[:, 0]).numpy(), "logits": self.text_encoder.cls(x).numpy(),
                "logit_scale": (1.0 / self.temp.clamp(0.001, 0.5)).numpy()}


def _reference(s: dict, seed: int = 0) -> OfficialLayoutAlbef:
    torch.manual_seed(seed)
    model = OfficialLayoutAlbef(s).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # move norms, biases, class token and positions off their init values
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "pos_embed" in name or "cls_token" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _inputs(s: dict, batch: int = 2, length: int = 7):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(batch, s["image"], s["image"], 3)).astype(np.float32)
    tokens = rng.integers(5, s["vocab"], (batch, length)).astype(np.int32)
    tokens[:, 0] = 2
    mask = np.ones((batch, length), bool)
    mask[-1, length - 2:] = False
    tokens[~mask] = 0
    return images, tokens, mask


def _convert(state: dict):
    plan = albef_convert.from_official(state)
    module = pretrained.build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(module, plan.inputs))
    return plan, module, {"params": engine.unflatten(flat)}


def _assert_close(got: dict, want: dict, atol: float) -> dict:
    worst = {}
    for key, value in want.items():
        worst[key] = float(np.max(np.abs(np.asarray(got[key]) - value)))
        np.testing.assert_allclose(got[key], value, atol=atol, rtol=1e-5, err_msg=key)
    return worst


@pytest.fixture(scope="module")
def tiny():
    return _reference(TINY)


def test_cli_import_of_a_pth_gives_the_reference_outputs(tiny, tmp_path):
    state = tiny.official_state_dict()
    momentum = {k.replace(p, f"{p}_m", 1): v for k, v in state.items()
                for p in ("visual_encoder", "text_encoder", "vision_proj", "text_proj") if k.startswith(p + ".")}
    queues = {"image_queue": np.ones((16, 32), np.float32), "text_queue": np.ones((16, 32), np.float32),
              "queue_ptr": np.zeros((1,), np.int64)}
    path = str(tmp_path / "ALBEF_tiny.pth")
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in {**state, **momentum, **queues}.items()},
                "epoch": 0}, path)
    plan = api.import_checkpoint("albef", path, str(tmp_path / "model"))
    assert plan.notes and "momentum" in plan.notes[0]
    model, variables = mmjax.load(str(tmp_path / "model"))
    images, tokens, mask = _inputs(TINY)
    worst = _assert_close(jax.jit(model.apply)(variables, images, tokens, mask), tiny(images, tokens, mask), 2e-5)
    print(f"tiny ALBEF via mmjax-convert --source albef: max |diff| {worst}")


def test_export_writes_the_official_keys_and_round_trips(tiny, tmp_path):
    state = tiny.official_state_dict()
    _, _, variables = _convert(state)
    export = api.as_export(albef_convert.official_export({}))
    written = export.state_dict(engine.flatten(variables["params"]), what="ALBEF state dict")
    assert sorted(written) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(written[key], state[key], err_msg=key)


def test_pretraining_state_round_trips_exactly(tiny):
    state = tiny.official_state_dict()
    rng = np.random.default_rng(3)
    full = dict(state)
    for key, value in state.items():
        for prefix in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            if key.startswith(prefix + "."):
                momentum = value if value.dtype.kind == "i" else (value + 0.01 * rng.normal(size=value.shape))
                full[key.replace(prefix, f"{prefix}_m", 1)] = momentum.astype(value.dtype)
    tied = "text_encoder_m.cls.predictions.decoder."
    full[tied + "weight"] = full["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    full[tied + "bias"] = full["text_encoder_m.cls.predictions.bias"]
    full["image_queue"] = rng.normal(size=(16, 48)).astype(np.float32)
    full["text_queue"] = rng.normal(size=(16, 48)).astype(np.float32)
    full["queue_ptr"] = np.array([32], np.int64)
    _, module, variables = _convert(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])
    train_state = albef_convert.to_train_state(full, abstract)
    assert train_state["queue"]["image"].shape == (48, 16) and int(train_state["queue"]["pointer"]) == 32
    np.testing.assert_array_equal(train_state["ema_params"]["itm_head"]["kernel"],
                                  train_state["params"]["itm_head"]["kernel"])   # ALBEF has no momentum ITM head
    back = albef_convert.from_train_state(**train_state)
    assert sorted(back) == sorted(full)
    for key, value in full.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bad_checkpoints_list_every_problem(tiny):
    state = tiny.official_state_dict()
    _, module, variables = _convert(state)
    broken = dict(state)
    del broken["visual_encoder.blocks.1.norm2.weight"]
    broken["itm_head.weight"] = np.zeros((3, TINY["t_width"]), np.float32)
    broken["text_encoder.bert.pooler.dense.weight"] = np.zeros((4, 4), np.float32)
    plan = albef_convert.from_official(state)
    with pytest.raises(engine.ConversionError) as err:
        engine.to_mmjax(broken, plan.table, pretrained.abstract_params(module, plan.inputs))
    message = str(err.value)
    for text in ("visual_encoder/encoder/layer_1/ln2/scale", "itm_head.weight: checkpoint has (3, 128)",
                 "text_encoder.bert.pooler.dense.weight"):
        assert text in message, message
    untied = dict(state, **{"text_encoder.cls.predictions.decoder.bias": np.ones(TINY["vocab"], np.float32)})
    with pytest.raises(engine.ConversionError, match="untied MLM decoder"):
        albef_convert.from_official(untied)
    with pytest.raises(engine.ConversionError, match="Not an ALBEF checkpoint"):
        albef_convert.from_official({"cls_token": np.zeros((1, 1, 8), np.float32)})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])
    with pytest.raises(engine.ConversionError, match="missing model parameters"):
        albef_convert.to_train_state(state, abstract)      # no momentum copies, no queues


def test_real_size_albef_matches_the_reference(tmp_path):
    """ViT-B/16 at 256 pixels and BERT-base with fusion from layer 6, as ALBEF_4M.pth: every key
    converts, and ITC embeddings, ITM and MLM logits match the reference."""
    reference = _reference(REAL, seed=1)
    state = reference.official_state_dict()
    plan, module, variables = _convert(state)
    assert plan.fields["text"]["cross_attention_from"] == 6 and plan.inputs[0]["shape"] == [1, 256, 256, 3]
    images, tokens, mask = _inputs(REAL, batch=1, length=8)
    want = reference(images, tokens, mask)
    del reference, state
    worst = _assert_close(jax.jit(module.apply)(variables, images, tokens, mask), want, 2e-4)
    print(f"real-size ALBEF (ViT-B/16 @256 + BERT-base, fusion from 6): max |diff| {worst}")
    assert isinstance(module, albef.Albef)
