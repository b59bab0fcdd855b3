"""Every benchmark of the zoo, behind one entry: `python -m zoo.bench [NAME] [ARGS]` (README, Speed).

| NAME               | module              | what it measures                                                        |
|--------------------|---------------------|-------------------------------------------------------------------------|
| methods (default)  | zoo.bench.methods   | `make bench`: each method's fast path next to its slow reference        |
| casc               | zoo.bench.casc      | evaluation time of CASC's S_G against CASC-base on one grid             |
| cccl               | zoo.bench.cccl      | CCCL's blockwise all-pairs scorer, pairs/s                              |
| data               | zoo.bench.data      | `make bench-data`: training-loader images/s per data.train_features     |
| memory             | zoo.bench.memory    | peak memory of the shared evaluation flow against the embeddings' size  |
| search             | zoo.bench.search    | `make bench-search`: zoo.search build, bytes/item, query latency at scale |

Shared machinery (BenchSpec, register_bench, PeakMemory, interleaved timing) is in zoo.bench.common; the methods'
specs in zoo.bench.specs.
"""
from .common import BENCHES, BenchSpec, PeakMemory, coco_lengths, random_tokens, register_bench
from .specs import CASCBaseBench, CASCBench, CCCLBench  # registers the zoo's methods

# NAME -> module; the first line of each module's docstring is its `--help` summary
ENTRIES = {"methods": "zoo.bench.methods", "casc": "zoo.bench.casc", "cccl": "zoo.bench.cccl",
           "data": "zoo.bench.data", "memory": "zoo.bench.memory",
           "search": "zoo.bench.search"}


__all__ = ["BENCHES", "BenchSpec", "PeakMemory", "coco_lengths", "random_tokens", "register_bench", "ENTRIES",
           "CASCBaseBench", "CASCBench", "CCCLBench"]
