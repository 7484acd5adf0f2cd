"""Triton kernels of the decode hot path, flashinfer-style: launchers here, kernels in ``kernels/``.

- ``launch.py``: how kernels launch on this machine (interpreter or GPU, chained or plain) and the
  explicit ``TritonTuning`` a backend is built with; the one reader of ``TRITON_INTERPRET``.
- ``decode.py`` (kernels ``kernels/decode.py``, ``kernels/merge.py``): ``fused_decode``, SPEC 5 over
  a given read set: gather, online softmax, the feature-map completion, an estimate computed
  outside the kernel, split-K merge, one normalization; returns ``(out, rho, lse)``.
- ``select.py`` (``kernels/bounds.py``, ``kernels/select.py``): ``page_bounds``, the Quest bound of
  SPEC 3, and ``page_read_set``, the page selection of one step.

Kernel files import only ``triton`` and ``triton.language``; launchers check inputs, allocate and
pick the grid. Nothing here imports model code or another backend. The backend that uses them is
``topkphi.backends.triton_backend``.
"""
