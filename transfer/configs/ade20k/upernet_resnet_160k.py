# Paper-scale ResNet preset: UperNet on a ResNet's 4 stages, ADE20K, 160k iterations of 16 images at 512x512.
# mmsegmentation 1.2.2, configs/upernet/upernet_r50_4xb4-160k_ade20k-512x512.py and its bases
# (_base_/models/upernet_r50.py, _base_/datasets/ade20k.py, _base_/default_runtime.py,
# _base_/schedules/schedule_160k.py): SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly 0.9 to 1e-4,
# batch 4 GPUs x 4 = 16. mmseg's metafile: 42.05 mIoU (single scale) with its
# ImageNet-supervised ResNetV1c-50.
# Differences, all forced by running our weights (in one process or several):
#   - backbone: mmseg's ResNet (the torchvision / timm layout our ResNets have: 7x7 stem, stride in the 3x3
#     convolution) instead of ResNetV1c (a three-convolution stem our checkpoints do not have)
#   - norm_cfg: BN instead of SyncBN: one process holds the whole 16-image batch; N processes normalise over it
#     with GlobalBatchNorm (see upernet_vit_160k.py)
#   - the ImageNet checkpoint mmseg names in `pretrained` is replaced by the evaluated checkpoint
_base_ = ['./_ade20k_512.py']

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN in mmseg's 4-GPU recipe, see above
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(512, 512)),
    # the recipe's own backbone settings; depth and block type come from the evaluated checkpoint
    backbone=dict(num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1), strides=(1, 2, 2, 2),
                  norm_cfg=norm_cfg, norm_eval=False, style='pytorch', contract_dilation=True),
    neck=None,
    # in_channels (None) are the stages' widths: [256, 512, 1024, 2048] for a ResNet-50; the auxiliary head
    # reads stage 3 (in_index 2) as mmseg's
    decode_head=dict(type='UPerHead', in_channels=None, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=512, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=None, in_index=2, channels=256, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
                     clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=160000, by_epoch=False)]
