"""A job run in a subprocess by test_resume.py: python _resume_job.py STORE [block_size [strategy]]."""

import json
import sys
import time

import keras
import numpy as np

import jacstream

keras.utils.set_random_seed(5)
inp = keras.Input((None, 1))
h = keras.layers.LSTM(24, return_sequences=True)(inp)
model = keras.Model(inp, keras.layers.TimeDistributed(keras.layers.Dense(1))(h))
x = np.random.default_rng(5).normal(size=(4, 240, 1)).astype("float32")
block_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
strategy = sys.argv[3] if len(sys.argv) > 3 else "sensitivity"
print("START", flush=True)
# The strategy is fixed: "auto" times trials, so the clean and the killed run could choose
# differently (or keep another candidate's trial block) on a loaded or slower machine, and two
# strategies agree only to float32 rounding, not bit for bit. A pause after each stored block:
# the test kills this process at chosen numbers of stored blocks, and the sensitivity sweep
# finishes a block of this job in milliseconds, faster than the test can look.
J = jacstream.jacobian(model, x, sys.argv[1], block_size=block_size, strategy=strategy,
                       progress=False, on_block=lambda block: time.sleep(0.05))
print(json.dumps({"computed": J.stats["computed_blocks"], "skipped": J.stats["blocks_skipped"]}),
      flush=True)
