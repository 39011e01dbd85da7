"""Classifier training: a linear head on the embedding backbone, fitted in the plan's two stages.

Stage 1 fits the head alone on the wave's cached float16 embeddings, with the backbone frozen.
Stage 2 fine-tunes ResNet ``layer3`` and ``layer4`` with the head on the uint8 slices, by SGD
with one learning rate per part, warm-up then cosine decay. Stage 2 is kept only when it beats
stage 1 on training rows withheld from both; the holdout split only measures.

- ``two_stage``: ``TrainConfig``, the labeled inputs (``TrainingData``), ``train_two_stage``
- ``model``: ``ClassifierModel`` (frozen BatchNorm statistics), freezing, the standardised head
- ``inputs``: ``SliceRows``, ``ImageBatches``, and the checks on images, embeddings and labels
- ``loops``: stage 1 on embeddings, one stage-2 epoch, ``evaluate``
- ``schedule``: stage 2's SGD parameter groups and learning-rate factor
- ``metrics``: ``EvalResult`` (confusion, macro-F1) and how far stage 2 moved the backbone
- ``embedding_head``: the stage-1 head as a numpy predictor on cached embeddings
- ``checkpoint``: the classifier checkpoint, its backbone and its stage-1 head
- ``errors``: ``TrainingError``
"""
