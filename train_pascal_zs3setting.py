"""Train or evaluate JoEm on Pascal VOC (any config works: see configs/)."""
import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(default_config="configs/config_pascal_zs3setting.json"))
