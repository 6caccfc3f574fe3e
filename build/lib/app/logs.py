"""How the server and the CLI log: one line format, and library warnings
kept out of the operator's view."""
from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT)


def quiet_library_warnings() -> None:
    """scikit-learn's FutureWarnings speak to whoever wrote the model, not to
    the operator serving it: kept out of the CLI's output and the server log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"sklearn(\..*)?$")
