"""From what the user typed to settings: the option registry (`options`), value parsing
(`values`), the TOML configuration file (`file`) and the merge of defaults, file,
environment and command line into `Settings` with their sources (`resolve`)."""
