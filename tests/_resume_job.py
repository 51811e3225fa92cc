"""A job run in a subprocess by test_resume.py: python _resume_job.py STORE [block_size]."""

import json
import sys

import keras
import numpy as np

import jacstream

keras.utils.set_random_seed(5)
inp = keras.Input((None, 1))
h = keras.layers.LSTM(24, return_sequences=True)(inp)
model = keras.Model(inp, keras.layers.TimeDistributed(keras.layers.Dense(1))(h))
x = np.random.default_rng(5).normal(size=(4, 240, 1)).astype("float32")
block_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
print("START", flush=True)
# The strategy is fixed: "auto" times trials, so the clean and the killed run could choose
# differently (or keep another candidate's trial block) on a loaded or slower machine, and two
# strategies agree only to float32 rounding, not bit for bit.
J = jacstream.jacobian(model, x, sys.argv[1], block_size=block_size, strategy="tile",
                       progress=False)
print(json.dumps({"computed": J.stats["computed_blocks"], "skipped": J.stats["blocks_skipped"]}),
      flush=True)
