"""Loaders for the shared real datasets (``../shared/data``, see its README for sources and md5s).

- :mod:`harness.data.mnist`: the MNIST test set, stroke attributes (ink, slant), and the
  scikit-learn digits fallback used when the shared data is absent.
- :mod:`harness.data.timeseries`: UCR/UEA ``.ts`` files and the pooled single-lead ECG collection.
- :mod:`harness.data.covid`, :mod:`harness.data.tiny_imagenet`, ...: the case studies' data.

Every loader raises :class:`harness.errors.InputError` naming the missing folder when the
shared data is absent (see :func:`harness.paths.has_dataset`).
"""
