"""Generation for every generative model: one jitted, shardable loop over a fixed-size cache.

    config        GenerationConfig (transformers' `generate` options), static / traced split
    decoder       the Decoder interface (init_cache, prefill, step, cache_layout); FlaxDecoder
                  adapts modules that follow mmjax.layers' `decode=True` cache convention
    cache_layout  where a cache keeps its batch: sharding, beam copies and reordering
    logits        repetition penalty, minimum length, temperature, top-k, top-p
    sampling      greedy decoding and sampling
    beam_search   beam search / beam sampling with transformers' scoring and finishing rules
    driver        Generator: prompt alignment, prefill, the search loop, under a mesh or not

A package of its own (not mmjax.layers): it drives whole models, where layers are their parts.

    generator = generate.Generator(generate.FlaxDecoder(model), max_length=32)
    out = generator(params, prompt, generate.GenerationConfig(max_new_tokens=20, num_beams=3,
                    eos_token_id=102), prompt_mask=mask, inputs={"context": image_tokens})
"""

from mmjax.generate.cache_layout import LeafLayout, layers_cache_layout
from mmjax.generate.config import GenerationConfig
from mmjax.generate.decoder import Decoder, FlaxDecoder
from mmjax.generate.driver import GenerationOutput, Generator, left_align

__all__ = ["GenerationConfig", "Decoder", "FlaxDecoder", "GenerationOutput", "Generator", "LeafLayout",
           "layers_cache_layout", "left_align"]
