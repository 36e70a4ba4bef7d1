"""From what the user gave to one `Configuration` (`pipeline.build`): the option registry
(`options`), value parsing (`values`), the typed keyword options of `Launcher`
(`keywords`), the gunicorn-style Python config file (`file`), the merge of defaults, file,
environment and explicit values into `Settings` with their sources (`resolve`), and the
pipeline that adds the worker plan and the checked gunicorn settings (`pipeline`)."""
