"""User-facing errors. The CLI prints these as one line and exits with code 2."""


class FusecError(Exception):
    """Base class for errors caused by user input (paths, files, options, prompts)."""


class ModelLoadError(FusecError):
    """A model path, config, weight file or tokenizer could not be used."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture or format is not supported."""


class InputError(FusecError):
    """A request is invalid for the loaded model (e.g. a prompt longer than the context)."""
