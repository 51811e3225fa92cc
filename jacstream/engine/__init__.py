"""The engine: the only part of jacstream that imports TensorFlow or Keras.

* :mod:`.devices`: device names, and the memory a probe measures on each;
* :mod:`.models`: model preparation (a faster call path with identical outputs);
* :mod:`.io`: fingerprints, model files, model bytes for dask workers;
* :mod:`.checks`: the eager checks (shapes, batch independence, differentiability);
* :mod:`.causal`: ``causal="auto"``;
* :mod:`.strategies`: one module per strategy behind :class:`~.strategies.base.BlockFunction`;
* :mod:`.build`: validated block functions, and the same function rebuilt from its spec;
* :mod:`.probes`: the memory cost of a block function;
* :mod:`.pfor`: faster pfor tracing through recurrent loops;
* :mod:`.reference`: the demo's reference model.

Importing this package does not import TensorFlow; its submodules do, so the
layers above reach them inside the functions that need a model.
"""

__all__: list[str] = []
