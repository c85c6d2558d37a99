"""A process that maps a dataset's index and reads every page of it, then waits on stdin (for
tests/test_remote.py to measure its memory):

    python tests/map_index.py OUT CACHE      # prints "mapped"
    python tests/map_index.py                # the same imports, nothing mapped: "ready"
"""

import sys

import numpy as np

from trainer.index_map import MappedIndex
from trainer.storage import DatasetFiles, NodeCache

if len(sys.argv) == 3:
    index = MappedIndex(DatasetFiles(sys.argv[1], NodeCache(sys.argv[2])))
    chunks = [
        chunk
        for table in (index.numbers, index.text)
        for column in table.columns
        for chunk in column.chunks
    ]
    buffers = [buffer for chunk in chunks for buffer in chunk.buffers() if buffer is not None]
    touched = sum(int(np.frombuffer(buffer, np.uint8)[::4096].sum()) for buffer in buffers)
    assert index.strings("key", np.array([len(index) - 1])) == [f"{len(index) - 1:08d}"]
    print("mapped", flush=True)
else:
    print("ready", flush=True)
sys.stdin.read()
