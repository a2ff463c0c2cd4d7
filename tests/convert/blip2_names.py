"""Helpers of the BLIP-2 conversion tests: table checks by shape alone, and LAVIS's key names."""

import re

import numpy as np


def shape_problems(table, torch_shapes: dict, expected: dict) -> list[str]:
    """engine.to_mmjax's key and shape checks without arrays (real sizes do not fit in memory);
    `expected`: path -> shape or ShapeDtypeStruct; fused keys (one torch key, several paths) too."""
    problems, filled = [], set()
    for key, shape in torch_shapes.items():
        found = [(r, m) for r, regex in zip(table.rules, table._torch_res) if (m := regex.fullmatch(key))]
        if not found:
            problems.append(f"no rule: {key}")
            continue
        rl, match = found[0]
        paths = [p.format(**match.groupdict()) for p in rl.mmjax_paths]
        if any(p not in expected for p in paths):
            problems.append(f"no model path for {key}: {paths}")
            continue
        parts = [rl.transform.torch_shape(tuple(getattr(expected[p], "shape", expected[p]))) for p in paths]
        want = parts[0] if len(parts) == 1 else (sum(s[0] for s in parts), *parts[0][1:])
        if tuple(shape) != tuple(want):
            problems.append(f"{key}: torch {tuple(shape)}, mmjax needs {want}")
        filled.update(paths)
    return problems + [f"missing {p}" for p in expected if p not in filled]


def lavis_names(hf_state: dict) -> dict:
    """transformers BLIP-2 names -> LAVIS's (read from LAVIS's eva_vit.py, Qformer.py, blip2.py,
    blip2_qformer.py and blip2_opt.py; derived here independently of mmjax's table, to build a
    synthetic LAVIS state dict): EVA's fused qkv without bias plus q_bias / v_bias, `ln_vision`,
    BERT's `attention.self.*` under `Qformer.bert`, `opt_proj`, `opt_model`, stage 1's `vision_proj` /
    `text_proj`, and the position_ids buffer LAVIS's BertEmbeddings keeps."""
    out = {"Qformer.bert.embeddings.position_ids": np.arange(20)[None]}
    fixed = {"vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
             "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
             "embeddings.word_embeddings.weight": "Qformer.bert.embeddings.word_embeddings.weight",
             "embeddings.position_embeddings.weight": "Qformer.bert.embeddings.position_embeddings.weight"}
    vit, eva = r"vision_model\.encoder\.layers\.(\d+)\.", r"visual_encoder.blocks.\1."
    renames = [(r"vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
               (vit + r"layer_norm(\d)\.", eva + r"norm\2."), (vit + r"self_attn\.projection\.", eva + "attn.proj."),
               (vit + r"self_attn\.", eva + "attn."), (vit + r"mlp\.", eva + "mlp."),
               (r"vision_model\.post_layernorm\.", "ln_vision."),
               (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
               (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
                r"Qformer.bert.encoder.layer.\1.\2.self."),
               (r"qformer\.", "Qformer.bert."), (r"language_projection\.", "opt_proj."),
               (r"language_model\.", "opt_model."), (r"vision_projection\.", "vision_proj."),
               (r"text_projection\.", "text_proj.")]
    for key, value in hf_state.items():
        value = value.numpy()
        if key.endswith("self_attn.qkv.bias"):
            block = re.sub(vit + r"self_attn\.qkv\.bias", eva + "attn", key)
            out[f"{block}.q_bias"], _, out[f"{block}.v_bias"] = np.split(value, 3)
            continue
        if key in fixed:
            out[fixed[key]] = value
            continue
        for pattern, replacement in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key, count=1)
                break
        out[key] = value
    return out

