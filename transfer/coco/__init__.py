"""COCO detection and instance segmentation: COCO-format data and COCOeval (``data``), torchvision's Mask R-CNN
around the evaluated backbone (``mask_rcnn``) and its training loop (``train``), and detectron2's engine
(``detectron2_engine``, ``detectron2_export``) where detectron2 is installed."""
