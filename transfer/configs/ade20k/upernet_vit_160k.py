# Paper-scale ViT preset: UperNet + multi-level neck on a ViT, ADE20K, 160k iterations of 16 images at 512x512.
# mmsegmentation 1.2.2, configs/vit/vit_vit-b16-ln_mln_upernet_8xb2-160k_ade20k-512x512.py and its bases
# (_base_/models/upernet_vit-b16_ln_mln.py, _base_/datasets/ade20k.py, _base_/default_runtime.py,
# _base_/schedules/schedule_160k.py); widths follow vit_deit-s16-ln_mln_upernet_8xb2-160k_ade20k-512x512.py
# (neck width = the ViT's width). mmseg's metafile: 47.73 mIoU for its ViT-B/16 weights, 43.52 for DeiT-S (single
# scale).
# Differences, all forced by running our weights (in one process or several):
#   - backbone: built from the evaluated ViT by transfer/ade20k/models.py (mmseg's VisionTransformer with the
#     ViT's own depth, width, heads, patch size; blocks of each quarter's end as outputs, (2, 5, 8, 11) at
#     depth 12 as mmseg's; img_size = the crop; final_norm=True as this "-ln" config; patch_bias=True because timm
#     ViTs have the patch-embedding bias, which mmseg 1.x's default patch_bias=False would silently drop)
#   - norm_cfg: BN instead of SyncBN: one process holds the whole 16-image batch, so BN sees the same statistics
#     SyncBN gathers over 8 GPUs x 2 images (and mmengine reverts SyncBN to BN without a process group anyway);
#     under N processes the task turns every BN into a GlobalBatchNorm over the 16 images (transfer/ade20k/global_bn.py:
#     torch's SyncBN refuses CPU tensors, mmcv's needs compiled ops mmcv-lite lacks)
#   - the ImageNet checkpoint mmseg names in `pretrained` is replaced by the evaluated checkpoint
_base_ = ['./_ade20k_512.py']

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN in mmseg's 8-GPU recipe, see above
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(512, 512)),
    # the recipe's own backbone settings; the architecture comes from the evaluated checkpoint
    backbone=dict(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, norm_eval=False,
                  interpolate_mode='bicubic'),
    # in_channels and out_channels (None) are the ViT's width; scales (None) resize the patch grid to strides
    # 4, 8, 16, 32: mmseg's [4, 2, 1, 0.5] for patch 16, [2, 1, 0.5, 0.25] for patch 8
    neck=dict(type='MultiLevelNeck', in_channels=None, out_channels=None, scales=None),
    decode_head=dict(type='UPerHead', in_channels=None, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=512, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=None, in_index=3, channels=256, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# AdamW, no weight decay for the position embedding, [CLS] and parameters named *norm*, as mmseg's file. 'norm'
# matches no parameter of this model (mmseg's ViT names its LayerNorms ln1/ln2, ConvModule its BatchNorms bn), so
# as in mmseg's own runs only pos_embed and cls_token go without weight decay (checked in the optimizer's log)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'pos_embed': dict(decay_mult=0.), 'cls_token': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}))
# linear warm-up over 1500 iterations from 1e-6 x lr, then linear (poly power 1) decay to 0 at 160k
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
