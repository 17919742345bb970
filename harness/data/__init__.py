"""Loaders for the shared real datasets (``../shared/data``, see its README for sources and md5s).

- :mod:`harness.data.mnist`: the MNIST test set, stroke attributes (ink, slant), and the
  scikit-learn digits fallback used when the shared data is absent.
- :mod:`harness.data.timeseries`: UCR/UEA ``.ts`` files and the pooled single-lead ECG collection.
- :mod:`harness.data.covid`, :mod:`harness.data.tiny_imagenet`, ...: the case studies' data.
- :mod:`harness.data.download`: fetches each dataset from its public source (``make data``).

Every loader raises :class:`harness.errors.InputError` naming the missing folder and how to
fetch it when the data is absent, or fetches it first with ``INFEMBED_DOWNLOAD=1``
(see :func:`harness.paths.dataset_dir`).
"""
