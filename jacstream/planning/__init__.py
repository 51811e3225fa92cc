"""Planning: shapes and options in, a frozen plan of blocks out; pure Python, no TensorFlow.

* :mod:`.units`: sizes in bytes and the storage dtypes;
* :mod:`.steps`: the ``out_steps`` rules and the causal input length;
* :mod:`.strategies`: the one table of strategies;
* :mod:`.blocks`: :class:`Block`, :class:`CostModel`, :class:`Plan`;
* :mod:`.planner`: :func:`make_plan`;
* :mod:`.choice`: ``strategy="auto"`` as a decision over measured trials.
"""

from .blocks import LAYOUT as LAYOUT
from .blocks import Block as Block
from .blocks import CostModel as CostModel
from .blocks import Plan as Plan
from .planner import make_plan as make_plan
from .steps import inputs_needed as inputs_needed
from .steps import normalize_out_steps as normalize_out_steps
from .strategies import REGISTRY as REGISTRY
from .strategies import STRATEGIES as STRATEGIES
from .units import DTYPES as DTYPES
from .units import format_bytes as format_bytes
from .units import parse_memory as parse_memory

__all__ = ["DTYPES", "LAYOUT", "REGISTRY", "STRATEGIES", "Block", "CostModel", "Plan",
           "format_bytes", "inputs_needed", "make_plan", "normalize_out_steps", "parse_memory"]
