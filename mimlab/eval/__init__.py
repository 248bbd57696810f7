"""Evaluation protocols on frozen features: weighted k-NN (:mod:`.knn`), linear heads trained
on cached features (:mod:`.linear`) and the online k-NN / probe evaluator that runs during
pretraining (:mod:`.online`).

Layering: ``eval`` reads models, data and config; the engine only calls evaluator callbacks
and never imports this package.
"""
