# The built-in sample's CPU setting: the same UperNet pipeline as upernet_vit_160k.py / upernet_resnet_160k.py, made
# small enough for a few minutes on 2 CPU cores. What differs from the paper-scale recipe, and why:
#   - 128x128 crops of 256x192 scenes (resized so the short side is 128, x0.5-2.0 while training), 400 iterations
#     of 4 images, no warm-up: the sample is tiny and a random-init backbone has nothing to protect (measured on 2
#     cores with a random-init ViT-S/16: about 3 minutes, mIoU 66; 8 images per iteration gave 77 in about 5)
#   - AdamW lr 1e-3 (a random-init backbone learns from scratch here; 6e-5 barely moves it in 400 steps)
#   - thin heads: neck and UperNet 64 channels, auxiliary FCN head 32 (512 / 256 in the recipe)
#   - no periodic checkpoint file (a ViT-S segmentor with AdamW states is ~260 MB), only one at a preemption
#     signal (transfer/ade20k/resume.py); validation only at the end
# eval/tasks/ade20k.py fills data_root, the backbone, the classes and the flags you pass.
# Everything not set here is _ade20k_512.py's (pipelines, evaluator, hooks, runtime). mmengine resolves a base file's
# names when it reads that file, so eval/tasks/ade20k.py puts img_scale and the crop size into the base's pipelines.
_base_ = ['./_ade20k_512.py']

crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=crop_size),
    backbone=dict(),  # the evaluated backbone's own architecture (transfer/ade20k/models.py)
    neck=dict(type='MultiLevelNeck', in_channels=None, out_channels=64, scales=None),  # ViTs only: strides 4-32
    decode_head=dict(type='UPerHead', in_channels=None, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=64, dropout_ratio=0.1, num_classes=None, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=None, in_index=3, channels=32, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=None, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

dataset_type = 'BaseSegDataset'  # the sample's own classes (bam/samples/ade.py), ADE20K's file layout
img_scale = (512, 128)
train_dataloader = dict(batch_size=4, num_workers=2, dataset=dict(type=dataset_type))
val_dataloader = dict(num_workers=2, dataset=dict(type=dataset_type))

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.001, betas=(0.9, 0.999),
                                                         weight_decay=0.01))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=400, by_epoch=False)]
train_cfg = dict(max_iters=400, val_interval=400)
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=-1, save_last=False))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
