# ViTDet Mask R-CNN (detectron2 projects/ViTDet, COCO "mask_rcnn_vitdet_b_100ep") on our ViT: detectron2's
# model-zoo "common" configs plus ViTDet's optimizer recipe (AdamW, lr 1e-4, weight decay 0.1, layer decay 0.7,
# drop path 0.1, 64 images, 184,375 iterations, steps at 88.9 % and 96.3 %, 250 warm-up iterations).
# transfer/coco/detectron2_engine.py sets the backbone's width/depth/heads, the weights, datasets and schedule.
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
train = model_zoo.get_config("common/train.py").train
optimizer = model_zoo.get_config("common/optim.py").AdamW

model.backbone.net.drop_path_rate = 0.1
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.test.mapper.image_format = "RGB"
# large-scale jitter (ViTDet): flip, resize by 0.1-2.0 of a 1024 square, crop 1024 (boxes recomputed from masks)
image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.recompute_boxes = True
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]

optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

train.max_iter = 184375
train.amp.enabled = True
train.ddp.fp16_compression = True
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[163889, 177546],
                                         num_updates=train.max_iter),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
