"""What every layer uses: config files, the config schema and the checked Settings, errors, run
folders and their file names, checkpoints, precision, signals, devices/DDP, logging, environment."""
