"""BLIP image–text retrieval fine-tune on Flickr30K (Li et al. 2022, Sec. 5.1; the official
configs/retrieval_flickr.yaml, read from memory of the repository, not re-checked here: the
stored index holds only retrieval_coco.yaml).

The COCO recipe (experiments/blip/retrieval_coco.py: objective, optimizer, augmentation) with
Flickr's settings: BLIP starts Flickr fine-tuning from its COCO-fine-tuned retrieval model
(model_base_retrieval_coco.pth; transformers: Salesforce/blip-itm-base-coco), batch 32 per GPU on
8 GPUs = 256, lr 1e-5, 6 epochs, queue 57,600, α 0.4, k_test 128 for the ITM re-ranking, and
negatives drawn from each GPU's batch (negative_all_rank False; here from the global batch).

Expected (ViT-B, 14M pretraining): Flickr30K 1k test TR@1 96.6 / IR@1 87.2 [paper Table 5; not
re-checked]. Hardware: 8 A100s.
  mmjax-train --config experiments/blip/retrieval_flickr.py:init_from=runs/blip_ret_coco,vocab=models/blip_itm_base/vocab.txt,image_dir=/data/flickr30k,captions=/data/flickr30k/train.jsonl,test_captions=/data/flickr30k/test.jsonl --workdir runs/blip_ret_flickr
  mmjax-train --config experiments/blip/retrieval_flickr.py:smoke=True --workdir /tmp/smoke_blip_ret_flickr
"""

import os

from mmjax import configs

FLICKR30K_TRAIN = 145_000     # caption–image pairs (29,000 images × 5), for the one-epoch α ramp


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B", init_from=None, vocab=None, image_dir=None, captions=None,
                            test_captions=None, smoke=False)
    coco = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval_coco.py")
    fields = ",".join(f"{k}={v}" for k, v in dict(arg).items() if v is not None and k != "smoke")
    c = configs.load_config(f"{coco}:{fields},epochs=6,k_test=128,smoke={arg.smoke}")
    if not arg.smoke:
        c.momentum.distill_warmup_steps = FLICKR30K_TRAIN // c.input.batch_size
    return c
