"""Evaluation protocols: end-to-end fine-tuning (:mod:`.finetune`), the frozen-feature
commands k-NN and linear probe (:mod:`.features`) built on the pure functions of :mod:`.knn`
(weighted k-NN) and :mod:`.linear` (linear heads trained on cached features), and the online
k-NN / probe evaluator that runs during pretraining (:mod:`.online`).

Layering: ``eval`` reads models, data and config, and the commands train with the engine; the
engine only calls evaluator callbacks and never imports this package.
"""
