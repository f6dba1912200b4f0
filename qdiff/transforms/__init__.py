"""Algorithms that change what a quantized layer computes, as composable transforms.

A transform is a frozen config (:class:`qdiff.transforms.base.Transform`) listed in
``QConfig.transforms``; :func:`qdiff.quantize` applies them in order after ``prepare`` and
before calibration. Applying one attaches a :class:`~qdiff.transforms.base.LayerTransform` to
each layer it changes, holding that layer's state and three hooks (on the weight, the input
and the output). The simulated layer and every backend's kernel layer run through the same
:func:`~qdiff.transforms.base.run_layer`, so a transform is written once and deploys on every
backend. Each transform lives in its own module here and registers itself by its ``kind``:
SmoothQuant (:mod:`qdiff.transforms.smooth`) and SVDQuant's low-rank branch
(:mod:`qdiff.transforms.lowrank`).
"""
