"""Layer 6, evaluation protocols: end-to-end fine-tuning (:mod:`.finetune`), the frozen-feature
commands k-NN and linear probe (:mod:`.features`), built on the pure functions of
:mod:`mimlab.nn.knn` (weighted k-NN) and :mod:`mimlab.nn.linear_probe` (linear heads trained on
cached features), and shape bias on the cue-conflict stimuli (:mod:`.shape_bias`: ``mimlab
analyze shape-bias`` and ``finetune.shape_bias``). The online k-NN / probe evaluator that
runs during pretraining is :mod:`mimlab.train.online`.

Layering: ``eval`` reads models, data and config, and the commands train with the engine; the
engine only calls evaluator callbacks and never imports this package.
"""
