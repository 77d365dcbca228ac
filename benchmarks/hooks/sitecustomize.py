"""Benchmark-only hooks for a ``cairn serve`` process that a bench starts with this directory on its ``PYTHONPATH``;
nothing in cairn reads them, and each is off unless its variable is set.

- CAIRN_BENCH_ARGMAX_SWITCH (``bench_greedy_step.py --serve``): SIGUSR1 switches the engine between the decode
  step's own greedy argmax and ``torch.argmax`` on the step's logits.
- CAIRN_BENCH_IN_SERVER=DIR (``bench_http.py --sections same``): the server's own engine decodes in process on
  request, in the server's process, so that a bench can set one client's stream against the same engine with no HTTP
  (the same memory, the same weights' pages: what differs is only the serving path). A thread reads one JSON line
  per request from the FIFO ``DIR/in`` (``{"messages": [...], "n": N}``) and answers with ``decode_once``'s JSON
  line on the FIFO ``DIR/out``.
"""

import os

if os.environ.get("CAIRN_BENCH_ARGMAX_SWITCH") or os.environ.get("CAIRN_BENCH_IN_SERVER"):
    from cairn.openmp import tune_for_decoding

    tune_for_decoding()  # (cairn.cli would, but the imports below come first and import torch)

if os.environ.get("CAIRN_BENCH_ARGMAX_SWITCH"):
    import signal

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

if os.environ.get("CAIRN_BENCH_IN_SERVER"):
    import json
    import threading
    import traceback

    from cairn.engine import engine as _engine_mod

    _engines: list = []
    _init = _engine_mod.Engine.__init__

    def _kept(self, *args, **kw):
        _init(self, *args, **kw)
        _engines.append(self)

    def _serve_decodes(folder: str) -> None:
        from bench_engine import decode_once  # (the benchmarks directory is on the bench's PYTHONPATH)

        with open(os.path.join(folder, "in")) as cmds, open(os.path.join(folder, "out"), "w") as out:
            for line in cmds:
                try:
                    cmd = json.loads(line)
                    engine = _engines[0]
                    ids = engine.tokenizer.encode_chat(cmd["messages"])
                    res = decode_once(engine, ids, int(cmd["n"]))
                except Exception:
                    res = {"error": traceback.format_exc()}
                out.write(json.dumps(res) + "\n")
                out.flush()

    _engine_mod.Engine.__init__ = _kept
    threading.Thread(target=_serve_decodes, args=(os.environ["CAIRN_BENCH_IN_SERVER"],), daemon=True,
                     name="bench-in-server").start()
