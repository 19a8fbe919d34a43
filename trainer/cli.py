"""The command line shared by train_pascal_zs3setting.py and train_context_zs3setting.py: one run
(trainer.session), or with ``--seeds``/``--from`` a multi-seed experiment (trainer.multiseed)."""
from __future__ import annotations

import sys

from trainer.options import build_arg_parser
from utils.cli import error_exit
from utils.errors import ConfigError


def main(default_config: str | None = None, argv: list[str] | None = None) -> int:
    """Parse the command line; train or test, launching one process per GPU when asked.
    ``argv`` None: this is the process's command line (its signal handlers stay until it exits)."""
    process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        known = build_arg_parser(default_config).parse_known_args(argv)[0]
    except ConfigError as err:
        return error_exit(err)
    if known.seeds is not None or known.source is not None:   # multi-seed: its own options (--group ...) included
        from trainer.multiseed import main as multiseed_main
        return multiseed_main(argv, default_config)
    from trainer.session import launch
    return launch(default_config, argv, process)


if __name__ == "__main__":
    sys.exit(main())
