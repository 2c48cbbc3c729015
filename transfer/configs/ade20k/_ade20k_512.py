# ADE20K at 512x512 for 160k iterations: data pipeline, runtime and schedule shared by the paper-scale presets.
# Every value is mmsegmentation 1.2.2's, from the files named beside it (paths inside mmseg's configs/); the only
# additions are the dataset's explicit suffixes / reduce_zero_label (ADE20KDataset's own defaults, spelled out) and
# the batch of 16 images per iteration over all processes (mmseg's 8 GPUs x 2 images = 16, see the model files):
# train_dataloader.batch_size here is that global batch; under N processes each takes 16 / N (transfer/ade20k/train.py).
# eval/tasks/ade20k.py fills data_root, the backbone, the number of classes and the flags you pass.

# _base_/datasets/ade20k.py
dataset_type = 'ADE20KDataset'
data_root = None  # --data
crop_size = (512, 512)
img_scale = (2048, 512)  # a child's img_scale reaches these steps through eval/tasks/ade20k.py
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),  # label 0 (other) -> 255 (ignored), 1..150 -> 0..149
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # annotations are loaded after Resize: scores are computed at the original resolution
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(type=dataset_type, data_root=data_root, img_suffix='.jpg', seg_map_suffix='.png',
               reduce_zero_label=True)
train_dataloader = dict(
    batch_size=16, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**dataset, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
# mIoU / mAcc / aAcc in percent (0-100); the task's IoUMetric subclass also keeps the per-class numbers
val_evaluator = dict(type='BamIoUMetric', iou_metrics=['mIoU'])

# _base_/schedules/schedule_160k.py (its SGD optimizer is replaced in each model file, as mmseg's configs do)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))

# _base_/default_runtime.py
default_scope = 'mmseg'
env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
# no fixed name (mmseg's is 'visualizer'): mmengine reuses a named visualizer, so a second run in the same process
# would write into the first one's folder; the Runner names it after the run instead
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
