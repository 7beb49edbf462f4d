"""Third-party output on the command line: off unless ``dualign --verbose``.

transformers' load reports (``BertForSequenceClassification LOAD REPORT ... classifier.weight |
MISSING ... Consider training on your downstream task``, about a head it is right to initialise),
its and the Hub's progress bars (``Loading weights``, ``Writing model shards``, ``Fetching files``),
datasets' logs and bars, and the libraries' Python warnings read like errors in a run's log and
hide dualign's own progress lines. Each library's own switch turns them off: the environment
variables it reads when first imported (the CLI sets them before importing any of them), and its
setter when it is imported already. A variable the user set is left as it is.

This module imports none of these libraries: ``dualign --help`` should not pay for them.
"""

from __future__ import annotations

import os
import sys
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # load reports and advice are warnings
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow the Hub's switch
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
NOISY_MODULES = r"(torch|transformers|tokenizers|accelerate|peft|datasets|huggingface_hub|trl)(\.|$)"


def quiet_third_party() -> None:
    """Silence the libraries' logs below error, their progress bars and their Python warnings
    (``python -W default`` keeps the warnings)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", module=NOISY_MODULES)
