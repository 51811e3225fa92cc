"""Storage: where blocks go, behind one :class:`~jacstream.store.sink.Sink` protocol.

* :mod:`.jobstore`: the zarr store of one job (chunks, metadata, completion markers);
* :mod:`.reduced`: a streaming reduction's result as a small zarr store;
* :mod:`.sink`: the protocol, and :class:`NullSink` (blocks dropped);
* :mod:`.rules`: the one copy of the refuse-to-overwrite rules;
* :mod:`.dtypes`: float16 / bfloat16 storage;
* :mod:`.result`: :class:`Jacobian`, the lazy view of a store, and :func:`open`.

No TensorFlow here.
"""

from .jobstore import JobStore as JobStore
from .result import Jacobian as Jacobian
from .result import open as open  # noqa: A004
from .sink import NullSink as NullSink
from .sink import Sink as Sink

__all__ = ["Jacobian", "JobStore", "NullSink", "Sink", "open"]
