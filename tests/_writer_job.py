"""A job run in a subprocess by test_store_format.py: python _writer_job.py STORE [HOLD].

While the file HOLD exists, the job waits after each stored block (holding the store's
writer lock), so the test can try a second writer, read the store, or kill this one.
"""

import json
import os
import sys
import time

import numpy as np

import jacstream

hold = sys.argv[2] if len(sys.argv) > 2 else None


def pause(block):
    deadline = time.monotonic() + 300
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.02)


x = np.arange(1, 4 * 8 * 2 + 1, dtype="float32").reshape(4, 8, 2) / 10
J = jacstream.jacobian(lambda x: x ** 2, x, sys.argv[1], block_size=2, examples_per_block=2,
                       strategy="tile", causal=False, progress=False, on_block=pause)
print(json.dumps({"computed": J.stats["computed_blocks"], "skipped": J.stats["blocks_skipped"]}),
      flush=True)
