"""Image classification on labelled ImageFolder trees: weighted k-NN (``knn``), the linear-probe grid (``linear``),
end-to-end fine-tuning (``finetune``) and the label-fraction splits of semi-supervised learning (``splits``)."""
