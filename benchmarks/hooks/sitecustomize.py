"""Benchmark-only (``bench_greedy_step.py --serve``): with CAIRN_BENCH_ARGMAX_SWITCH set, SIGUSR1 switches this
process's engine between the decode step's own greedy argmax and ``torch.argmax`` on the step's logits."""

import os

if os.environ.get("CAIRN_BENCH_ARGMAX_SWITCH"):
    import signal

    from cairn.openmp import tune_for_decoding

    tune_for_decoding()  # (cairn.cli would, but this import of the runner comes first and imports torch)
    from cairn.engine import runner

    _state = {"torch": False}
    _forward = runner.Runner.forward

    def _switched(self, segments, *args, **kw):
        if _state["torch"]:
            kw["greedy"] = False
        return _forward(self, segments, *args, **kw)

    def _switch(*_):
        _state["torch"] = not _state["torch"]

    runner.Runner.forward = _switched
    signal.signal(signal.SIGUSR1, _switch)
