"""Train or evaluate JoEm on Pascal-Context (any config works: see configs/)."""
import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(default_config="configs/config_context_zs3setting.json"))
