"""Preprocessing strings that several papers' recipes share, named after where they come from."""

# timm's create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
# re_prob=0.25, interpolation="bicubic"): DeiT's training pipeline, which MAE and BEiT reuse for
# ImageNet fine-tuning.
DEIT_TRAIN_PP = ("decode|inception_crop(224, area_min=0.08, method='bicubic')|flip_lr"
                 "|randaugment(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True, fill='imagenet')"
                 "|normalize('imagenet')|random_erasing(0.25, mode='pixel', max_count=1)|keep('image','label')")
# Its evaluation side (crop ratio 0.875): resize the short side to 256, centre crop 224.
DEIT_EVAL_PP = ("decode|resize_small(256, method='bicubic')|central_crop(224)|normalize('imagenet')"
                "|keep('image','label')")
