"""Parameter, memory, KV-cache and FLOP accounting from a config alone, and the claims audit.

``account(cfg)`` → ``Accounting`` (see ``costs``); ``weights(cfg)`` lists the tensors it sums (``params``);
``load_config(MODEL)`` resolves a preset, config.json, checkpoint or GGUF (``load``); ``audit_file`` checks a
claims file (``audit``); ``add_parser`` registers ``cairn params`` and ``cairn audit`` (``cli``).
"""

from cairn.accounting.costs import Accounting, account
from cairn.accounting.params import Weight, weights

__all__ = ["Accounting", "Weight", "account", "weights"]
