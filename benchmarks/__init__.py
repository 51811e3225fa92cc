"""The jacstream benchmark runner: ``python -m benchmarks --suite quick|full``.

Workloads (:mod:`.workloads`) x methods (:mod:`.methods`), each case in its
own watched subprocess (:mod:`.runner`, :mod:`.case`), grouped into suites
(:mod:`.suites`), reported as JSON, Markdown and PNG (:mod:`.report`). See
``benchmarks/README.md``.
"""
